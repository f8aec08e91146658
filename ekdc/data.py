"""Data sets, seeded stratified splits, and batch augmentation.

``index_splits`` says which images form each split without decoding them; ``load_data`` decodes both
splits once into uint8 tensors ``[N, 3, H, W]`` kept in memory for training; batches are
augmented as tensors (random crop after zero padding, horizontal flip) on the training device.
Augmentation parameters are a pure function of (seed, epoch, sample index), so a resumed run sees
the very views an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError
from .recipe import CENTER_CROP, Augment, DataConfig

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


class ImageSet:
    """One split's images, as uint8 ``[3,S,S]`` at the recipe's size: held decoded in memory, or
    streamed (decoded from their files batch by batch in DataLoader worker processes, so a folder
    larger than memory trains). Both give the same batch for the same indices."""

    def __init__(self, images: "torch.Tensor | None" = None, files: "list[str] | None" = None, size: int = 0,
                 workers: int = 0, view: str = "pad_crop", canonical: bool = False):
        self.images, self.files, self.size, self.workers = images, files, int(size), int(workers)
        # canonical: the decode training crops from (a resized_crop view is larger than the image size)
        self.view, self.canonical = view, canonical

    @property
    def streamed(self) -> bool:
        return self.images is None

    def __len__(self) -> int:
        return len(self.files) if self.streamed else len(self.images)

    def batches(self, index_batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, their indices) for each batch of indices, in order."""
        if not self.streamed:
            for idx in index_batches:
                yield self.images[idx], idx
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(_FileImages(self.files, self.size, self.view, self.canonical),
                            batch_sampler=[b.tolist() for b in index_batches],
                            num_workers=self.workers, collate_fn=_collate_decoded)
        for (x, errors), idx in zip(loader, index_batches):
            if errors:  # one line naming the file, not the worker's traceback
                raise UserError(errors[0])
            yield x, idx


class _FileImages:
    """Decodes one file per item (in a DataLoader worker): the same decode as the in-memory path."""

    def __init__(self, files: list[str], size: int, view: str, canonical: bool):
        self.files, self.size, self.view, self.canonical = files, size, view, canonical

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        side = canonical_size(self.size, self.view) if self.canonical else self.size
        try:
            x = _decode([self.files[i]], self.size, self.view)[0]
            return (x if self.canonical else center_crop(x, self.size)).contiguous(), ""
        except UserError as err:  # reported by the main process, in one line
            return torch.zeros(3, side, side, dtype=torch.uint8), str(err)


def _collate_decoded(items):
    return torch.stack([x for x, _ in items]), [e for _, e in items if e]


@dataclasses.dataclass
class DataSplits:
    """Train and validation images (``ImageSet``) and labels (int64), class names, normalisation."""

    train: ImageSet
    train_y: torch.Tensor
    val: ImageSet
    val_y: torch.Tensor
    classes: list[str]
    mean: list[float]
    std: list[float]
    image_size: int
    loader: str = "memory"  # what ``data.loader: auto`` chose
    skipped_files: int = 0  # unreadable files left out (data.skip_bad_files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def train_x(self) -> torch.Tensor:
        """The decoded training images (in-memory loader only)."""
        if self.train.streamed:
            raise ValueError("the training split is streamed: iterate data.train.batches(...)")
        return self.train.images

    @property
    def val_x(self) -> torch.Tensor:
        if self.val.streamed:
            raise ValueError("the validation split is streamed: iterate data.val.batches(...)")
        return self.val.images


# --------------------------------------------------------------------------------------------------
# splits


def stratified_split(
    labels: np.ndarray, *, fraction: float | None = None, per_class: int | None = None, seed: int = 0,
    candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``candidates`` (indices into ``labels``, default all) into (picked, rest), stratified by
    class: ``per_class`` items of each class, or ``fraction`` of each class (at least one).
    Seeded and independent of the input order."""
    labels = np.asarray(labels)
    idx = np.arange(len(labels)) if candidates is None else np.sort(np.asarray(candidates))
    rng = np.random.default_rng(seed)
    picked, rest = [], []
    for c in np.unique(labels[idx]):
        members = idx[labels[idx] == c]
        members = members[rng.permutation(len(members))]
        k = per_class if per_class is not None else max(1, int(round(fraction * len(members))))
        if k > len(members):
            raise UserError(f"class {c} has {len(members)} images, fewer than the {k} asked for")
        picked.append(members[:k])
        rest.append(members[k:])
    return np.sort(np.concatenate(picked)), np.sort(np.concatenate(rest))


# --------------------------------------------------------------------------------------------------
# data set registry: each returns (images uint8 [N,3,H,W], labels, classes, val or None)

_DATASETS: dict[str, Callable] = {}


def register_dataset(fn: Callable) -> Callable:
    _DATASETS[fn.__name__.lstrip("_")] = fn
    return fn


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.round().clamp(0, 255).to(torch.uint8)


@register_dataset
def _cifar10(cfg: DataConfig):
    return _torchvision_cifar(cfg, "CIFAR10")


@register_dataset
def _cifar100(cfg: DataConfig):
    return _torchvision_cifar(cfg, "CIFAR100")


def _torchvision_cifar(cfg: DataConfig, cls_name: str):
    """The official training split (from which validation is carved, like every data set here)."""
    import torchvision

    root = cfg.root or "data"
    try:
        ds = getattr(torchvision.datasets, cls_name)(root, train=True, download=cfg.download)
    except RuntimeError as err:
        raise UserError(
            f"data.root: {cls_name} not found under '{root}' ({str(err).splitlines()[0]}); "
            "set data.download: true to fetch it"
        ) from None
    x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return x, np.asarray(ds.targets, dtype=np.int64), list(ds.classes), None


def _scan_folder(root: Path, what: str) -> tuple[list[str], list[str], np.ndarray]:
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


def canonical_size(size: int, view: str) -> int:
    """The side of the square every image is decoded to: the image size for ``pad_crop``; for
    ``resized_crop``, size / 0.875 (training crops from it, evaluation takes its centre)."""
    return size if view == "pad_crop" else int(round(size / CENTER_CROP))


def _decode(files: list[str], size: int, view: str = "pad_crop") -> torch.Tensor:
    """Files as uint8 ``[n,3,c,c]``, c = ``canonical_size``: any mode made RGB; ``pad_crop`` resizes to the
    square, ``resized_crop`` resizes the shorter side to c and keeps the centre square."""
    from PIL import Image

    c = canonical_size(size, view)
    out = torch.empty(len(files), 3, c, c, dtype=torch.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                if view == "pad_crop":
                    im = im.resize((c, c), Image.BILINEAR) if im.size != (c, c) else im
                else:
                    w, h = im.size
                    k = c / min(w, h)
                    im = im.resize((max(c, round(w * k)), max(c, round(h * k))), Image.BILINEAR)
                    left, top = (im.size[0] - c) // 2, (im.size[1] - c) // 2
                    im = im.crop((left, top, left + c, top + c))
                out[i] = torch.from_numpy(np.array(im)).permute(2, 0, 1)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read image {f}: {err}") from None
    return out


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size`` x ``size`` of images ``[...,c,c]`` (evaluation's view of a ``resized_crop`` decode)."""
    c = x.shape[-1]
    if c == size:
        return x
    o = (c - size) // 2
    return x[..., o : o + size, o : o + size]


def eval_preprocess(cfg: DataConfig) -> dict:
    """How a raw photo becomes the model's input, for the ONNX metadata (``export/infer.py`` follows it)."""
    if cfg.view == "pad_crop":
        return {"resize": cfg.image_size}
    return {"resize_shorter": canonical_size(cfg.image_size, "resized_crop"), "center_crop": cfg.image_size}


class _LazyFolder:
    """An image folder whose files are decoded only when selected (a 10% subset decodes 10%)."""

    def __init__(self, files: list[str], size: int, skipped: int = 0, view: str = "pad_crop"):
        self.files, self.size, self.view = files, size, view
        self.skipped = skipped  # unreadable files left out (data.skip_bad_files)

    def __len__(self) -> int:
        return len(self.files)

    def take(self, idx: np.ndarray) -> torch.Tensor:
        return _decode([self.files[i] for i in idx], self.size, self.view)


@register_dataset
def _imagefolder(cfg: DataConfig):
    classes, files, labels = _scan_folder(Path(cfg.root), "data.root")
    scanned = len(files)
    if cfg.skip_bad_files:
        files, labels = _readable(files, labels, "data.root")
    val = None
    if cfg.val_root:
        vclasses, vfiles, vlabels = _scan_folder(Path(cfg.val_root), "data.val_root")
        if vclasses != classes:
            raise UserError(f"data.val_root: class folders {vclasses} differ from data.root's {classes}")
        vscanned = len(vfiles)
        if cfg.skip_bad_files:
            vfiles, vlabels = _readable(vfiles, vlabels, "data.val_root")
        val = (_LazyFolder(vfiles, cfg.image_size, skipped=vscanned - len(vfiles), view=cfg.view), vlabels)
    return _LazyFolder(files, cfg.image_size, skipped=scanned - len(files), view=cfg.view), labels, classes, val


def _readable(files: list[str], labels: np.ndarray, what: str) -> tuple[list[str], np.ndarray]:
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


@register_dataset
def _digits(cfg: DataConfig):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images): offline, in every install."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None].repeat(1, 3, 1, 1)
    return x, d.target.astype(np.int64), [str(i) for i in range(10)], None


@register_dataset
def _synthetic(cfg: DataConfig):
    """Learnable random data for tests: one smooth random template per class, plus noise."""
    g = torch.Generator().manual_seed(1234)
    k, n, s = cfg.num_classes, cfg.num_samples, cfg.image_size
    templates = F.interpolate(torch.rand(k, 3, 4, 4, generator=g), size=(s, s), mode="bilinear", align_corners=False)
    labels = torch.arange(n) % k
    x = templates[labels] * 0.7 + torch.rand(n, 3, s, s, generator=g) * 0.3
    return (x * 255).round().to(torch.uint8), labels.numpy(), [f"class_{i}" for i in range(k)], None


def _take(images, idx: np.ndarray) -> torch.Tensor:
    if isinstance(images, _LazyFolder):
        return images.take(idx)
    return images[torch.from_numpy(idx)]


@dataclasses.dataclass
class SplitIndex:
    """Which images form the training and validation splits, before any image is decoded: an image
    folder is only scanned, so a caller that needs a few images (int8 calibration, a bench) decodes
    just those with ``take``."""

    cfg: DataConfig
    classes: list[str]
    train_images: object  # uint8 tensor [N,3,h,w] or a lazily decoded folder
    train_labels: np.ndarray
    train_idx: np.ndarray  # positions in train_images
    val_images: object
    val_labels: np.ndarray
    val_idx: np.ndarray

    def part(self, split: str) -> tuple[object, np.ndarray, np.ndarray]:
        """(images, labels, the split's positions in them) of ``train`` or ``val``."""
        if split == "train":
            return self.train_images, self.train_labels, self.train_idx
        return self.val_images, self.val_labels, self.val_idx

    def size(self, split: str) -> int:
        return len(self.part(split)[2])

    def take(self, split: str, positions: np.ndarray | None = None,
             canonical: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (uint8 ``[n,3,S,S]``, evaluation's view at the recipe's size; with ``canonical``, the
        decode training crops from) and labels of a split, or of the given positions in it (in that order)."""
        images, labels, idx = self.part(split)
        if positions is not None:
            idx = idx[np.asarray(positions, dtype=np.int64)]
        x = _resize(_take(images, idx), canonical_size(self.cfg.image_size, self.cfg.view))
        if not canonical:
            x = center_crop(x, self.cfg.image_size)
        return x.contiguous(), torch.from_numpy(np.asarray(labels)[idx])


def index_splits(cfg: DataConfig) -> SplitIndex:
    """The data set the recipe names, a seeded stratified validation split carved from it (unless it
    has its own), and optionally a seeded stratified subset of the rest for training (limited data)."""
    images, labels, classes, val = _DATASETS[cfg.dataset](cfg)
    if val is None:
        vk = dict(per_class=cfg.val_per_class) if cfg.val_per_class else dict(fraction=cfg.val_fraction)
        val_idx, train_idx = stratified_split(labels, seed=cfg.split_seed, **vk)
        val_images, val_labels = images, labels
    else:
        val_images, val_labels = val
        val_idx, train_idx = np.arange(len(val_labels)), np.arange(len(labels))
    if cfg.per_class is not None or cfg.train_fraction is not None:
        # a second, independent stream: the limited subset never depends on the validation draw
        train_idx, _ = stratified_split(
            labels, per_class=cfg.per_class, fraction=cfg.train_fraction, seed=cfg.split_seed + 1,
            candidates=train_idx,
        )
    return SplitIndex(cfg, classes, images, np.asarray(labels), train_idx, val_images, np.asarray(val_labels), val_idx)


MEAN_STD_SAMPLE = 2048  # training images the statistics are estimated from when streaming


def _stream_chosen(cfg: DataConfig, index: SplitIndex) -> bool:
    """``stream`` where asked for, or (``auto``) where the decoded splits would exceed the memory budget.
    Only image folders stream: the other data sets come as tensors already."""
    if not isinstance(index.train_images, _LazyFolder) or cfg.loader == "memory":
        return False
    if cfg.loader == "stream":
        return True
    decoded = (len(index.train_idx) + len(index.val_idx)) * 3 * cfg.image_size ** 2
    return decoded > cfg.memory_budget_gb * 2**30


def _image_set(index: SplitIndex, split: str, stream: bool, workers: int,
               canonical: bool = False) -> tuple[ImageSet, torch.Tensor]:
    kw = dict(size=index.cfg.image_size, view=index.cfg.view, canonical=canonical)
    if not stream:
        x, y = index.take(split, canonical=canonical)
        return ImageSet(images=x, **kw), y
    source, labels, idx = index.part(split)
    files = [source.files[i] for i in idx]
    return ImageSet(files=files, workers=workers, **kw), torch.from_numpy(np.asarray(labels)[idx])


def _statistics(cfg: DataConfig, index: SplitIndex, train: ImageSet) -> tuple[list[float], list[float]]:
    """The recipe's mean/std, else the training split's: exact in memory, from a seeded sample of
    ``MEAN_STD_SAMPLE`` images when streaming."""
    if cfg.mean is not None and cfg.std is not None:
        return list(cfg.mean), list(cfg.std)
    if train.streamed:
        n = len(train)
        pick = np.sort(np.random.default_rng(cfg.split_seed).choice(n, min(n, MEAN_STD_SAMPLE), replace=False))
        x, _ = index.take("train", pick)
    else:
        x = center_crop(train.images, cfg.image_size)  # evaluation's view, as the sample above
    f = x.float().div_(255)
    mean = cfg.mean or [round(v, 4) for v in f.mean(dim=(0, 2, 3)).tolist()]
    std = cfg.std or [round(max(v, 1e-3), 4) for v in f.std(dim=(0, 2, 3)).tolist()]
    return list(mean), list(std)


def load_data(cfg: DataConfig) -> DataSplits:
    """The splits, decoded into memory or streamed (``data.loader``), with the normalisation."""
    index = index_splits(cfg)
    stream = _stream_chosen(cfg, index)
    from .contract import usable_cores

    workers = cfg.workers if cfg.workers is not None else min(4, usable_cores())
    aug = cfg.augment_config
    train, train_y = _image_set(index, "train", stream, workers, canonical=aug is not None and aug.kind == "resized_crop")
    val, val_y = _image_set(index, "val", stream, workers)
    mean, std = _statistics(cfg, index, train)
    folders = {id(f): f for f in (index.train_images, index.val_images) if isinstance(f, _LazyFolder)}
    return DataSplits(train=train, train_y=train_y, val=val, val_y=val_y, classes=list(index.classes), mean=mean,
                      std=std, image_size=cfg.image_size, loader="stream" if stream else "memory",
                      skipped_files=sum(f.skipped for f in folders.values()))


# --------------------------------------------------------------------------------------------------
# batches and augmentation


@dataclasses.dataclass
class Batch:
    """One training step's input: what a ``forward_train`` gets."""

    pixels: torch.Tensor  # augmented, RGB in [0,1], on the training device (what teachers take)
    images: torch.Tensor  # the same, normalised with the data's statistics (what the student takes)
    labels: torch.Tensor  # int64 [B]
    indices: torch.Tensor  # each sample's position in the training split (int64 [B], CPU)
    epoch: int  # 0-based
    views: Optional[torch.Tensor] = None  # with a teacher cache: which fixed view each sample is (int64 [B], CPU)


def augment_params(n: int, aug: Augment | None, seed: int, epoch: int, side: int = 0) -> torch.Tensor | None:
    """Per-sample crop and flip parameters for one epoch, a pure function of (seed, epoch) and the sample's
    index: pad_crop (dy, dx, flip); resized_crop (top, left, height, width, flip) of a crop from the
    ``side`` x ``side`` decode, as RandomResizedCrop draws them (area share in ``scale``, aspect ratio in
    ``ratio``, log-uniform), drawn here rather than from the global RNG."""
    if aug is None:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    if aug.kind == "resized_crop":
        area = side * side * (aug.scale[0] + (aug.scale[1] - aug.scale[0]) * torch.rand(n, generator=g, dtype=torch.float64))
        lo, hi = np.log(aug.ratio[0]), np.log(aug.ratio[1])
        ratio = torch.exp(lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64))
        w = torch.sqrt(area * ratio).clamp(1, side)
        h = torch.sqrt(area / ratio).clamp(1, side)
        top = (side - h) * torch.rand(n, generator=g, dtype=torch.float64)
        left = (side - w) * torch.rand(n, generator=g, dtype=torch.float64)
        flip = torch.randint(0, 2, (n,), generator=g) if aug.hflip else torch.zeros(n, dtype=torch.long)
        return torch.stack([top, left, h, w, flip.double()], 1).float()
    p = aug.crop_padding
    dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
    flip = torch.randint(0, 2, (n,), generator=g) if aug.hflip else torch.zeros(n, dtype=torch.long)
    return torch.stack([dy, dx, flip], 1)


def augment(x: torch.Tensor, params: torch.Tensor, aug: Augment, size: int) -> torch.Tensor:
    """A batch of uint8 decodes -> uint8 training views at ``size``, by ``aug.kind``."""
    if aug.kind == "resized_crop":
        return resized_crop_batch(x, params, size)
    return augment_batch(x, params.long(), aug.crop_padding)


def resized_crop_batch(x: torch.Tensor, params: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's crop (top, left, height, width) resized to ``size`` (bilinear, in one batched
    ``roi_align``), then flipped where asked: uint8 ``[B,3,size,size]``."""
    from torchvision.ops import roi_align

    top, left, h, w, flip = params.float().unbind(1)
    idx = torch.arange(len(x), dtype=torch.float32, device=x.device)
    boxes = torch.stack([idx, left, top, left + w, top + h], 1)
    # adaptive sampling: one sample a pixel when the crop is upscaled (exact at scale 1), the average of
    # ceil(crop / size) samples a side when it is downscaled
    out = roi_align(x.float(), boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    out = torch.where(flip.bool().view(-1, 1, 1, 1), out.flip(-1), out)
    return out.round().clamp(0, 255).to(torch.uint8)


def augment_batch(x: torch.Tensor, params: torch.Tensor, padding: int) -> torch.Tensor:
    """Random crop (after zero padding) and horizontal flip of a batch, vectorised: ``x`` is
    ``[B,C,H,W]``, ``params`` ``[B,3]`` (dy, dx, flip) on the same device."""
    b, c, h, w = x.shape
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = params[:, 0:1] + ar_h  # [B,H]
    cols = params[:, 1:2] + ar_w  # [B,W]
    flip = params[:, 2:3].bool()
    cols = torch.where(flip, cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # [B,H,W,C]
    return out.permute(0, 3, 1, 2)


def epoch_order(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Shuffled sample order for one epoch; with several ranks, each takes an equal shard."""
    g = torch.Generator().manual_seed(seed * 7_919 + epoch + 1)
    order = torch.randperm(n, generator=g)
    if world > 1:
        per = -(-n // world)
        order = torch.cat([order, order[: per * world - n]])  # pad so every rank gets the same count
        order = order[rank::world]
    return order


def iterate_batches(n: int, batch_size: int, order: torch.Tensor | None = None, drop_last: bool = False) -> Iterator[torch.Tensor]:
    order = torch.arange(n) if order is None else order
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        if drop_last and len(idx) < batch_size and i > 0:
            return
        yield idx
