"""Image folders (``data.dataset: imagefolder``): ``root/<class>/<image>``, any depth below the class.

The scan cannot relabel an image: each file is taken once, by its real path, under the class folder it
is listed in. Symbolic links are followed where they lead outside the root (data linked in from
elsewhere) or elsewhere inside their own class folder (taken once); a link that leads back into the root
or to a folder above it (a loop) or into another class's folder (it would give that class's images this
class's label) is not followed, and said. A file that is not an image ekdc reads (a .gif, a .txt) and
a link that leads nowhere are left out, and said. A folder that holds no image is no class: it is said and left
out, so the student, the exports and ``infer.py`` never carry a class that was never trained.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from ..errors import UserError
from .decode import IMG_EXTENSIONS, check_image
from .registry import Sources, register_dataset
from .sources import FileSource

# what the scan left out: whether it means the folder is wrong (``ekdc data check`` exits 1 on those), and
# how a count of them reads in the one line ``ekdc distill`` says of each kind (``check.scan_summary``)
PROBLEMS = {
    "loop": (True, "links back into the root or above it, not followed"),
    "other_class_link": (True, "links into another class's folder (they would relabel its images), not followed"),
    "in_two_classes": (True, "files linked into two classes, kept in the first only"),
    "empty_class": (True, "folders with no image, not classes"),
    "split_folders": (True, "class folders named like splits (train, val, test), not like classes: is the root one "
                            "level too high?"),
    "duplicate_path": (False, "files reached twice (through links), taken once"),
    "not_image": (False, "files that are not images ekdc reads, left out"),
    "broken_link": (False, "links that lead nowhere, left out"),
}


# names a data set's split folders go by: two of them as class folders mean the root is one level too high
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}


@dataclasses.dataclass
class Problem:
    kind: str  # a key of PROBLEMS
    path: str  # where the scan met it
    detail: str

    @property
    def makes_training_wrong(self) -> bool:
        return PROBLEMS[self.kind][0]


@dataclasses.dataclass
class FolderScan:
    classes: list[str]
    files: list[str]  # as listed under their class folder (the path training opens)
    labels: np.ndarray
    real: list[str]  # each file's real path
    problems: list[Problem]


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class _ClassWalk:
    """One class folder's images, each real path once; links judged as the module docstring says."""

    def __init__(self, root_real: str, class_dirs: dict[str, str], name: str):
        self.root_real, self.class_dirs, self.name = root_real, class_dirs, name
        self.found: dict[str, str] = {}  # real path -> the path it was listed under
        self.problems: list[Problem] = []
        self._dirs_seen: set[str] = set()

    def _link_problem(self, target: str) -> str | None:
        if _inside(self.root_real, target):  # the root itself, or a folder above it
            return "loop"
        if _inside(target, self.root_real):
            owner = next((c for c, d in self.class_dirs.items() if _inside(target, d)), None)
            if owner != self.name:
                return "other_class_link"
        return None

    def walk(self, folder: str) -> None:
        real = os.path.realpath(folder)
        if real in self._dirs_seen:  # a link to a folder of this class already walked
            return
        self._dirs_seen.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            raise UserError(f"data.root: cannot list {folder} ({err.strerror or err})") from None
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                self._take(e)
            except OSError as err:  # a link into a folder this user may not enter, a file gone meanwhile
                raise UserError(f"data.root: cannot read {e.path} ({err.strerror or err})") from None

    def _take(self, e: os.DirEntry) -> None:
        """One entry of a class folder: an image taken, a folder walked, or a problem said."""
        target = os.path.realpath(e.path)
        if e.is_symlink() and not os.path.exists(target):  # wherever it points, there is nothing to take
            self.problems.append(Problem("broken_link", e.path, f"a link to {target}, which does not exist: "
                                                                "left out"))
            return
        if e.is_symlink():
            kind = self._link_problem(target)
            if kind is not None:
                where = "the root or a folder above it" if kind == "loop" else "another class's folder"
                self.problems.append(Problem(kind, e.path, f"a link to {target}, inside {where}: not followed"))
                return
        if e.is_dir():
            self.walk(e.path)
        elif not e.name.lower().endswith(IMG_EXTENSIONS):
            ext = os.path.splitext(e.name)[1] or "no extension"
            self.problems.append(Problem("not_image", e.path, f"{ext} is not an image ekdc reads: left out"))
        elif not os.path.isfile(target):  # a pipe or a socket named like an image
            self.problems.append(Problem("not_image", e.path, "not a regular file: left out"))
        elif target in self.found:
            self.problems.append(Problem("duplicate_path", e.path, f"the same file as {self.found[target]}: "
                                                                   "taken once"))
        else:
            self.found[target] = e.path


def scan_folder(root: Path, what: str) -> FolderScan:
    """Class folders and their images, in sorted order of relative path: the same list (and so the same
    seeded split) on any copy of the folder, whatever order the filesystem lists it in."""
    if not root.is_dir():
        raise UserError(f"{what}: {root} is a file, not a folder of class folders" if root.exists()
                        else f"{what}: folder not found: {root}")
    root_real = os.path.realpath(root)
    try:
        names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as err:
        raise UserError(f"{what}: cannot list {root} ({err.strerror or err})") from None
    class_dirs = {c: os.path.realpath(root / c) for c in names}
    classes, files, labels, real, problems = [], [], [], [], []
    owner: dict[str, str] = {}  # real path -> the class that took it (a file linked in from outside by two)
    for c in names:
        if _inside(root_real, class_dirs[c]):  # a class folder that is a link to the root or above it
            problems.append(Problem("loop", str(root / c), f"a link to {class_dirs[c]}: not followed"))
            continue
        walk = _ClassWalk(root_real, class_dirs, c)
        walk.walk(str(root / c))
        problems += walk.problems
        for r in [r for r in walk.found if r in owner]:
            problems.append(Problem("in_two_classes", walk.found.pop(r), f"the same file as one of class "
                                                                         f"'{owner[r]}': left out of '{c}'"))
        owner.update({r: c for r in walk.found})
        if not walk.found:
            problems.append(Problem("empty_class", str(root / c), "holds no image: not a class"))
            continue
        listed = sorted(walk.found.items(), key=lambda kv: os.path.relpath(kv[1], root).split(os.sep))
        classes.append(c)
        files += [p for _, p in listed]
        real += [r for r, _ in listed]
        labels += [len(classes) - 1] * len(listed)
    if not files:
        raise UserError(f"{what}: no images in class folders under {root} (expected {root}/<class>/<image>)")
    splits = [c for c in classes if c.lower() in SPLIT_NAMES]
    if len(splits) >= 2:  # root/train/<class>/..., root/val/<class>/...: each split would become a class
        problems.append(Problem("split_folders", str(root), f"its class folders {splits} are named like splits: "
                                                            "point data.root at the training folder (and "
                                                            "data.val_root at the validation one)"))
    if len(classes) < 2:  # trains and scores 100% while learning nothing
        raise UserError(f"{what}: one class folder with images under {root} ({classes[0]}): a classifier needs at "
                        f"least 2 (expected {root}/<class>/<image>, one folder a class)")
    return FolderScan(classes, files, np.asarray(labels, dtype=np.int64), real, problems)


def readable(files: list[str], labels: np.ndarray, what: str) -> tuple[list[str], np.ndarray]:
    """The files whose header reads and whose size and mode ekdc decodes (``data.skip_bad_files``): the
    others are left out of the split, and counted."""
    keep = []
    for i, f in enumerate(files):
        try:
            check_image(f, full=True)  # decoded: a truncated JPEG passes the header check
            keep.append(i)
        except UserError:
            pass
    if not keep:
        raise UserError(f"{what}: no readable image among {len(files)} files")
    return [files[i] for i in keep], np.asarray(labels)[keep]


def folder_source(root: str, what: str, skip_bad_files: bool) -> FileSource:
    scan = scan_folder(Path(root), what)
    files, labels, classes, problems = scan.files, scan.labels, scan.classes, list(scan.problems)
    if skip_bad_files:
        files, labels = readable(files, labels, what)
        left = sorted(set(int(y) for y in labels))
        if len(left) < len(classes):  # a class whose every image was unreadable is no class either
            problems += [Problem("empty_class", str(Path(root) / c), "holds no readable image: not a class")
                         for k, c in enumerate(classes) if k not in left]
            remap = {old: new for new, old in enumerate(left)}
            labels = np.asarray([remap[int(y)] for y in labels], dtype=np.int64)
            classes = [classes[k] for k in left]
    return FileSource(files, labels, classes, skipped=len(scan.files) - len(files), problems=problems)


@register_dataset("imagefolder")
def imagefolder(cfg) -> Sources:
    train = folder_source(cfg.root, "data.root", cfg.skip_bad_files)
    if not cfg.val_root:
        return Sources(train)
    val = folder_source(cfg.val_root, "data.val_root", cfg.skip_bad_files)
    if val.classes != train.classes:
        raise UserError(f"data.val_root: class folders {val.classes} differ from data.root's {train.classes}")
    return Sources(train, val)
