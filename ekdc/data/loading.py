"""``load_data``: a recipe's ``data:`` in, the training and validation splits out, decoded into
memory or streamed (``data.loader``), with the normalisation."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch

from ..cores import usable_cores
from ..errors import UserError
from .decode import center_crop
from .imageset import ImageSet, MemoryImages, StreamedImages
from .ordered import OrderedImages, chunks_in_order
from .splits import SplitIndex, classes_never_trained, index_splits, untrained_class_words

MEAN_STD_SAMPLE = 2048  # training images the statistics are estimated from when streaming
STATISTICS_CHUNK = 256  # ... decoded this many at a time


@dataclasses.dataclass
class DataSplits:
    """Train and validation images (``ImageSet``), class names, normalisation."""

    train: ImageSet
    val: ImageSet
    classes: list[str]
    mean: list[float]
    std: list[float]
    image_size: int
    loader: str = "memory"  # what ``data.loader: auto`` chose
    skipped_files: int = 0  # unreadable files left out (data.skip_bad_files)
    problems: list = dataclasses.field(default_factory=list)  # what the folder scans left out (``folder.Problem``)
    index: Optional[SplitIndex] = None  # which images form the splits (``--resume`` checks them: ``fingerprint.py``)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def read_problems(self) -> dict:
        """What reading splits in order has skipped so far (``data.skip_bad_files``): samples that could not
        be used and shards shorter than their ``shards.json`` says, for metrics.json; empty for splits
        with random access (their unreadable files are left out before training: ``skipped_files``)."""
        sources = [s.source for s in (self.train, self.val) if getattr(getattr(s, "source", None), "ordered", False)]
        if not sources:
            return {}
        reports = [src.report() for src in sources]
        return {"skipped_samples": sum(r.get("skipped_samples", 0) for r in reports),
                "short_shards": sorted({s for r in reports for s in r.get("short_shards", [])}),
                "lost_samples": sum(r.get("lost_samples", 0) for r in reports)}

    @property
    def train_y(self) -> torch.Tensor:
        return self.train.labels

    @property
    def val_y(self) -> torch.Tensor:
        return self.val.labels

    @property
    def train_x(self) -> torch.Tensor:
        """The decoded training images (in-memory loader only)."""
        if not isinstance(self.train, MemoryImages):
            raise ValueError("the training split is streamed: iterate data.train.batches(...)")
        return self.train.images

    @property
    def val_x(self) -> torch.Tensor:
        if not isinstance(self.val, MemoryImages):
            raise ValueError("the validation split is streamed: iterate data.val.batches(...)")
        return self.val.images


def streams(cfg, index: SplitIndex) -> bool:
    """Whether ``load_data`` streams this data (``data.loader``, and ``auto``'s choice)."""
    return _stream_chosen(cfg, index)


def _stream_chosen(cfg, index: SplitIndex) -> bool:
    """``stream`` where asked for, or (``auto``) where the decoded splits would exceed the memory budget
    (a source read in order always, under ``auto``: its size is not known before reading it). Sources
    that hold their images as tensors never stream: they are in memory already."""
    source = index.train.source
    if getattr(source, "in_memory", False) or cfg.loader == "memory":
        return False
    if cfg.loader == "stream" or source.ordered:
        return True
    decoded = (index.size("train") + index.size("val")) * 3 * cfg.image_size ** 2
    return decoded > cfg.memory_budget_gb * 2**30


def _image_set(index: SplitIndex, split: str, stream: bool, workers: int, canonical: bool = False) -> ImageSet:
    part, cfg = index.part(split), index.cfg
    kw = dict(size=cfg.image_size, view=cfg.view, canonical=canonical)
    if not stream:
        x, y = index.take(split, canonical=canonical)
        return MemoryImages(x, y, **kw)
    if part.source.ordered:
        return OrderedImages(part.source, workers=workers, **kw)
    return StreamedImages(part.source, part.positions, workers=workers, **kw)


def _statistics(cfg, index: SplitIndex, train: ImageSet) -> tuple[list[float], list[float]]:
    """The recipe's mean/std, else the training split's: exact in memory, from a seeded sample of
    ``MEAN_STD_SAMPLE`` images when streaming (the first ones, for a source read in order), decoded and
    summed a chunk at a time so that the sample never sits in memory whole."""
    if cfg.mean is not None and cfg.std is not None:
        return list(cfg.mean), list(cfg.std)
    if train.streamed:
        n, s1, s2 = 0, torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        for x in _sample_chunks(cfg, index, len(train)):
            f = x.double().div_(255)
            n += f.numel() // 3
            s1 += f.sum(dim=(0, 2, 3))
            s2 += f.pow(2).sum(dim=(0, 2, 3))
        m = s1 / n
        mean_v, std_v = m.tolist(), ((s2 / n - m * m) * n / max(1, n - 1)).clamp_min(0).sqrt().tolist()
    else:
        f = center_crop(train.images, cfg.image_size).float().div_(255)  # evaluation's view, as the sample above
        mean_v, std_v = f.mean(dim=(0, 2, 3)).tolist(), f.std(dim=(0, 2, 3)).tolist()
    mean = cfg.mean or [round(v, 4) for v in mean_v]
    std = cfg.std or [round(max(v, 1e-3), 4) for v in std_v]
    return list(mean), list(std)


def _sample_chunks(cfg, index: SplitIndex, n: int):
    """The statistics' sample, ``STATISTICS_CHUNK`` decoded images at a time: a seeded draw (random access),
    the first images (read once, in order)."""
    k = min(n, MEAN_STD_SAMPLE)
    source = index.train.source
    if source.ordered:
        for x, _ in chunks_in_order(source, k, cfg.image_size, cfg.view, STATISTICS_CHUNK):
            yield center_crop(x, cfg.image_size)
        return
    pick = np.sort(index.sample("train", k, cfg.split_seed))
    for lo in range(0, len(pick), STATISTICS_CHUNK):
        yield index.take("train", pick[lo : lo + STATISTICS_CHUNK])[0]


def load_data(cfg) -> DataSplits:
    """The splits, decoded into memory or streamed (``data.loader``), with the normalisation."""
    index = index_splits(cfg)
    for name, images in classes_never_trained(index)[:1]:
        raise UserError(f"data.root: {untrained_class_words(name, images, cfg)}")
    stream = _stream_chosen(cfg, index)
    workers = cfg.workers if cfg.workers is not None else min(4, usable_cores())
    aug = cfg.augment_config
    train = _image_set(index, "train", stream, workers, canonical=aug is not None and aug.kind == "resized_crop")
    val = _image_set(index, "val", stream, workers)
    mean, std = _statistics(cfg, index, train)
    sources = {id(p.source): p.source for p in (index.train, index.val)}
    return DataSplits(train=train, val=val, classes=list(index.classes), mean=mean, std=std,
                      image_size=cfg.image_size, loader="stream" if stream else "memory",
                      skipped_files=sum(s.skipped for s in sources.values()),
                      problems=[p for s in sources.values() for p in getattr(s, "problems", [])], index=index)


