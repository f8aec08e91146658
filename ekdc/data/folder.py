"""Image folders (``data.dataset: imagefolder``): ``root/<class>/<image>``, any depth below the class."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import UserError
from .decode import IMG_EXTENSIONS
from .registry import Sources, register_dataset
from .sources import FileSource


def scan_folder(root: Path, what: str) -> tuple[list[str], list[str], np.ndarray]:
    """Class folders and their images, in sorted order of relative path: the same list (and so the same
    seeded split) on any copy of the folder, whatever order the filesystem lists it in."""
    if not root.is_dir():
        raise UserError(f"{what}: folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for ci, c in enumerate(classes):
        found, seen = [], set()
        for dirpath, dirnames, names in os.walk(root / c, followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:  # a symbolic link back up the tree: walk it once
                dirnames[:] = []
                continue
            seen.add(real)
            found += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMG_EXTENSIONS)]
        found.sort(key=lambda f: os.path.relpath(f, root).split(os.sep))
        files += found
        labels += [ci] * len(found)
    if not files:
        raise UserError(f"{what}: no images in class folders under {root} (expected {root}/<class>/<image>)")
    return classes, files, np.asarray(labels, dtype=np.int64)


def readable(files: list[str], labels: np.ndarray, what: str) -> tuple[list[str], np.ndarray]:
    """The files whose image header reads (``data.skip_bad_files``): the others are left out of the
    split, and counted."""
    from PIL import Image, UnidentifiedImageError

    keep = []
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im.verify()
            keep.append(i)
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
            pass
    if not keep:
        raise UserError(f"{what}: no readable image among {len(files)} files")
    return [files[i] for i in keep], np.asarray(labels)[keep]


def folder_source(root: str, what: str, skip_bad_files: bool) -> FileSource:
    classes, files, labels = scan_folder(Path(root), what)
    scanned = len(files)
    if skip_bad_files:
        files, labels = readable(files, labels, what)
    return FileSource(files, labels, classes, skipped=scanned - len(files))


@register_dataset("imagefolder")
def imagefolder(cfg) -> Sources:
    train = folder_source(cfg.root, "data.root", cfg.skip_bad_files)
    if not cfg.val_root:
        return Sources(train)
    val = folder_source(cfg.val_root, "data.val_root", cfg.skip_bad_files)
    if val.classes != train.classes:
        raise UserError(f"data.val_root: class folders {val.classes} differ from data.root's {train.classes}")
    return Sources(train, val)
