"""A cache of teacher outputs on fixed augmented views (FKD: Shen and Xing, ECCV 2022).

The teachers run once on K augmented views of every training image. The student stage then picks, for
each sample and epoch, one of those K views, reconstructs exactly it, and reads the teachers' stored
outputs instead of running them. A cache keyed by freely random views would almost never hit; fixed
views hit every time, at the price of K views per image instead of one fresh view a step.

    <cache folder>/<key[:20]>/
        key.json       what the outputs depend on (teachers' weights, split, augmentation, K, seed,
                       sizes, precision) and the layout; written once the files below are allocated
        views.npy      the views' augmentation parameters, float32 [K, n, P]
        logits.f16     the teachers' logits, fp16 [n, K, M, C], memory-mapped
        feat<m>.f16    teacher m's pooled features [n, K, D_m], where the loss matches features
        done           one byte a chunk of CHUNK images, set once the chunk's outputs are on disk
        seconds        the build's time so far (a resumed build adds to it)
        complete.json  written last: the cache is whole (and how long it took)
        .lock          held by the one process building it

The cache folder (``distill.teacher_cache.path``, by default the run's ``teacher_cache/``) holds caches
by key, so a cache is rebuilt (in a new subfolder) whenever anything its outputs depend on changes, and
is never read for the wrong key, with one exception: a run in reduced precision reads a complete cache
built in fp32 (more exact than its own would be) instead of building one.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import _io
from .._io import FileLock
from ..data import DataSplits, augment, augment_params, canonical_size, param_width
from ..data.decode import DECODER_VERSION
from ..errors import UserError
from ..recipe import Augment, TeacherCacheConfig
from ..teachers import Teacher
from ..training.runtime import Runtime

FORMAT = 1
CHUNK = 256  # images decoded once and run through the teachers in all K views; the unit of resume

TeacherTargets = Callable[[torch.Tensor], tuple[torch.Tensor, Optional[list[torch.Tensor]]]]


@dataclasses.dataclass(frozen=True)
class Layout:
    """The shapes of a cache's arrays."""

    images: int  # n
    views: int  # K
    teachers: int  # M
    classes: int  # C
    feature_dims: tuple[int, ...]  # D_m per teacher; empty without features
    view_params: int  # P: param_width(aug)

    @property
    def chunks(self) -> int:
        return -(-self.images // CHUNK)

    def files(self) -> dict[str, int]:
        """Each memory-mapped file and its size in bytes."""
        n, k = self.images, self.views
        out = {"logits.f16": n * k * self.teachers * self.classes * 2}
        for m, d in enumerate(self.feature_dims):
            out[f"feat{m}.f16"] = n * k * d * 2
        return out

    def bytes_needed(self) -> int:
        return sum(self.files().values()) + self.views * self.images * self.view_params * 4 + self.chunks


def check_cacheable(data: DataSplits) -> None:
    """The cache stores outputs by each training image's position: a split read in order has none."""
    if not data.train.random_access:
        raise UserError("distill.teacher_cache: the training images are read in order (no position to store each "
                        "image's outputs under); set distill.teacher_cache.views: 0, or data.loader: memory")


def cache_key(teachers: list[Teacher], data: DataSplits, aug: Optional[Augment], cfg: TeacherCacheConfig,
              precision: str, features: bool) -> tuple[str, dict]:
    """(the key, the document it hashes): everything the cached outputs depend on."""
    doc = {
        "format": FORMAT,
        "decoder": DECODER_VERSION,  # image folders are known by name, size and time: not by what they decode to
        "teachers": [{"name": t.name, "weights": t.fingerprint(), "input_size": t.input_size} for t in teachers],
        "train_split": data.train.fingerprint(),
        "augment": _augment_doc(aug),
        "image_size": data.image_size,
        "views": cfg.views,
        "seed": cfg.seed,
        "precision": precision,
        "features": features,
    }
    return _key_of(doc), doc


def _key_of(doc: dict) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _augment_doc(aug: Optional[Augment]) -> Optional[dict]:
    """The augmentation as the key hashes it. A key left out at its "off" value (cutout 0) keeps the keys of
    caches built before that key existed: they hold the very views it would build again."""
    if aug is None:
        return None
    doc = aug.model_dump()
    if not doc.get("cutout"):
        doc.pop("cutout", None)
    return doc


def _output_arrays(folder: Path, layout: Layout, mode: str) -> tuple[np.memmap, list[np.memmap]]:
    """The memory-mapped logits ``[n, K, M, C]`` and each teacher's features ``[n, K, D_m]``."""
    shape = (layout.images, layout.views)
    logits = np.memmap(folder / "logits.f16", np.float16, mode, shape=(*shape, layout.teachers, layout.classes))
    feats = [np.memmap(folder / f"feat{m}.f16", np.float16, mode, shape=(*shape, d))
             for m, d in enumerate(layout.feature_dims)]
    return logits, feats


def _size_text(n: int) -> str:
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} bytes"


class TeacherCache:
    """A complete cache, opened for reading: the views of each epoch, and the teachers' outputs on them."""

    def __init__(self, folder: Path, layout: Layout, info: dict):
        self.folder, self.layout, self.info = folder, layout, info
        self.view_params = np.load(folder / "views.npy", mmap_mode="r") if layout.view_params else None
        self.logits, self.features = _output_arrays(folder, layout, "r")

    def views_for_epoch(self, seed: int, epoch: int) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """(each sample's augmentation parameters, which view it is) for one epoch: view
        ``f(seed, epoch, index) mod K``, drawn from a generator of its own."""
        n, k = self.layout.images, self.layout.views
        g = torch.Generator().manual_seed(seed * 15_485_863 + epoch + 17)
        view_of = torch.randint(0, k, (n,), generator=g)
        if self.view_params is None:
            return None, view_of
        params = torch.from_numpy(np.ascontiguousarray(self.view_params[view_of.numpy(), np.arange(n)]))
        return params, view_of

    def targets(self, indices: torch.Tensor, views: torch.Tensor,
                device: torch.device) -> tuple[torch.Tensor, Optional[list[torch.Tensor]]]:
        """The stored teacher logits ``[M,B,C]`` (and pooled features) of these samples' views, in fp32."""
        i, v = indices.numpy(), views.numpy()
        logits = torch.from_numpy(self.logits[i, v]).to(device, non_blocking=True).float().transpose(0, 1)
        feats = [torch.from_numpy(f[i, v]).to(device, non_blocking=True).float() for f in self.features] or None
        return logits, feats


# --------------------------------------------------------------------------------------------------
# opening or building


def open_teacher_cache(cfg: TeacherCacheConfig, run_path: Path, teachers: list[Teacher], data: DataSplits,
                       aug: Optional[Augment], rt: Runtime, teacher_targets: TeacherTargets, features: bool,
                       say: Callable[[str], None], progress=None) -> TeacherCache:
    """The cache for these teachers, data and views: reused when one with the same key is complete,
    else built (resuming a partial build) by every rank together. Collective under ``torchrun``."""
    check_cacheable(data)
    # rank 0's key (hashing the split once, not once a rank), which every rank then uses
    key, doc = rt.from_main(cache_key(teachers, data, aug, cfg, rt.precision_text, features) if rt.is_main else None)
    root = cache_root(cfg, run_path)
    # decided on rank 0 and shared: ranks that looked at the disk each would disagree if a build ended between
    fp32 = rt.from_main((None if _complete(root, key) else _complete_fp32(root, doc)) if rt.is_main else None)
    if fp32 is not None:
        say(f"[dim]teacher cache: reading the complete fp32 cache {fp32} (this run is {doc['precision']}; the "
            f"teachers' fp32 outputs are what its own would approximate)[/dim]")
        folder = fp32
    else:
        folder = _folder_for(root, key, doc)
    layout = Layout(len(data.train), cfg.views, len(teachers), data.num_classes,
                    tuple(t.num_features for t in teachers) if features else (),
                    param_width(aug))
    try:
        if not (folder / "complete.json").exists():
            _build(folder, key, doc, layout, data, aug, cfg.seed, rt, teacher_targets, say, progress)
        info = _read_json(folder / "complete.json")
        _check_files(folder, layout)
        return TeacherCache(folder, layout, info)
    except OSError as err:  # a path that is a file, a read-only or full disk: one line, not a traceback
        where = err.filename or folder
        raise UserError(f"teacher cache: cannot use {where} ({err.strerror or err}); set distill.teacher_cache.path "
                        "to a writable folder") from None


def check_room(cfg: TeacherCacheConfig, run_path: Path, images: int, teachers: int, classes: int) -> None:
    """Before the teachers train: the cache's logits alone fit on the disk it is to be built on (features,
    where matched, add to that; the build checks the exact size again)."""
    need = Layout(images, cfg.views, teachers, classes, (), 0).bytes_needed()
    root = cache_root(cfg, run_path)
    free = shutil.disk_usage(root).free
    if free < need:
        raise UserError(f"teacher cache: {root} needs at least {_size_text(need)} on its disk, and {_size_text(free)} "
                        "is free; free space, set distill.teacher_cache.path to a larger disk, or use fewer views")


def cache_root(cfg: TeacherCacheConfig, run_path: Path) -> Path:
    """The folder the caches are kept in, created now: a path that cannot hold them is refused before
    any teacher trains, not after."""
    root = Path(cfg.path).expanduser().resolve() if cfg.path else (run_path / "teacher_cache").resolve()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"distill.teacher_cache.path: cannot create {root} ({err.strerror or err}); set it to a "
                        "writable folder") from None
    return root


def _folder_for(root: Path, key: str, doc: dict) -> Path:
    """``root/<key[:20]>``; or ``root`` itself where it is one cache's folder (a path copied from a log),
    which must then hold this key."""
    if (root / "key.json").exists():
        held = _read_json(root / "key.json")
        if held.get("key") != key:
            differ = [k for k in doc if held.get("doc", {}).get(k) != doc[k]]
            raise UserError(f"distill.teacher_cache.path: {root} holds a teacher cache made for other "
                            f"{', '.join(differ) or 'inputs'}; point the path at the folder holding caches "
                            f"({root.parent}) to build one for this run")
        return root
    return root / key[:20]


def _complete(root: Path, key: str) -> Optional[Path]:
    """The complete cache of ``key`` under ``root`` (or ``root`` itself, where it is that cache), or None."""
    for folder in (root, root / key[:20]):
        if (folder / "complete.json").exists() and (folder / "key.json").exists():
            if _read_json(folder / "key.json").get("key") == key:
                return folder
    return None


def _complete_fp32(root: Path, doc: dict) -> Optional[Path]:
    """For a run in reduced precision (bf16 autocast, fp16 AMP): the complete cache of the same teachers,
    data and views built in fp32, if there is one. Its outputs are the ones the run's own would only
    approximate, so it is read rather than another built; an fp32 run never reads a reduced-precision one."""
    if doc["precision"] == "fp32":
        return None
    return _complete(root, _key_of({**doc, "precision": "fp32"}))


def _read_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"teacher cache file {path} cannot be read ({err}); delete its folder to rebuild it") from None
    if not isinstance(doc, dict):
        raise UserError(f"teacher cache file {path} is damaged (not a JSON object); delete its folder to rebuild it")
    return doc


def _damage(folder: Path, layout: Layout) -> Optional[str]:
    """What is wrong with a cache folder's files for this layout, or None: every memory-mapped file at its
    size, ``views.npy`` of its shape, one ``done`` byte a chunk. (A short file mapped for writing would
    silently grow with zeros.)"""
    expected = dict(layout.files(), done=layout.chunks)
    for name, size in expected.items():
        have = (folder / name).stat().st_size if (folder / name).is_file() else -1
        if have != size:
            return f"{name} has {have} bytes where {size} are expected" if have >= 0 else f"{name} is missing"
    if layout.view_params:
        try:
            shape = np.load(folder / "views.npy", mmap_mode="r").shape
        except (OSError, ValueError) as err:
            return f"views.npy cannot be read ({err})"
        if shape != (layout.views, layout.images, layout.view_params):
            return f"views.npy has shape {shape}"
    return None


def _check_files(folder: Path, layout: Layout) -> None:
    damage = _damage(folder, layout)
    if damage:
        raise UserError(f"teacher cache {folder} is damaged: {damage}; delete the folder to rebuild it")


def _build(folder: Path, key: str, doc: dict, layout: Layout, data: DataSplits, aug: Optional[Augment], seed: int,
           rt: Runtime, teacher_targets: TeacherTargets, say, progress) -> None:
    """Rank 0 takes the cache's lock and allocates the files (or finds a partial build to resume); every
    rank fills its share of the chunks; rank 0 checks that all are done and marks the cache complete."""
    lock = FileLock(folder / ".lock")

    def prepare():
        folder.mkdir(parents=True, exist_ok=True)
        lock.wait(lambda pid: say(f"teacher cache {folder}: process {pid} is building it; waiting"))
        if not (folder / "complete.json").exists():
            _allocate(folder, key, doc, layout, data, aug, seed, say)

    try:
        rt.on_main(prepare)
        if not (folder / "complete.json").exists():
            before = _seconds_so_far(folder)  # spent by builds of this cache that were interrupted
            t0 = time.perf_counter()

            def spent() -> float:
                return before + time.perf_counter() - t0

            rt.on_every_rank(lambda: _fill(folder, layout, data, aug, rt, teacher_targets, progress, spent))

            def finish():
                missing = int((np.fromfile(folder / "done", dtype=np.uint8) == 0).sum())
                if missing:
                    raise UserError(f"teacher cache {folder}: {missing} chunks were not filled; run again to finish them")
                seconds = round(spent(), 2)
                _io.write_json(folder / "complete.json", {"key": key, "build_seconds": seconds,
                                                          "bytes": layout.bytes_needed()})
                say(f"teacher cache: {layout.images} images x {layout.views} views of {layout.teachers} teachers "
                    f"in {seconds:.1f} s, {_size_text(layout.bytes_needed())} in {folder}")

            rt.on_main(finish)
    finally:
        lock.release()


def _allocate(folder: Path, key: str, doc: dict, layout: Layout, data: DataSplits, aug: Optional[Augment], seed: int,
              say) -> None:
    """Create the cache's files, their full size reserved on disk (so a disk filling up later cannot
    corrupt them), unless a partial build of the same key and layout is there to resume."""
    key_path = folder / "key.json"
    if key_path.exists():
        held = _read_json(key_path)
        same_layout = held.get("layout") == json.loads(json.dumps(dataclasses.asdict(layout)))
        damage = _damage(folder, layout)
        if held.get("key") == key and same_layout and held.get("chunk") == CHUNK and damage is None:
            done = int(np.fromfile(folder / "done", dtype=np.uint8).sum())
            say(f"teacher cache {folder}: resuming, {done}/{layout.chunks} chunks already done")
            return
        if damage:
            say(f"teacher cache {folder}: the partial build is damaged ({damage}); building it again")
        key_path.unlink()
    need = layout.bytes_needed()
    free = shutil.disk_usage(folder).free
    if free < need:
        raise UserError(f"teacher cache: {folder} needs {_size_text(need)} on its disk, and {_size_text(free)} is "
                        "free; free space, set distill.teacher_cache.path to a larger disk, or use fewer views")
    (folder / "seconds").unlink(missing_ok=True)  # another build's time
    for name, size in layout.files().items():
        _reserve(folder / name, size)
    _write_view_params(folder / "views.npy", layout, aug, seed, canonical_size(data.image_size, aug.kind) if aug else 0)
    (folder / "done").write_bytes(bytes(layout.chunks))
    _io.write_json(key_path, {"key": key, "doc": doc, "layout": dataclasses.asdict(layout), "chunk": CHUNK})


def _reserve(path: Path, size: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        if hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
                return
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
        os.ftruncate(fd, size)  # a filesystem without fallocate: the free-space check above must do
    finally:
        os.close(fd)


def _write_view_params(path: Path, layout: Layout, aug: Optional[Augment], seed: int, side: int) -> None:
    """View k of image i is what ``augment_params`` draws for epoch k under the views' seed."""
    if layout.view_params == 0:
        return
    params = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                       shape=(layout.views, layout.images, layout.view_params))
    for k in range(layout.views):
        params[k] = augment_params(layout.images, aug, seed, k, side).float().numpy()
    params.flush()
    del params


def _seconds_so_far(folder: Path) -> float:
    try:
        return float((folder / "seconds").read_text())
    except (OSError, ValueError):
        return 0.0


def _fill(folder: Path, layout: Layout, data: DataSplits, aug: Optional[Augment], rt: Runtime,
          teacher_targets: TeacherTargets, progress, spent: Callable[[], float]) -> None:
    """This rank's chunks not yet done: each decoded once, run through the teachers in every view, its
    outputs flushed to disk before its ``done`` byte is set (a kill at any moment loses at most the
    chunks in flight)."""
    done = np.fromfile(folder / "done", dtype=np.uint8)
    mine = [c for c in range(layout.chunks) if c % rt.world == rt.rank and not done[c]]
    n, k_views = layout.images, layout.views
    logits, feats = _output_arrays(folder, layout, "r+")
    view_params = np.load(folder / "views.npy", mmap_mode="r") if layout.view_params else None
    task = progress.add_task("teacher cache", total=layout.chunks, completed=int(done.sum()), info="") if progress else None
    batches = [torch.arange(c * CHUNK, min(n, (c + 1) * CHUNK)) for c in mine]
    fd = os.open(folder / "done", os.O_WRONLY)
    try:
        for (x_uint8, idx), c in zip(data.train.batches(batches), mine):
            lo, hi = int(idx[0]), int(idx[-1]) + 1
            xb = x_uint8.to(rt.device, non_blocking=True)
            for k in range(k_views):
                view = xb if view_params is None else augment(
                    xb, torch.from_numpy(np.array(view_params[k, lo:hi])).to(rt.device), aug, data.image_size)
                with rt.autocast():
                    t_logits, t_feats = teacher_targets(rt.to_pixels(view))
                if t_logits.shape[-1] != layout.classes:
                    raise UserError(f"teacher cache: the teachers give {t_logits.shape[-1]} outputs where the data has "
                                    f"{layout.classes} classes")
                logits[lo:hi, k] = t_logits.transpose(0, 1).float().cpu().numpy().astype(np.float16)
                for f, tf in zip(feats, t_feats or []):
                    f[lo:hi, k] = tf.float().cpu().numpy().astype(np.float16)
            logits.flush()
            for f in feats:
                f.flush()
            os.pwrite(fd, b"\x01", c)
            if rt.is_main:  # the build's time so far, which a resumed build adds to
                _io.write_text(folder / "seconds", f"{spent():.2f}")
            if task is not None:
                progress.update(task, advance=rt.world)
        os.fsync(fd)
    finally:
        os.close(fd)
        if task is not None:
            progress.remove_task(task)
