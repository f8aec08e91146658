"""WebDataset shards (``data.dataset: webdataset``): tar files read in order, each rank and worker taking
its own shards, through the ``webdataset`` library (local paths, brace notation, ``pipe:`` commands).

    data:
      dataset: webdataset
      urls: "shards/train-{000000..000099}.tar"     # or a YAML list of shard paths
      val_urls: "shards/val-{000000..000009}.tar"
      classes: [cat, dog]                           # or a classes.txt beside the first shard

A sample is what the library groups by key: an image (``.jpg``, ``.jpeg``, ``.png``, ``.webp``, ...) and
its label (``.cls``: the class index as text, or ``.json``: ``{"label": index}`` or ``{"class": name}``).
``ekdc data shard FOLDER OUT`` writes an image folder as such shards, with ``classes.txt`` and
``shards.json`` (the samples each shard holds, so that a split's length is known without reading it).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np

from .. import _io
from ..errors import UserError
from .folder import scan_folder
from .registry import Sources, register_dataset
from .sources import OrderedSource

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
SHARDS_INDEX = "shards.json"
CLASSES_FILE = "classes.txt"


def _wds():
    import webdataset as wds  # the library is an optional extra: pip install 'ekdc[shards]'

    return wds


def expand(urls: Union[str, list[str]], what: str) -> list[str]:
    """Brace notation and ``::`` lists expanded, as the webdataset library expands them."""
    try:
        wds = _wds()
    except ImportError:
        raise UserError(f"{what}: data.dataset webdataset needs the webdataset library; pip install 'ekdc[shards]'") from None
    items = [urls] if isinstance(urls, str) else list(urls)
    out = [u for item in items for u in wds.shardlists.expand_urls(item)]
    if not out:
        raise UserError(f"{what}: no shard named")
    return out


def _local(url: str) -> Optional[Path]:
    return None if url.startswith(("pipe:", "http:", "https:", "gs:", "s3:")) else Path(url.removeprefix("file:"))


def read_classes(cfg_classes: Optional[list[str]], shards: list[str], what: str) -> list[str]:
    """``data.classes``, else a classes.txt beside the first shard (one name a line)."""
    if cfg_classes:
        return list(cfg_classes)
    first = _local(shards[0])
    path = first.parent / CLASSES_FILE if first is not None else None
    if path is None or not path.is_file():
        raise UserError(f"{what}: give data.classes: [...] or put a {CLASSES_FILE} beside the shards ({path or shards[0]})")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names or len(set(names)) != len(names):
        raise UserError(f"{path}: expected distinct class names, one a line")
    return names


def _label(sample: dict, classes: list[str], where: str) -> int:
    if "cls" in sample:
        try:
            y = int(sample["cls"].decode().strip())
        except ValueError:
            raise UserError(f"{where}: its .cls is not a class index") from None
    elif "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            raise UserError(f"{where}: its .json is not valid JSON") from None
        if not isinstance(meta, dict):
            raise UserError(f"{where}: its .json is not a mapping with a label")
        y = meta.get("label", meta.get("cls"))
        if y is None and meta.get("class") in classes:
            y = classes.index(meta["class"])
        if not isinstance(y, int):
            raise UserError(f"{where}: its .json has no label (an index) or class (a name)")
    else:
        raise UserError(f"{where}: the sample has no .cls or .json label")
    if not 0 <= y < len(classes):
        raise UserError(f"{where}: label {y} is outside the {len(classes)} classes")
    return y


class ShardSource(OrderedSource):
    """WebDataset shards as an ``OrderedSource``: samples in each shard's order, keyed by ``__key__``."""

    def __init__(self, shards: list[str], classes: list[str], what: str):
        self.shards, self.classes, self.what = list(shards), list(classes), what
        self._n: Optional[int] = None

    def __len__(self) -> int:
        """From the shards' shards.json where it lists them all; else counted, reading every shard once."""
        if self._n is None:
            self._n = _indexed_count(self.shards)
            if self._n is None:
                self._n = sum(1 for s in self.shards for _ in self._samples(s))
        return self._n

    def _samples(self, shard: str) -> Iterator[dict]:
        wds = _wds()
        try:
            yield from wds.tarfile_samples([{"url": shard}])
        except Exception as err:  # noqa: BLE001 - gopen and tarfile raise several types for one bad shard
            raise UserError(f"{self.what}: cannot read shard {shard} ({(str(err).splitlines() or ['?'])[0][:160]})") from None

    def read(self, shard: str):
        for s in self._samples(shard):
            ext = next((e for e in IMAGE_EXTS if e in s), None)
            where = f"{shard}: sample {s.get('__key__')}"
            if ext is None:
                raise UserError(f"{where}: no image ({', '.join('.' + e for e in IMAGE_EXTS)})")
            yield s["__key__"], io.BytesIO(s[ext]), _label(s, self.classes, where)


def _indexed_count(shards: list[str]) -> Optional[int]:
    """The total from shards.json files beside local shards, when they list every shard."""
    counts: dict[str, int] = {}
    for folder in {p.parent for p in (_local(s) for s in shards) if p is not None}:
        index = folder / SHARDS_INDEX
        if index.is_file():
            counts.update({str(folder / k): v for k, v in json.loads(index.read_text()).get("samples", {}).items()})
    total = 0
    for s in shards:
        p = _local(s)
        if p is None or str(p) not in counts:
            return None
        total += counts[str(p)]
    return total


@register_dataset("webdataset")
def webdataset(cfg) -> Sources:
    if not cfg.urls:
        raise UserError("data.urls: data.dataset webdataset needs the training shards (data.urls)")
    if not cfg.val_urls:
        raise UserError("data.val_urls: shards are read in order, so no validation split can be carved from them; "
                        "give the validation shards (data.val_urls)")
    train = expand(cfg.urls, "data.urls")
    val = expand(cfg.val_urls, "data.val_urls")
    classes = read_classes(cfg.classes, train, "data.urls")
    return Sources(ShardSource(train, classes, "data.urls"), ShardSource(val, classes, "data.val_urls"))


# --------------------------------------------------------------------------------------------------
# writing shards


def write_shards(folder: str | os.PathLike, out: str | os.PathLike, shard_size: int = 1000, seed: int = 0,
                 prefix: str = "shard", progress=None) -> dict:
    """An image folder (``root/<class>/<image>``, scanned as training scans it) as tar shards of
    ``shard_size`` samples in a seeded random order (so that a shard holds every class), each sample the
    image's own bytes and its ``.cls``; then ``classes.txt`` and ``shards.json``. Each shard is written
    to a temporary name and renamed: a killed run leaves whole shards only."""
    if shard_size < 1:
        raise UserError(f"--shard-size {shard_size}: must be at least 1")
    scan = scan_folder(Path(folder), "FOLDER")
    out = _io.ensure_writable_dir(out)
    order = np.random.default_rng(seed).permutation(len(scan.files))
    samples: dict[str, int] = {}
    n_shards = -(-len(order) // shard_size)
    task = progress.add_task("writing shards", total=n_shards) if progress else None
    for k in range(n_shards):
        name = f"{prefix}-{k:06d}.tar"
        pick = order[k * shard_size : (k + 1) * shard_size]
        with _io.atomic_path(out / name) as tmp, tarfile.open(tmp, "w") as tf:
            for i in pick:
                src = scan.files[i]
                key = f"{k:06d}_{int(i):08d}"
                for ext, data in ((Path(src).suffix.lower().lstrip(".") or "jpg", Path(src).read_bytes()),
                                  ("cls", str(int(scan.labels[i])).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        samples[name] = len(pick)
        if task is not None:
            progress.update(task, advance=1)
    _io.write_text(out / CLASSES_FILE, "\n".join(scan.classes) + "\n")
    _io.write_json(out / SHARDS_INDEX, {"samples": samples, "classes": scan.classes, "seed": seed,
                                        "source": str(Path(folder).resolve())})
    return {"out": str(out), "shards": n_shards, "samples": len(order), "classes": len(scan.classes),
            "pattern": f"{out}/{prefix}-{{{0:06d}..{n_shards - 1:06d}}}.tar"}
