"""``ekdc data shard FOLDER OUT``: an image folder as WebDataset tar shards that ``shards.py`` reads,
packing only what training could use (the folder scan's files, each decoded), with ``classes.txt`` and
``shards.json`` beside them; OUT never mixes two writes."""
from __future__ import annotations

import collections
import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from .. import _io
from ..errors import UserError
from .decode import check_image
from .folder import scan_folder
from .shards import CLASSES_FILE, SHARDS_INDEX, WRITING_MARK, _read_index


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


# what a shard folder written by ``write_shards`` holds, beside its shards (and temporary files of a write)
_OWN_FILES = (SHARDS_INDEX, CLASSES_FILE, WRITING_MARK)
STAGING_PREFIX = ".ekdc-shard-new-"  # the folder inside OUT a write fills before it replaces the earlier set


def _prepare_out(folder: Path, out: Path, prefix: str, overwrite: bool) -> list[Path]:
    """Refuse an OUT inside FOLDER, and an OUT that holds anything but a shard set this command wrote (or
    one it left unfinished); return the files of such a set, which are removed before the new one is
    written (with ``overwrite``; an unfinished write's always), so that OUT never mixes two writes."""
    f_real, o_real = Path(os.path.realpath(folder)), Path(os.path.realpath(out))
    if _inside(o_real, f_real):
        raise UserError(f"OUT {out} is inside FOLDER {folder}: the shards would be read as a class of it the next "
                        "time it is scanned; write them outside the folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"OUT {out} is a file, not a folder")
    if not out.is_dir():
        return []
    entries = sorted(out.iterdir())
    if not entries:
        return []
    shard_name = re.compile(rf"{re.escape(prefix)}-\d{{6}}\.tar")
    # a write under way or killed: the swap's mark, or a staging folder (killed before the swap began)
    unfinished = (out / WRITING_MARK).exists() or any(p.name.startswith(STAGING_PREFIX) and p.is_dir()
                                                       for p in entries)
    listed: set[str] = set()
    if (out / SHARDS_INDEX).is_file() and not unfinished:
        listed = set(_read_index(out / SHARDS_INDEX)["samples"])

    def ours(p: Path) -> bool:
        if p.name.startswith(STAGING_PREFIX):  # a staging folder a killed write left behind
            return p.is_dir()
        if p.name in _OWN_FILES or p.name in listed:
            return p.is_file()
        if unfinished and (shard_name.fullmatch(p.name) or (p.name.startswith(".") and p.name.endswith(".tmp"))):
            return p.is_file()
        return False

    foreign = [p for p in entries if not ours(p)]
    if foreign:
        raise UserError(f"OUT {out} holds files that are not shards 'ekdc data shard' wrote ({foreign[0].name}"
                        f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}): give an empty or new folder")
    if not unfinished and not overwrite:
        raise UserError(f"OUT {out} already holds {len(listed)} shards of an earlier write; pass --overwrite to "
                        "replace them, or give an empty or new folder")
    return entries


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _packable(scan, progress) -> tuple[list[int], list[dict], dict[int, str]]:
    """The scanned files training could use, checked as ``data.skip_bad_files`` checks them (each one
    decoded); files with the same bytes in two classes (a hard link, a copy) are left out of both, since
    their label is one or the other. Returns (kept indices, what was left out, each kept file's digest)."""
    left_out = [{"path": p.path, "why": f"{p.kind}: {p.detail}"} for p in scan.problems]
    digests: dict[int, str] = {}
    task = progress.add_task("checking images", total=len(scan.files)) if progress else None
    for i, f in enumerate(scan.files):
        try:
            data = Path(f).read_bytes()
        except OSError as err:
            left_out.append({"path": f, "why": f"unreadable: {err.strerror or err}"})
            continue
        try:
            check_image(io.BytesIO(data), name=f, full=True)
        except UserError as err:  # "cannot read image PATH: why": the path is the entry's own
            left_out.append({"path": f, "why": f"unreadable: {str(err).removeprefix(f'cannot read image {f}: ')}"})
            continue
        digests[i] = _digest(data)
        if task is not None and i % 64 == 0:
            progress.update(task, completed=i)
    if task is not None:
        progress.remove_task(task)
    by_digest: dict[str, list[int]] = collections.defaultdict(list)
    for i, d in digests.items():
        by_digest[d].append(i)
    for group in by_digest.values():
        classes = sorted({scan.classes[int(scan.labels[i])] for i in group})
        if len(classes) > 1:
            for i in group:
                others = [scan.files[j] for j in group if scan.labels[j] != scan.labels[i]]
                left_out.append({"path": scan.files[i], "why": f"in_two_classes: the same bytes as {others[0]} "
                                                              f"(classes {', '.join(classes)}): its label is unsure"})
                digests.pop(i)
    return sorted(digests), left_out, digests


def left_out_summary(left_out: list[dict], where: str) -> list[str]:
    """One line per kind of file left out (the kind is the start of each entry's ``why``)."""
    by_kind: dict[str, list[dict]] = collections.defaultdict(list)
    for e in left_out:
        by_kind[e["why"].split(":", 1)[0]].append(e)
    return [f"left out {len(es)} {kind} (first: {es[0]['path']}: {es[0]['why'].split(': ', 1)[-1]}); {where} lists "
            "them all" for kind, es in by_kind.items()]


def _write_tars(scan, order, shard_size: int, n_shards: int, prefix: str, out: Path, folder: Path,
                digests: dict[int, str], remap: dict[int, int], progress) -> tuple[dict[str, int], dict[str, int]]:
    """The shards themselves: each sample the image's own bytes (checked unchanged since it was decoded)
    and its ``.cls``; each shard written to a temporary name and renamed. Returns samples and bytes a shard."""
    samples: dict[str, int] = {}
    sizes: dict[str, int] = {}
    task = progress.add_task("writing shards", total=n_shards) if progress else None
    for k in range(n_shards):
        name = f"{prefix}-{k:06d}.tar"
        pick = order[k * shard_size : (k + 1) * shard_size]
        with _io.atomic_path(out / name) as tmp, tarfile.open(tmp, "w") as tf:
            for i in pick:
                src = scan.files[i]
                data = Path(src).read_bytes()
                if _digest(data) != digests[int(i)]:
                    raise UserError(f"FOLDER {folder}: {src} changed while it was being sharded; run it again")
                key = f"{k:06d}_{int(i):08d}"
                for ext, blob in ((Path(src).suffix.lower().lstrip(".") or "jpg", data),
                                  ("cls", str(remap[int(scan.labels[i])]).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(blob)
                    tf.addfile(info, io.BytesIO(blob))
        samples[name] = len(pick)
        sizes[name] = (out / name).stat().st_size
        if task is not None:
            progress.update(task, advance=1)
    return samples, sizes


@_io.leaves_no_new_empty_folder("out")
def write_shards(folder: str | os.PathLike, out: str | os.PathLike, shard_size: int = 1000, seed: int = 0,
                 prefix: str = "shard", progress=None, overwrite: bool = False) -> dict:
    """An image folder (``root/<class>/<image>``, scanned as training scans it) as tar shards of
    ``shard_size`` samples in a seeded random order (so that a shard holds every class), each sample the
    image's own bytes and its ``.cls``; then ``classes.txt`` and ``shards.json``.

    Only what training could use is packed: the folder scan's files, each decoded as
    ``data.skip_bad_files`` decodes it; files the scan or the decode leaves out, and files with the same
    bytes in two classes, are listed in ``shards.json`` (``left_out``) and returned. OUT must not be inside
    FOLDER, and must be empty, new, or hold a shard set this function wrote (replaced with ``overwrite``;
    an unfinished one always): it never mixes two writes. The new set is written whole into a staging
    folder inside OUT first; an earlier set is replaced only then (renames, under a mark file that says a
    write is under way), so an interrupted write leaves it as it was."""
    if shard_size < 1:
        raise UserError(f"--shard-size {shard_size}: must be at least 1")
    if seed < 0:
        raise UserError(f"--seed {seed}: must be 0 or more")
    folder, out = Path(folder), Path(out)
    scan = scan_folder(folder, "FOLDER")
    old = _prepare_out(folder, out, prefix, overwrite)
    keep, left_out, digests = _packable(scan, progress)
    used = sorted({int(scan.labels[i]) for i in keep})
    if not keep:
        raise UserError(f"FOLDER {folder}: no image can be packed ({len(left_out)} files left out; 'ekdc data check "
                        f"{folder}' says why)")
    for k, c in enumerate(scan.classes):
        if k not in used:
            left_out.append({"path": str(folder / c), "why": "empty_class: holds no image that can be packed: not a class"})
    if len(used) < 2:  # the scan saw two classes, but what is left of them is one: no classifier trains on it
        raise UserError(f"FOLDER {folder}: only class '{scan.classes[used[0]]}' has an image that can be packed "
                        f"({len(left_out)} left out; 'ekdc data check {folder}' says why): a classifier needs at least 2")
    remap = {old_label: new for new, old_label in enumerate(used)}
    classes = [scan.classes[k] for k in used]
    out = _io.ensure_writable_dir(out)
    order = np.asarray(keep)[np.random.default_rng(seed).permutation(len(keep))]
    n_shards = -(-len(order) // shard_size)
    # the new set is written whole beside the old one, which stays until it is: an interrupted write (Ctrl-C,
    # a full disk) leaves the earlier set as it was; only the renames below run under the mark
    with tempfile.TemporaryDirectory(dir=out, prefix=STAGING_PREFIX) as staging:
        new = Path(staging)
        samples, sizes = _write_tars(scan, order, shard_size, n_shards, prefix, new, folder, digests, remap, progress)
        _io.write_text(new / CLASSES_FILE, "\n".join(classes) + "\n")
        _io.write_json(new / SHARDS_INDEX, {"samples": samples, "bytes": sizes, "classes": classes, "seed": seed,
                                            "source": str(folder.resolve()), "left_out": left_out})
        _io.write_text(out / WRITING_MARK, "an 'ekdc data shard' write is under way (or was killed): run it again\n")
        for p in old:
            if p.name == WRITING_MARK:
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        for p in sorted(new.iterdir(), key=lambda f: f.name == SHARDS_INDEX):  # the index last
            os.replace(p, out / p.name)
    (out / WRITING_MARK).unlink(missing_ok=True)
    return {"out": str(out), "shards": n_shards, "samples": len(order), "classes": len(classes),
            "pattern": f"{out}/{prefix}-{{{0:06d}..{n_shards - 1:06d}}}.tar", "left_out": left_out,
            "replaced": sum(1 for p in old if p.suffix == ".tar")}
