"""Splits read in order, shard by shard (``OrderedSource``): the stream loader for data that cannot be
looked up by index.

Each epoch the shards are shuffled by (seed, epoch); rank r of W takes every W-th shard, and each of its
DataLoader workers every n-th of those; samples pass through a seeded shuffle buffer, and each sample's
augmentation comes from (seed, epoch, its key), so a resumed run sees the views an uninterrupted one
would. Every rank yields the same number of full batches (len // world // batch), starting its shards
again where it runs short, so DistributedDataParallel never waits for a rank that has finished.
"""
from __future__ import annotations

import hashlib
import random
from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..errors import UserError
from .augment import keyed_augment_params
from .config import Augment
from .decode import canonical_size, center_crop, decode_image
from .imageset import Chunk, ImageSet
from .sources import OrderedSource

SHUFFLE_BUFFER = 512  # samples a worker holds to shuffle within its shards
CHUNK = 16  # samples a worker sends at a time


def _seed_of(*parts) -> int:
    return int.from_bytes(hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


class _ShardChunks(IterableDataset):
    """One pass over some shards, in worker processes: decoded samples, with their augmentation parameters,
    in chunks of ``CHUNK``; the main process makes batches of them (``OrderedImages._batches``), so that a
    batch may hold samples of several workers and no worker's last samples are lost to its own batching."""

    def __init__(self, source: OrderedSource, shards: list[str], size: int, view: str, canonical: bool,
                 aug: Optional[Augment] = None, seed: int = 0, epoch: int = 0, shuffle: bool = False):
        self.source, self.shards, self.size, self.view, self.canonical = source, shards, size, view, canonical
        self.aug, self.seed, self.epoch, self.shuffle = aug, seed, epoch, shuffle

    def _samples(self, shards: list[str]) -> Iterator[tuple[str, torch.Tensor, int, str]]:
        for shard in shards:
            try:
                for key, image, label in self.source.read(shard):
                    try:
                        x = decode_image(image, self.size, self.view, name=f"{shard}:{key}")
                        yield key, (x if self.canonical else center_crop(x, self.size)).contiguous(), int(label), ""
                    except UserError as err:  # reported by the main process, in one line
                        yield key, torch.zeros(0, dtype=torch.uint8), -1, str(err)
                        return
            except Exception as err:  # noqa: BLE001 - a shard that cannot be read: one line, not a worker traceback
                detail = str(err) if isinstance(err, UserError) else f"{shard}: {type(err).__name__}: {err}"
                yield "", torch.zeros(0, dtype=torch.uint8), -1, (detail.splitlines() or ["?"])[0][:300]
                return

    def _shuffled(self, samples, rng: random.Random):
        buf = []
        for s in samples:
            buf.append(s)
            if len(buf) >= SHUFFLE_BUFFER:
                yield buf.pop(rng.randrange(len(buf)))
        rng.shuffle(buf)
        yield from buf

    def __iter__(self):
        info = get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        samples = self._samples(self.shards[wid::workers])
        if self.shuffle:
            # seeded by the first shard's name, not its path: shards copied to another folder or machine
            # shuffle the same, so a run is reproduced from the data alone
            first = [str(s).rsplit("/", 1)[-1] for s in self.shards[:1]]
            samples = self._shuffled(samples, random.Random(_seed_of(self.seed, self.epoch, wid, *first)))
        chunk = []
        for s in samples:
            if s[3]:
                yield None, None, None, s[3], self.source.drain()
                return
            chunk.append(s)
            if len(chunk) == CHUNK:
                yield self._collate(chunk)
                chunk = []
        if chunk:
            yield self._collate(chunk)
        notes = self.source.drain()  # what the last shards skipped (data.skip_bad_files), for the main process
        if notes:
            yield None, None, None, "", notes

    def _collate(self, chunk):
        keys = [k for k, *_ in chunk]
        side = canonical_size(self.size, self.view) if self.canonical else self.size
        params = keyed_augment_params(keys, self.aug, self.seed, self.epoch, side)
        return (torch.stack([x for _, x, _, _ in chunk]), torch.tensor([y for _, _, y, _ in chunk]), params, "",
                self.source.drain())


class OrderedImages(ImageSet):
    """An ordered source's split, streamed through worker processes."""

    random_access = False
    streamed = True

    def __init__(self, source: OrderedSource, size: int, view: str, canonical: bool = False, workers: int = 0):
        super().__init__(size, view, canonical)
        self.source, self.workers = source, int(workers)
        self._labels: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.source)

    @property
    def labels(self) -> torch.Tensor:
        """Every label, in the order ``in_order`` gives the images (read without decoding them)."""
        if self._labels is None:
            self._labels = torch.tensor([int(y) for s in self.source.shards for _, _, y in self.source.read(s)],
                                        dtype=torch.int64)
        return self._labels

    def batches(self, index_batches):
        raise UserError("this split is read in order: it has no batches by position (the teacher-output cache and "
                        "positions need a source with random access, or data.loader: memory)")

    def _batches(self, stream: _ShardChunks, workers: int, batch_size: int, keep_last: bool) -> Iterator:
        """The workers' chunks, in the DataLoader's (round-robin, deterministic) order, as batches."""
        xs, ys, ps, n = [], [], [], 0
        for x, y, params, error, notes in DataLoader(stream, batch_size=None, num_workers=workers):
            if notes:  # what a worker skipped (data.skip_bad_files): counted here, in the main process
                self.source.absorb(notes)
            if error:  # one line naming the sample or shard, not the worker's traceback
                raise UserError(error)
            if x is None:
                continue
            xs.append(x), ys.append(y), ps.append(params)
            n += len(y)
            while n >= batch_size:
                bx, by = torch.cat(xs), torch.cat(ys)
                bp = torch.cat(ps) if ps[0] is not None else None
                yield bx[:batch_size], by[:batch_size], None if bp is None else bp[:batch_size]
                xs, ys, ps = [bx[batch_size:]], [by[batch_size:]], [None if bp is None else bp[batch_size:]]
                n -= batch_size
        if keep_last and n:
            yield torch.cat(xs), torch.cat(ys), torch.cat(ps) if ps[0] is not None else None

    def epoch(self, aug: Optional[Augment], seed: int, epoch: int, batch_size: int, rank: int = 0,
              world: int = 1) -> Iterator[Chunk]:
        shards = list(self.source.shards)
        random.Random(_seed_of("shards", seed, epoch)).shuffle(shards)
        mine = shards[rank::world]
        if not mine:
            raise UserError(f"{len(shards)} shards cannot feed {world} ranks: each rank reads shards of its own; "
                            "write the data in more shards")
        steps, done, cycle = max(1, len(self) // world // batch_size), 0, 0
        while done < steps:
            stream = _ShardChunks(self.source, mine, self.size, self.view, self.canonical, aug, seed,
                                  epoch * 1000 + cycle, shuffle=True)
            before = done
            for x, y, params in self._batches(stream, min(self.workers, len(mine)), batch_size, keep_last=False):
                yield Chunk(x, y, torch.full((len(y),), -1, dtype=torch.int64), params)
                done += 1
                if done == steps:
                    return
            if done == before:
                raise UserError(f"rank {rank}'s shards hold fewer than {batch_size} images: no full batch")
            cycle += 1  # this rank's shards ran out first: read them again (another shuffle)

    def in_order(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stream = _ShardChunks(self.source, list(self.source.shards), self.size, self.view, self.canonical)
        for x, y, _ in self._batches(stream, min(1, self.workers), batch_size, keep_last=True):  # one worker: in order
            yield x, y

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.view} {self.canonical} {self.size}".encode())
        for part in self.source.identity():
            h.update(part)
        return h.hexdigest()


def chunks_in_order(source: OrderedSource, n: int, size: int, view: str,
                    chunk: int = 256) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` images (uint8 ``[k,3,c,c]``, c = ``canonical_size``) and labels, ``chunk`` at a
    time, read once, in the main process."""
    c = canonical_size(size, view)
    xs, ys, left = [], [], n
    for shard in source.shards:
        for key, image, label in source.read(shard):
            if left == 0:
                break
            xs.append(decode_image(image, size, view, name=f"{shard}:{key}").reshape(1, 3, c, c))
            ys.append(int(label))
            left -= 1
            if len(xs) == chunk:
                yield torch.cat(xs), torch.tensor(ys, dtype=torch.int64)
                xs, ys = [], []
        if left == 0:
            break
    if xs:
        yield torch.cat(xs), torch.tensor(ys, dtype=torch.int64)


def read_in_order(source: OrderedSource, n: int, size: int, view: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` images and labels at once (see ``chunks_in_order``)."""
    parts = list(chunks_in_order(source, n, size, view))
    if not parts:
        c = canonical_size(size, view)
        return torch.empty(0, 3, c, c, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


__all__ = ["OrderedImages", "chunks_in_order", "read_in_order"]
