"""A split's images as training and evaluation read them: decoded once into memory, or streamed
(decoded batch by batch in DataLoader worker processes, so that a data set larger than memory trains),
from a source with random access or one read in order. Every loader gives the same batches for the same
(seed, epoch): the order and the augmentation are functions of them and of each sample's position or key.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, NamedTuple, Optional

import numpy as np
import torch

from ..errors import UserError
from .augment import augment_params, epoch_order, iterate_batches
from .config import Augment
from .decode import canonical_size, center_crop
from .sources import IndexedSource


class Chunk(NamedTuple):
    """One training batch as a loader gives it."""

    images: torch.Tensor  # uint8 [B,3,c,c] (c: canonical_size for resized crops, else the image size)
    labels: torch.Tensor  # int64 [B]
    ids: torch.Tensor  # int64 [B]: each sample's position in the split (-1: read in order, no position)
    aug_params: Optional[torch.Tensor]  # each sample's augmentation parameters (None: not augmented)


class ImageSet:
    """One split's images, as uint8 ``[3,S,S]`` at the recipe's size (with ``canonical``, the larger
    decode that training crops from)."""

    random_access = True  # batches by position (``batches``); False: read in order only
    streamed = False

    def __init__(self, size: int, view: str, canonical: bool):
        self.size, self.view, self.canonical = int(size), view, canonical

    @property
    def side(self) -> int:
        return canonical_size(self.size, self.view) if self.canonical else self.size

    def __len__(self) -> int:  # pragma: no cover - every loader defines it
        raise NotImplementedError

    @property
    def labels(self) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def batches(self, index_batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, their positions) for each batch of positions, in order (random access only)."""
        raise NotImplementedError  # pragma: no cover

    def epoch(self, aug: Optional[Augment], seed: int, epoch: int, batch_size: int, rank: int = 0,
              world: int = 1) -> Iterator[Chunk]:
        """One epoch of training batches for this rank: shuffled by (seed, epoch), full batches only, the
        same number on every rank; with ``aug``, each sample's augmentation parameters."""
        n = len(self)
        order = epoch_order(n, seed, epoch, rank, world)
        table = augment_params(n, aug, seed, epoch, self.side if aug is not None else 0)
        for x, idx in self.batches(list(iterate_batches(len(order), batch_size, order, drop_last=True))):
            yield Chunk(x, self.labels[idx], idx, None if table is None else table[idx])

    def in_order(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of every image once, in the split's order (evaluation)."""
        for x, idx in self.batches(list(iterate_batches(len(self), batch_size))):
            yield x, self.labels[idx]

    def fingerprint(self) -> str:
        """What identifies these images and labels (the teacher-output cache's key)."""
        raise NotImplementedError  # pragma: no cover


class MemoryImages(ImageSet):
    """Decoded once, held as one uint8 tensor."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, size: int, view: str, canonical: bool = False):
        super().__init__(size, view, canonical)
        self.images, self._labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    def batches(self, index_batches):
        for idx in index_batches:
            yield self.images[idx], idx

    def fingerprint(self) -> str:
        h = hashlib.sha256(self._labels.numpy().tobytes())
        h.update(f"{self.view} {self.canonical} {self.size}".encode())
        h.update(self.images.contiguous().numpy().tobytes())
        return h.hexdigest()


class _DecodeOne:
    """One sample of a random-access source, decoded in a DataLoader worker (the main process's decode)."""

    def __init__(self, source: IndexedSource, size: int, view: str, canonical: bool):
        self.source, self.size, self.view, self.canonical = source, size, view, canonical

    def __getitem__(self, position: int) -> tuple[torch.Tensor, str]:
        try:
            x = self.source.decode(np.asarray([position]), self.size, self.view)[0]
            return (x if self.canonical else center_crop(x, self.size)).contiguous(), ""
        except UserError as err:  # reported by the main process, in one line
            side = canonical_size(self.size, self.view) if self.canonical else self.size
            return torch.zeros(3, side, side, dtype=torch.uint8), str(err)


def _collate_decoded(items):
    return torch.stack([x for x, _ in items]), [e for _, e in items if e]


class StreamedImages(ImageSet):
    """A random-access source's split, decoded batch by batch in worker processes."""

    streamed = True

    def __init__(self, source: IndexedSource, positions: np.ndarray, size: int, view: str, canonical: bool = False,
                 workers: int = 0):
        super().__init__(size, view, canonical)
        self.source, self.positions, self.workers = source, np.asarray(positions, dtype=np.int64), int(workers)
        self._labels = torch.from_numpy(np.asarray(source.labels)[self.positions])

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def labels(self) -> torch.Tensor:
        return self._labels

    def batches(self, index_batches):
        from torch.utils.data import DataLoader

        loader = DataLoader(_DecodeOne(self.source, self.size, self.view, self.canonical),
                            batch_sampler=[self.positions[b.numpy()].tolist() for b in index_batches],
                            num_workers=self.workers, collate_fn=_collate_decoded)
        for (x, errors), idx in zip(loader, index_batches):
            if errors:  # one line naming the file, not the worker's traceback
                raise UserError(errors[0])
            yield x, idx

    def fingerprint(self) -> str:
        h = hashlib.sha256(self._labels.numpy().tobytes())
        h.update(f"{self.view} {self.canonical} {self.size}".encode())
        for part in self.source.identity(self.positions):
            h.update(part)
        return h.hexdigest()
