"""``ekdc data check``: what an image folder holds, before anything trains on it.

Class counts and the split each gets; what the scan left out and why (links that would relabel,
loops, folders with no image, files reached twice); identical files by content; unreadable files;
image modes and encodings (a JPEG's quality and chroma subsampling); the smallest and largest sizes; class
imbalance. Headers only, unless ``decode``. Problems that would make training wrong (a relabelling link, an
invented class, one image under two classes) set ``wrong``: the command then exits 1.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import os
import time
from pathlib import Path
from typing import Optional

from ..errors import UserError
from .decode import check_image, decode_image
from .folder import PROBLEMS, Problem, scan_folder
from .splits import classes_never_trained, index_splits, untrained_class_words

HASH_CHUNK = 1 << 20


@dataclasses.dataclass
class CheckReport:
    root: str
    classes: list[dict]  # name, images, train, val
    problems: list[dict]  # kind, path, detail, wrong
    identical: list[dict]  # files with the same bytes: paths, classes, wrong (in more than one class)
    unreadable: list[dict]  # path, error
    modes: dict[str, int]
    # how the files are encoded ("PNG", "JPEG q75 4:2:0", ...): a model learns the codec's artefacts too, and a
    # lossy training set scores below published figures on the lossless originals
    encodings: dict[str, int]
    smallest: Optional[tuple[int, int]]
    largest: Optional[tuple[int, int]]
    imbalance: Optional[float]  # the largest class's images / the smallest's
    images: int
    decoded: bool
    split: Optional[str]  # what the split counts follow: the recipe's data, or ekdc's default split
    seconds: float = 0.0

    @property
    def wrong(self) -> bool:
        return any(p["wrong"] for p in self.problems) or any(d["wrong"] for d in self.identical)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "wrong": self.wrong}


def _digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(HASH_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _identical(files: list[str], labels, classes: list[str], unreadable: set[str]) -> list[dict]:
    """Groups of files with the same bytes: sizes first, then a hash of the files that share a size. A file
    that cannot be read is in no group (it is reported as unreadable)."""
    by_size = collections.defaultdict(list)
    for i, f in enumerate(files):
        if f not in unreadable:
            with contextlib.suppress(OSError):
                by_size[os.path.getsize(f)].append(i)
    by_hash = collections.defaultdict(list)
    for group in by_size.values():
        if len(group) > 1:
            for i in group:
                with contextlib.suppress(OSError):  # gone or locked since its header was read
                    by_hash[_digest(files[i])].append(i)
    out = []
    for group in by_hash.values():
        if len(group) > 1:
            names = sorted({classes[int(labels[i])] for i in group})
            out.append({"paths": [files[i] for i in group], "classes": names, "wrong": len(names) > 1})
    return out


def _headers(files: list[str], decode: bool, image_size: int, progress) -> tuple[dict, dict, list, list]:
    modes: dict[str, int] = collections.Counter()
    encodings: dict[str, int] = collections.Counter()
    sizes, unreadable = [], []
    task = progress.add_task("reading headers" if not decode else "decoding", total=len(files)) if progress else None
    for k, f in enumerate(files):
        try:
            header = check_image(f)
            if decode:
                decode_image(f, image_size)
            modes[header.mode] += 1
            encodings[header.encoding] += 1
            sizes.append(header.size)
        except UserError as err:
            unreadable.append({"path": f, "error": str(err)})
        if task is not None and k % 256 == 0:
            progress.update(task, completed=k)
    if task is not None:
        progress.remove_task(task)
    return dict(modes), dict(encodings), sizes, unreadable


def check_images(cfg, *, decode: bool = False, progress=None, split: str = "the recipe's") -> CheckReport:
    """Check the image folder of ``cfg`` (a ``DataConfig`` with ``dataset: imagefolder``)."""
    t0 = time.perf_counter()
    root = Path(cfg.root)
    scan = scan_folder(root, "data.root")
    modes, encodings, sizes, unreadable = _headers(scan.files, decode, cfg.image_size, progress)
    counts = collections.Counter(int(y) for y in scan.labels)
    index = index_splits(cfg) if not unreadable or cfg.skip_bad_files else None
    per_split = {name: collections.Counter(int(y) for y in index.part(name).labels) if index else None
                 for name in ("train", "val")}
    classes = [{"name": c, "images": counts[i],
                "train": per_split["train"][i] if per_split["train"] is not None else None,
                "val": per_split["val"][i] if per_split["val"] is not None and not cfg.val_root else None}
               for i, c in enumerate(scan.classes)]
    areas = sorted(sizes, key=lambda s: s[0] * s[1])
    return CheckReport(
        root=str(root), classes=classes,
        problems=[*({"kind": p.kind, "path": p.path, "detail": p.detail, "wrong": p.makes_training_wrong}
                    for p in scan.problems),
                  # distill stops at the first unreadable file unless told to leave them out
                  *([{"kind": "unreadable", "path": str(root), "wrong": True,
                      "detail": f"{len(unreadable)} file(s) cannot be read (listed below): training stops on "
                                "them unless data.skip_bad_files: true"}] if unreadable and not cfg.skip_bad_files
                    else []),
                  *({"kind": "no_training_image", "path": str(root / name), "wrong": True,
                     "detail": untrained_class_words(name, images, cfg)}
                    for name, images in (classes_never_trained(index) if index else []))],
        identical=_identical(scan.files, scan.labels, scan.classes, {u["path"] for u in unreadable}),
        unreadable=unreadable, modes=modes, encodings=encodings,
        smallest=tuple(areas[0]) if areas else None, largest=tuple(areas[-1]) if areas else None,
        imbalance=(max(counts.values()) / min(counts.values())) if counts else None, images=len(scan.files),
        decoded=decode, split=split if index else None, seconds=round(time.perf_counter() - t0, 2))


def scan_summary(problems: list[Problem], what: str) -> list[str]:
    """One line per kind of problem the scan met (what ``ekdc distill`` says before training)."""
    by_kind: dict[str, list[Problem]] = collections.defaultdict(list)
    for p in problems:
        by_kind[p.kind].append(p)
    return [f"{what}: {len(ps)} {PROBLEMS[k][1]} (first: {ps[0].path}); 'ekdc data check' lists them"
            for k, ps in by_kind.items()]
