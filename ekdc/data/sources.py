"""Where a split's images come from: the ``ImageSource`` protocol and the sources ekdc ships.

A source either gives random access (``IndexedSource``: its labels, and any images by position) or is
read in order, shard by shard (``OrderedSource``: tar shards on a shared file system, say, where looking
an image up by index is not possible). Both name their classes, know their length (an ordered source
may count it in one pass), and say what identifies them, which the teacher-output cache keys on. The
split, the loaders and the cache speak to these two shapes only.
"""
from __future__ import annotations

import os
from typing import IO, ClassVar, Iterator, Optional, Union

import numpy as np
import torch

from .decode import canonical_size, decode_files, resize_square


class ImageSource:
    """What every source has: ``classes``, ``len()``, ``identity()``; ``ordered`` says which kind it is."""

    classes: list[str]
    ordered: ClassVar[bool] = False
    skipped: int = 0  # unreadable files left out (data.skip_bad_files)

    def __len__(self) -> int:  # pragma: no cover - every source defines it
        raise NotImplementedError

    def identity(self, positions: Optional[np.ndarray] = None) -> Iterator[bytes]:
        """Byte strings that change whenever the images (at ``positions``, default all) change."""
        raise NotImplementedError  # pragma: no cover


class IndexedSource(ImageSource):
    """Random access: ``labels[i]`` and ``decode(positions)`` for any positions, in any order."""

    labels: np.ndarray
    # decoding happens in the main process anyway (images held as tensors): nothing to stream
    in_memory: ClassVar[bool] = False

    def __len__(self) -> int:
        return len(self.labels)

    def decode(self, positions: np.ndarray, size: int, view: str) -> torch.Tensor:
        """uint8 ``[n,3,c,c]`` at ``canonical_size(size, view)``, in the order of ``positions``."""
        raise NotImplementedError  # pragma: no cover


class OrderedSource(ImageSource):
    """Read in order: ``shards`` (names or paths), each read by ``read(shard)`` as (key, image, label),
    where the image is a path or an open binary file that ``decode_image`` takes, and the key names the
    sample uniquely within the source (augmentation is drawn per key). ``len()`` is the number of samples."""

    ordered: ClassVar[bool] = True
    shards: list[str]

    def read(self, shard: str) -> Iterator[tuple[str, Union[str, IO[bytes]], int]]:
        raise NotImplementedError  # pragma: no cover

    def drain(self) -> list[dict]:
        """Samples or shards skipped (``data.skip_bad_files``) since the last call, as plain dicts: a worker
        process sends them to the main process, which ``absorb``s them (none by default)."""
        return []

    def absorb(self, notes: list[dict]) -> None:
        """Take what a worker process's copy of this source skipped (see ``drain``)."""

    def report(self) -> dict:
        """What reading skipped so far, for metrics.json (nothing by default)."""
        return {}

    def identity(self, positions: Optional[np.ndarray] = None) -> Iterator[bytes]:
        """Each shard's name, size and modification time (where it is a file)."""
        for s in self.shards:
            try:
                st = os.stat(s)
                yield f"{os.path.abspath(s)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
            except OSError:
                yield f"{s}\n".encode()


class TensorSource(IndexedSource):
    """Images already decoded, uint8 ``[N,3,h,w]`` (torchvision's CIFAR, scikit-learn's digits)."""

    in_memory = True

    def __init__(self, images: torch.Tensor, labels: np.ndarray, classes: list[str]):
        self.images, self.labels, self.classes = images, np.asarray(labels, dtype=np.int64), list(classes)

    def decode(self, positions: np.ndarray, size: int, view: str) -> torch.Tensor:
        return resize_square(self.images[torch.from_numpy(np.asarray(positions, dtype=np.int64))],
                             canonical_size(size, view))

    def identity(self, positions: Optional[np.ndarray] = None) -> Iterator[bytes]:
        x = self.images if positions is None else self.images[torch.from_numpy(np.asarray(positions, dtype=np.int64))]
        yield x.contiguous().numpy().tobytes()


class FileSource(IndexedSource):
    """Image files, decoded when selected (a 10% subset decodes 10%); identified by path, size and
    modification time (hashing a folder larger than memory byte by byte would take as long as training)."""

    def __init__(self, files: list[str], labels: np.ndarray, classes: list[str], skipped: int = 0,
                 problems: Optional[list] = None):
        self.files, self.labels, self.classes = list(files), np.asarray(labels, dtype=np.int64), list(classes)
        self.skipped = skipped
        self.problems = list(problems or [])  # what the folder scan left out, and why (``folder.Problem``)

    def decode(self, positions: np.ndarray, size: int, view: str) -> torch.Tensor:
        return decode_files([self.files[i] for i in positions], size, view)

    def identity(self, positions: Optional[np.ndarray] = None) -> Iterator[bytes]:
        for i in (range(len(self.files)) if positions is None else positions):
            f = self.files[i]
            st = os.stat(f)
            yield f"{os.path.abspath(f)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode()
