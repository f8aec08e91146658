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
``shards.json`` (the samples and bytes each shard holds, so that a split's length is known without
reading it, and a shard cut short or written again is noticed).

What the reader checks: ``data.classes`` against the ``classes.txt`` beside the shards (the labels are
indices into it); a shard that the ``shards.json`` beside it does not list (shards of two writes mixed);
each shard's size and sample count against ``shards.json``; each sample's label and, with
``data.skip_bad_files``, its image. A problem stops the run in one line, or (``skip_bad_files``) the
sample or what is left of the shard is skipped and counted (``metrics.json``: ``skipped_samples``,
``short_shards``, and ``lost_samples``, the samples short shards no longer hold).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Iterator, Optional, Union

from ..errors import UserError
from .decode import check_image
from .registry import Sources, register_dataset
from .sources import OrderedSource

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
SHARDS_INDEX = "shards.json"
CLASSES_FILE = "classes.txt"
WRITING_MARK = ".ekdc-shard-writing"  # present while ``write_shards`` writes into a folder (removed when done)


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


def _names_in(path: Path) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    if not names or len(set(names)) != len(names):
        raise UserError(f"{path}: expected distinct class names, one a line")
    return names


def _classes_files(shards: list[str]) -> list[Path]:
    """The classes.txt beside each local shard's folder (those that exist), in the shards' order."""
    seen: dict[Path, None] = {}
    for s in shards:
        p = _local(s)
        if p is not None and (p.parent / CLASSES_FILE).is_file():
            seen.setdefault(p.parent / CLASSES_FILE)
    return list(seen)


def read_classes(cfg_classes: Optional[list[str]], shards: list[str], what: str) -> list[str]:
    """``data.classes``, else a classes.txt beside the first shard (one name a line). Where both exist they
    must agree: the shards' labels are indices into their classes.txt, and another order would train
    with classes swapped. Shards in several folders must have one classes.txt between them."""
    files = {f: _names_in(f) for f in _classes_files(shards)}
    if cfg_classes:
        for path, names in files.items():
            _same_classes(list(cfg_classes), names, "data.classes", path)
        return list(cfg_classes)
    first = _local(shards[0])
    path = first.parent / CLASSES_FILE if first is not None else None
    if path is None or path not in files:
        raise UserError(f"{what}: give data.classes: [...] or put a {CLASSES_FILE} beside the shards ({path or shards[0]})")
    for other, names in files.items():
        _same_classes(files[path], names, str(path), other)
    return files[path]


def _same_classes(given: list[str], names: list[str], what: str, path: Path) -> None:
    if given == names:
        return
    if sorted(given) == sorted(names):
        k = next(i for i, (a, b) in enumerate(zip(given, names)) if a != b)
        raise UserError(f"{what} lists the classes in another order than {path} (label {k} is '{names[k]}' there, "
                        f"'{given[k]}' here): the shards' labels are indices into {path}; give them in its order "
                        f"({', '.join(names)}), or leave data.classes out")
    raise UserError(f"{what} ({', '.join(given)}) are not the classes of {path} ({', '.join(names)}): the shards' "
                    f"labels are indices into {path}")


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
    """WebDataset shards as an ``OrderedSource``: samples in each shard's order, keyed by ``__key__``.

    Each local shard is checked against the ``shards.json`` beside it (listed, its size, its sample count);
    with ``skip_bad`` a sample that cannot be used (no image, no label, an image ekdc cannot decode) and
    the missing end of a short shard are skipped and noted (``skips``) instead of stopping the run."""

    def __init__(self, shards: list[str], classes: list[str], what: str, skip_bad: bool = False):
        self.shards, self.classes, self.what, self.skip_bad = list(shards), list(classes), what, bool(skip_bad)
        self._n: Optional[int] = None
        self._index = _shard_index(self.shards, what)  # shard -> (samples, bytes or None), local shards listed
        self.skips: dict[tuple[str, str, str], str] = {}  # (kind, shard, key) -> what was wrong; the report
        self._pending: list[dict] = []  # the same, not yet sent from a worker process to the main one

    def __len__(self) -> int:
        """From the shards' shards.json where it lists them all; else counted, reading every shard once."""
        if self._n is None:
            counts = [self._index.get(s, (None, None))[0] for s in self.shards]
            self._n = sum(counts) if all(c is not None for c in counts) else None
            if self._n is None:
                self._n = sum(1 for s in self.shards for _ in self._samples(s))
        return self._n

    def _samples(self, shard: str) -> Iterator[dict]:
        wds = _wds()
        try:
            yield from wds.tarfile_samples([{"url": shard}])
        except Exception as err:  # noqa: BLE001 - gopen and tarfile raise several types for one bad shard
            raise UserError(f"{self.what}: cannot read shard {shard} ({(str(err).splitlines() or ['?'])[0][:160]})") from None

    def note(self, kind: str, shard: str, key: str, detail: str) -> None:
        """A sample or shard skipped (``skip_bad``): kept for the report, and for the main process."""
        if (kind, shard, key) not in self.skips:
            self.skips[(kind, shard, key)] = detail
            self._pending.append({"kind": kind, "shard": shard, "key": key, "detail": detail})

    def drain(self) -> list[dict]:
        """The notes made since the last call (a worker process sends them with its next chunk)."""
        out, self._pending = self._pending, []
        return out

    def absorb(self, notes: list[dict]) -> None:
        for n in notes:
            self.skips.setdefault((n["kind"], n["shard"], n["key"]), n["detail"])

    def report(self) -> dict:
        """What was skipped, for metrics.json."""
        bad = [(s, k, d) for (kind, s, k), d in self.skips.items() if kind == "bad_sample"]
        short = sorted({s for (kind, s, _) in self.skips if kind == "short_shard"})
        lost = sum(int(k) for (kind, _, k) in self.skips if kind == "lost_samples")
        return {"skipped_samples": len(bad), "short_shards": short, "lost_samples": lost,
                "first_skipped": (f"{bad[0][0]}: sample {bad[0][1]}: {bad[0][2]}" if bad else None)}

    def _short(self, shard: str, detail: str) -> None:
        msg = f"{self.what}: shard {shard} {detail}"
        if not self.skip_bad:
            raise UserError(f"{msg}; write the shards again, or set data.skip_bad_files: true to train on what it "
                            "holds (counted in metrics.json)")
        self.note("short_shard", shard, "", detail)

    def read(self, shard: str):
        expected, size = self._index.get(shard, (None, None))
        local = _local(shard)
        if size is not None and local is not None:
            try:
                actual = local.stat().st_size
            except OSError:
                actual = None  # reading it says why
            if actual is not None and actual != size:
                self._short(shard, f"is {actual:,} bytes, {SHARDS_INDEX} says {size:,} (cut short, or written again "
                                   "since?)")
        n, samples = 0, self._samples(shard)
        while True:
            try:
                s = next(samples)
            except StopIteration:
                break
            except UserError as err:  # the tar itself ends in the middle of a member
                if not self.skip_bad:
                    raise
                self.note("short_shard", shard, "", f"unreadable after {n} samples ({err})")
                self._lost(shard, expected, n)
                return
            n += 1
            key = str(s.get("__key__"))
            where = f"{shard}: sample {key}"
            try:
                ext = next((e for e in IMAGE_EXTS if e in s), None)
                if ext is None:
                    raise UserError(f"{where}: no image ({', '.join('.' + e for e in IMAGE_EXTS)})")
                y = _label(s, self.classes, where)
                if self.skip_bad:  # decoded here, as the folder loader's skip_bad_files does: training never meets it
                    check_image(io.BytesIO(s[ext]), name=f"{shard}:{key}", full=True)
            except UserError as err:
                if not self.skip_bad:
                    raise
                self.note("bad_sample", shard, key, str(err))
                continue
            yield key, io.BytesIO(s[ext]), y
        if expected is not None and n != expected:
            self._short(shard, f"holds {n:,} samples, {SHARDS_INDEX} lists {expected:,} (cut short, or written again "
                               "since?)")
            self._lost(shard, expected, n)

    def _lost(self, shard: str, expected: Optional[int], read: int) -> None:
        """The samples a short shard no longer holds (where its shards.json counts them): a note whose key is
        the count, so that a worker process sends it to the main one as it sends the others."""
        if expected is not None and expected > read:
            self.note("lost_samples", shard, str(expected - read), "")


def _shard_index(shards: list[str], what: str) -> dict[str, tuple[int, Optional[int]]]:
    """Each local shard's (samples, bytes) from the shards.json beside it. A shard in a folder whose
    shards.json does not list it, or a folder an 'ekdc data shard' is still writing, is one line."""
    out: dict[str, tuple[int, Optional[int]]] = {}
    folders: dict[Path, Optional[dict]] = {}
    for s in shards:
        p = _local(s)
        if p is None:
            continue
        if p.parent not in folders:
            index = p.parent / SHARDS_INDEX
            if (p.parent / WRITING_MARK).exists():
                raise UserError(f"{what}: {p.parent} holds an unfinished 'ekdc data shard' write; run it again")
            folders[p.parent] = _read_index(index) if index.is_file() else None
        meta = folders[p.parent]
        if meta is None:
            continue
        samples, sizes = meta.get("samples") or {}, meta.get("bytes") or {}
        if p.name not in samples and not p.exists():  # a pattern wider than the set (an earlier, larger write)
            names = sorted(samples)
            listed = f"{names[0]} .. {names[-1]}" if len(names) > 1 else (names[0] if names else "none")
            raise UserError(f"{what}: {s} does not exist; {p.parent / SHARDS_INDEX} lists {len(names)} shards "
                            f"({listed}): fix {what} to name those")
        if p.name not in samples:
            raise UserError(f"{what}: {s} is not listed in {p.parent / SHARDS_INDEX}, which lists {len(samples)} other "
                            "shards: shards of two writes are mixed in that folder; write them again into an empty one")
        out[s] = (int(samples[p.name]), int(sizes[p.name]) if p.name in sizes else None)
    return out


def _read_index(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {getattr(err, 'strerror', None) or err}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("samples"), dict):
        raise UserError(f"{path}: not a {SHARDS_INDEX} that 'ekdc data shard' wrote (no samples mapping)")
    return meta


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
    for path in _classes_files(val):  # the validation shards' labels must index the same classes
        _same_classes(classes, _names_in(path), "the training shards' classes", path)
    skip = cfg.skip_bad_files
    return Sources(ShardSource(train, classes, "data.urls", skip), ShardSource(val, classes, "data.val_urls", skip))
