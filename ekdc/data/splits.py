"""Seeded, stratified splits: which images form the training and validation splits, decided before
any image is decoded."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np
import torch

from ..errors import UserError
from .decode import canonical_size, center_crop
from .ordered import chunks_in_order, read_in_order
from .registry import get_dataset
from .sources import ImageSource, IndexedSource


def stratified_split(
    labels: np.ndarray, *, fraction: float | None = None, per_class: int | None = None, seed: int = 0,
    candidates: np.ndarray | None = None, names: Optional[list[str]] = None, key: str = "",
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``candidates`` (indices into ``labels``, default all) into (picked, rest), stratified by
    class: ``per_class`` items of each class, or ``fraction`` of each class (at least one).
    Seeded and independent of the input order. ``names`` and ``key`` (the recipe key asking) word the
    error of a class too small."""
    labels = np.asarray(labels)
    idx = np.arange(len(labels)) if candidates is None else np.sort(np.asarray(candidates))
    rng = np.random.default_rng(seed)
    picked, rest = [], []
    for c in np.unique(labels[idx]):
        members = idx[labels[idx] == c]
        members = members[rng.permutation(len(members))]
        k = per_class if per_class is not None else max(1, int(round(fraction * len(members))))
        if k > len(members):
            name = f"'{names[int(c)]}'" if names is not None else str(c)
            raise UserError(f"{key + ': ' if key else ''}class {name} has {len(members)} images, fewer than the {k} "
                            "asked for")
        picked.append(members[:k])
        rest.append(members[k:])
    return np.sort(np.concatenate(picked)), np.sort(np.concatenate(rest))


@dataclasses.dataclass
class Split:
    """One split: a source and, for a source with random access, the positions in it that form the split
    (an ordered source's split is the whole source, in its order)."""

    source: ImageSource
    positions: Optional[np.ndarray]

    def __len__(self) -> int:
        return len(self.source) if self.positions is None else len(self.positions)

    @property
    def labels(self) -> Optional[np.ndarray]:
        """The split's labels in order (None for an ordered source: they arrive with the images)."""
        if self.positions is None:
            return None
        return np.asarray(self.source.labels)[self.positions]


@dataclasses.dataclass
class SplitIndex:
    """Which images form the training and validation splits, before any image is decoded: a caller that
    needs a few images (int8 calibration, a bench) decodes just those with ``take``."""

    cfg: object  # the recipe's data: (DataConfig)
    classes: list[str]
    train: Split
    val: Split

    def part(self, split: str) -> Split:
        return self.train if split == "train" else self.val

    def size(self, split: str) -> int:
        return len(self.part(split))

    def take(self, split: str, positions: np.ndarray | None = None,
             canonical: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (uint8 ``[n,3,S,S]``, evaluation's view at the recipe's size; with ``canonical``, the
        decode training crops from) and labels of a split, or of the given positions in it (in that order).
        An ordered source gives its first images instead (``positions`` must then be ``range(n)``-like)."""
        part = self.part(split)
        size, view = self.cfg.image_size, self.cfg.view
        if part.source.ordered:
            n = len(part) if positions is None else len(positions)
            x, y = read_in_order(part.source, n, size, view)
        else:
            idx = part.positions if positions is None else part.positions[np.asarray(positions, dtype=np.int64)]
            x, y = part.source.decode(idx, size, view), torch.from_numpy(np.asarray(part.source.labels)[idx])
        if not canonical:
            x = center_crop(x, size)
        return x.contiguous(), y

    def sample(self, split: str, n: int, seed: int) -> np.ndarray:
        """Positions of ``n`` images of a split: a seeded draw (random access), the first ``n`` (in order)."""
        total = self.size(split)
        n = min(n, total)
        if self.part(split).source.ordered:
            return np.arange(n)
        return np.random.default_rng(seed).choice(total, n, replace=False)


class SplitImages:
    """A split's images (evaluation's view, uint8 ``[n,3,S,S]``), decoded a slice at a time as a caller
    reads them (``images[i:j]``, ``len(images)``): what export's parity and accuracy take for data that is
    streamed, instead of the whole split decoded at once. A source read in order is read on from where
    the last slice ended (slices in order, as a pass over the split takes them), and again from its start
    for a slice before that."""

    def __init__(self, index: SplitIndex, split: str, positions: Optional[np.ndarray] = None):
        self.index, self.split = index, split
        self.source = index.part(split).source
        self.positions = None if positions is None else np.asarray(positions, dtype=np.int64)
        self.n = index.size(split) if positions is None else len(self.positions)
        self._reader, self._at, self._buf = None, 0, None

    def __len__(self) -> int:
        return self.n

    def labels(self) -> np.ndarray:
        """The labels, in order (read without decoding the images)."""
        if self.source.ordered:
            ys = [int(y) for s in self.source.shards for _, _, y in self.source.read(s)]
            return np.asarray(ys[: self.n], dtype=np.int64)
        part = self.index.part(self.split)
        pos = part.positions if self.positions is None else part.positions[self.positions]
        return np.asarray(part.source.labels)[pos]

    def __getitem__(self, key) -> torch.Tensor:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("SplitImages takes slices images[i:j]")
        i, j, _ = key.indices(self.n)
        if not self.source.ordered:
            pos = np.arange(i, j) if self.positions is None else self.positions[i:j]
            return self.index.take(self.split, pos)[0]
        size, view = self.index.cfg.image_size, self.index.cfg.view
        if self._reader is None or i < self._at:
            self._reader, self._at = chunks_in_order(self.source, self.n, size, view), 0
            c = canonical_size(size, view)
            self._buf = torch.empty(0, 3, c, c, dtype=torch.uint8)
        while self._at + len(self._buf) < j:
            x, _ = next(self._reader)
            self._buf = torch.cat([self._buf, x])
        out = self._buf[i - self._at : j - self._at]
        self._buf, self._at = self._buf[j - self._at :], j
        return center_crop(out, size).contiguous()


def index_splits(cfg) -> SplitIndex:
    """The data set the recipe names, a seeded stratified validation split carved from it (unless it
    has its own), and optionally a seeded stratified subset of the rest for training (limited data)."""
    train_src, val_src = get_dataset(cfg.dataset)(cfg)
    if len(train_src.classes) < 2:  # any source: a shard set of one class, a plugin's, a folder after skip_bad_files
        where = " ".join(str(x) for x in (cfg.dataset, getattr(cfg, "root", None) or getattr(cfg, "urls", None)) if x)
        raise UserError(f"data ({where}): one class ({', '.join(map(str, train_src.classes)) or 'none'}): a "
                        "classifier needs at least 2, or it trains and scores 100% while learning nothing")
    for src, which in ((train_src, "training"), (val_src, "validation")):  # a plugin's labels, above all
        if isinstance(src, IndexedSource) and len(src.labels):
            lo, hi = int(np.min(src.labels)), int(np.max(src.labels))
            if lo < 0 or hi >= len(train_src.classes):
                raise UserError(f"data ({cfg.dataset}): the {which} labels run from {lo} to {hi}, but a label is a "
                                f"class's index, 0 .. {len(train_src.classes) - 1} for its {len(train_src.classes)} "
                                f"classes ({', '.join(map(str, train_src.classes[:5]))}"
                                f"{', ...' if len(train_src.classes) > 5 else ''})")
    limited = cfg.per_class is not None or cfg.train_fraction is not None
    if train_src.ordered:
        if val_src is None:
            raise UserError(f"data.dataset {cfg.dataset}: its images are read in order, so no validation split can be "
                            "carved from them; give the data set a validation source of its own")
        if limited:
            raise UserError(f"data.per_class / data.train_fraction: {cfg.dataset}'s images are read in order, so a "
                            "stratified subset cannot be drawn from them; subset the data itself")
        _refuse_shared(train_src, val_src)
        return SplitIndex(cfg, list(train_src.classes), Split(train_src, None), _whole(val_src))
    if val_src is None:
        vk = dict(per_class=cfg.val_per_class) if cfg.val_per_class else dict(fraction=cfg.val_fraction)
        val_idx, train_idx = stratified_split(train_src.labels, seed=cfg.split_seed, names=list(train_src.classes),
                                              key="data.val_per_class" if cfg.val_per_class else "", **vk)
        val = Split(train_src, val_idx)
    else:
        _refuse_shared(train_src, val_src)
        val, train_idx = _whole(val_src), np.arange(len(train_src))
    if limited:
        # a second, independent stream: the limited subset never depends on the validation draw
        train_idx, _ = stratified_split(
            train_src.labels, per_class=cfg.per_class, fraction=cfg.train_fraction, seed=cfg.split_seed + 1,
            candidates=train_idx, names=list(train_src.classes), key="data.per_class" if cfg.per_class else "",
        )
    return SplitIndex(cfg, list(train_src.classes), Split(train_src, train_idx), val)


def _refuse_shared(train_src: ImageSource, val_src: ImageSource) -> None:
    """A validation source of its own (data.val_root, data.val_urls) that holds training files scores the model
    on images it trained on: an accuracy that looks fine and means nothing. Files (and shards) are compared by
    their real paths; copies under other names are ``ekdc data check``'s duplicate search's to find."""
    items = [getattr(src, "files", None) or getattr(src, "shards", None) for src in (train_src, val_src)]
    if any(x is None for x in items):  # a built-in or plugin source: nothing to compare by
        return
    real = [{(x if "://" in str(x) else os.path.realpath(x)): x for x in xs} for xs in items]
    shared = [real[1][r] for r in real[1] if r in real[0]]
    if shared:
        kind, key = ("files", "data.val_root") if getattr(val_src, "files", None) else ("shards", "data.val_urls")
        raise UserError(f"{key}: the validation data holds {len(shared)} of the training data's {len(items[0])} {kind} "
                        f"(first: {shared[0]}): it would score the model on images it trained on; give {key} data of "
                        "its own, or leave it out to carve a validation split")


def _whole(source: ImageSource) -> Split:
    return Split(source, np.arange(len(source)) if isinstance(source, IndexedSource) else None)


def classes_never_trained(index: SplitIndex) -> list[tuple[str, int]]:
    """(name, images) of each class the training split holds no image of: a class of one image, or of no
    more than data.val_per_class, goes to validation whole. A student would carry such a class untrained."""
    labels = index.train.labels
    if labels is None:  # an ordered source: its labels arrive with its images
        return []
    trained = np.bincount(labels.astype(np.int64), minlength=len(index.classes))
    every = np.bincount(np.asarray(index.train.source.labels).astype(np.int64), minlength=len(index.classes))
    return [(index.classes[i], int(every[i])) for i in np.flatnonzero(trained == 0)]


def untrained_class_words(name: str, images: int, cfg) -> str:
    if images == 0:
        return (f"class '{name}' has no image at all (the data set names it but holds none): a student would carry "
                "it untrained; give it images, or leave it out of the data set")
    carve = f"data.val_per_class is {cfg.val_per_class}" if cfg.val_per_class else \
        f"data.val_fraction {cfg.val_fraction} takes at least one image a class"
    return (f"class '{name}' has no training image: its {images} image(s) all go to the validation split "
            f"({carve}); add images to it, or remove its folder")
