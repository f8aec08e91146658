"""What a run's data was when it started: its classes and, for each split, every file's path, label, size,
modification time and content digest (image folders), every shard's size and modification time (shards),
or a digest of the images (data sets held as tensors). A file counts as unchanged when its label, size
and either its modification time or its content are: a data set copied to another disk or machine (new
modification times, same bytes) resumes, a file rewritten in place or swapped with another does not.
``ekdc distill`` records it in the run folder (``data.json``) and ``--resume`` compares: a run never goes on with images that moved between the splits, or changed,
after its teachers trained on them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

from .. import _io
from ..errors import UserError
from .sources import FileSource

FINGERPRINT_FILE = "data.json"
SPLITS = (("train", "training"), ("val", "validation"))


def _stat(path: str) -> tuple[Optional[int], Optional[int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def _digest(path: str) -> Optional[str]:
    """A short content hash of one image file (blake2b, 8 bytes): image files are small and the loader
    reads every one of them anyway; the 50,000 CIFAR-10 JPEGs take a few seconds (5.0 s on 2 busy cores)."""
    try:
        with open(path, "rb") as f:
            return hashlib.blake2b(f.read(), digest_size=8).hexdigest()
    except OSError:
        return None


def _same_file(before: list, now: list) -> bool:
    """[label, size, mtime(, digest)] entries: the same label and size, and the same mtime or content (an
    entry recorded before digests were has only its mtime to go by)."""
    if before[:2] != now[:2]:
        return False
    if len(before) > 3 and len(now) > 3 and before[3] is not None:
        return before[3] == now[3]
    return before[2] == now[2]


def _positions(part):
    return range(len(part.source.files)) if part.positions is None else part.positions


def _listed(src, i: int) -> list:
    """A file's entry less its digest: [path, label, size, modification time]."""
    return [os.path.abspath(src.files[i]), int(src.labels[i]), *_stat(src.files[i])]


def _part(part) -> dict:
    src = part.source
    if isinstance(src, FileSource):
        return {"files": [[*_listed(src, i), _digest(src.files[i])] for i in _positions(part)]}
    if getattr(src, "ordered", False):
        return {"shards": [[str(s), *_stat(str(s))] for s in src.shards]}
    h = hashlib.sha256()
    for block in src.identity(part.positions):
        h.update(block)
    labels = part.labels
    if labels is not None:
        h.update(labels.astype("int64").tobytes())
    return {"images": len(part), "digest": h.hexdigest()}


def _unchanged_files(recorded: Optional[dict], part) -> bool:
    """The recorded files of a split are today's by path, label, size and modification time: the same split,
    known without digesting every image again (a validation split of 50,000 photos is gigabytes)."""
    src = part.source
    if not recorded or "files" not in recorded or not isinstance(src, FileSource):
        return False
    positions = _positions(part)
    return len(positions) == len(recorded["files"]) and all(
        e[:4] == _listed(src, i) for e, i in zip(recorded["files"], positions))


def fingerprint(index) -> dict:
    """The fingerprint of a ``SplitIndex``'s splits (plain JSON data)."""
    return {"classes": list(index.classes), "splits": {name: _part(index.part(name)) for name, _ in SPLITS}}


def _listed_change(old: list, new: list, what: str, noun: str) -> Optional[str]:
    before = {e[0]: e[1:] for e in old}
    now = {e[0]: e[1:] for e in new}
    same = _same_file if noun == "images" else (lambda a, b: a == b)
    changed = [p for p in now if p in before and not same(before[p], now[p])]
    added = [p for p in now if p not in before]
    gone = [p for p in before if p not in now]
    parts = []
    if changed:
        parts.append(f"{len(changed)} changed (first: {changed[0]})")
    if added:
        parts.append(f"{len(added)} now in it (first: {added[0]})")
    if gone:
        parts.append(f"{len(gone)} no longer in it (first: {gone[0]})")
    if not parts:
        return None
    return f"the {what} split's {noun}: " + ", ".join(parts) + f", of {len(before)}"


def difference(saved: dict, now: dict) -> Optional[str]:
    """What differs between two fingerprints, in words, or None."""
    if saved.get("classes") != now["classes"]:
        return f"the classes are {', '.join(now['classes'])}, were {', '.join(saved.get('classes') or [])}"
    for name, what in SPLITS:
        a, b = (saved.get("splits") or {}).get(name), now["splits"][name]
        if a == b:
            continue
        if a and "files" in a and "files" in b:
            change = _listed_change(a["files"], b["files"], what, "images")
        elif a and "shards" in a and "shards" in b:
            change = _listed_change(a["shards"], b["shards"], what, "shards")
        else:
            change = f"the {what} split's images differ"
        if change:
            return change
    return None


def record_or_check(run_path: Path, index, resume: bool) -> Optional[str]:
    """A new run records its data's fingerprint; a resumed one compares it with what it recorded, and a
    difference is one line naming it. Returns a note to say (a run that recorded none: recorded now)."""
    path = Path(run_path) / FINGERPRINT_FILE
    now = fingerprint(index)
    if resume and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
        diff = difference(saved, now)
        if diff is not None:
            raise UserError(f"--resume: the data is not what {run_path} started with ({diff}): its teachers or "
                            "student may have trained on images that are now elsewhere; start a new run, or put the "
                            f"data back (if the images are the same, remove {path} to accept them as they are)")
        if saved == now:
            return None
        note = None  # the same images with new modification times (a copy): the record follows them
    else:
        note = f"data: no {FINGERPRINT_FILE} in {run_path} (a run from before it was recorded); recorded it now" \
            if resume else None
    _io.write_text(path, json.dumps(now, separators=(",", ":")) + "\n")
    return note


def check_held_out(run_path: Path, index) -> Optional[str]:
    """Before a finished run's student is scored on today's validation split (export, bench): refuse a split
    that holds images the run trained on (images added to or removed from a folder re-draw the seeded split,
    and accuracy on training images is inflated); a split that differs without that is a note to say. A
    run with no record (from before it was kept) is taken as it is."""
    path = Path(run_path) / FINGERPRINT_FILE
    try:
        saved = json.loads(path.read_text())
    except OSError:
        return None
    except ValueError as err:
        raise UserError(f"cannot read {path}: {err}") from None
    if not isinstance(saved, dict):
        raise UserError(f"cannot read {path}: not the record ekdc distill writes (a JSON object)")
    before = (saved.get("splits") or {})
    if _unchanged_files(before.get("val"), index.part("val")):  # the usual case, told without reading an image
        return None
    now = _part(index.part("val"))
    if before.get("val") == now:
        return None
    trained, held = (before.get("train") or {}).get("files"), (before.get("val") or {}).get("files")
    if trained is None or "files" not in now:  # shards, tensors: no file list to tell training images by
        return (f"the validation split differs from the one {run_path} held out, and ekdc cannot tell whether it "
                "now holds images that run trained on: its accuracy may be inflated")
    trained_paths = {e[0] for e in trained}
    # the same bytes under another path too (a copied data set), unless the run also held those bytes out
    trained_digests = {e[4] for e in trained if len(e) > 4 and e[4]} - {e[4] for e in held or [] if len(e) > 4}
    leaked = [e[0] for e in now["files"] if e[0] in trained_paths or (e[4] and e[4] in trained_digests)]
    if leaked:
        raise UserError(f"the validation split is not the one {run_path} held out: {len(leaked)} of its "
                        f"{len(now['files'])} images are images that run trained on (first: {leaked[0]}), so "
                        "its accuracy would be inflated; the data changed since training (images added or "
                        "removed re-draw the seeded split): put it back as it was, or score on another set "
                        "(ekdc bench --data RECIPE)")
    change = None
    if held is not None:
        change = _listed_change(held, now["files"], "validation", "images")
        if change is None:
            return None  # the same images (a copy with new modification times)
    return (f"the validation split differs from the one {run_path} held out ({change or 'its images differ'}; "
            "none of them is an image that run trained on): accuracy is on today's split")
