"""Batch augmentation and sample order: pure functions of (seed, epoch, sample), so that a resumed run
sees the very views and order an uninterrupted one would, whichever loader feeds it.

Random-access splits draw every sample's parameters for an epoch at once (``augment_params``) and index
them by position; a source read in order draws each sample's from its key (``keyed_augment_params``).
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .config import Augment


def augment_params(n: int, aug: Augment | None, seed: int, epoch: int, side: int = 0) -> torch.Tensor | None:
    """Per-sample crop and flip parameters for one epoch, a pure function of (seed, epoch) and the sample's
    index: pad_crop (dy, dx, flip); resized_crop (top, left, height, width, flip) of a crop from the
    ``side`` x ``side`` decode, as RandomResizedCrop draws them (area share in ``scale``, aspect ratio in
    ``ratio``, log-uniform), drawn here rather than from the global RNG. With ``aug.cutout``, two more
    columns: the blanked square's centre (``CUTOUT_SCALE`` steps across the view, drawn after the rest, so
    the crops and flips are what they are without it)."""
    if aug is None:
        return None
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    base = _crop_flip_params(n, aug, g, side)
    if not aug.cutout:
        return base
    centres = torch.randint(0, CUTOUT_SCALE, (n, 2), generator=g)
    return torch.cat([base, centres.to(base.dtype)], 1)


# a cutout centre is drawn as a fraction of the view in these steps: the view's size is not known where the
# parameters are drawn (pad_crop keeps each image's), and 2**16 steps map exactly onto any power-of-two side
CUTOUT_SCALE = 1 << 16


def param_width(aug: Augment | None) -> int:
    """How many parameters ``augment_params`` draws a sample: 3 for pad_crop (dy, dx, flip), 5 for
    resized_crop (top, left, height, width, flip), 2 more with cutout; 0 without augmentation."""
    if aug is None:
        return 0
    return _crop_flip_width(aug) + (2 if aug.cutout else 0)


def _crop_flip_width(aug: Augment) -> int:
    return 5 if aug.kind == "resized_crop" else 3


def _crop_flip_params(n: int, aug: Augment, g: torch.Generator, side: int) -> torch.Tensor:
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


def keyed_augment_params(keys: list[str], aug: Augment | None, seed: int, epoch: int, side: int = 0) -> torch.Tensor | None:
    """``augment_params`` for samples named by key rather than position: each sample's parameters come
    from a generator seeded by (seed, epoch, key), so they do not depend on the order samples arrive in."""
    if aug is None:
        return None
    rows = []
    for key in keys:
        digest = hashlib.blake2b(f"{seed}\0{epoch}\0{key}".encode(), digest_size=8).digest()
        rows.append(augment_params(1, aug, int.from_bytes(digest, "little") % (2**31), 0, side))
    return torch.cat(rows)


def augment(x: torch.Tensor, params: torch.Tensor, aug: Augment, size: int) -> torch.Tensor:
    """A batch of uint8 decodes -> uint8 training views at ``size``, by ``aug.kind``, then cutout."""
    crop_flip = params[:, :_crop_flip_width(aug)]
    if aug.kind == "resized_crop":
        view = resized_crop_batch(x, crop_flip, size)
    else:
        view = augment_batch(x, crop_flip.long(), aug.crop_padding)
    if aug.cutout:
        view = cutout_batch(view, params[:, -2:].long(), aug.cutout)
    return view


# the blanked square's value: mid-grey, near a natural image's mean, so that after normalisation the hole is
# close to zero (the mean) rather than a black patch the network could learn as a feature
CUTOUT_FILL = 128


def cutout_batch(x: torch.Tensor, centres: torch.Tensor, side: int) -> torch.Tensor:
    """Each view with a ``side`` x ``side`` square set to ``CUTOUT_FILL``, centred at its ``centres`` row
    (y, x in ``CUTOUT_SCALE`` steps across the view) and clipped at the view's edges."""
    h, w = x.shape[-2:]
    cy = centres[:, 0] * h // CUTOUT_SCALE
    cx = centres[:, 1] * w // CUTOUT_SCALE
    top, left = cy - side // 2, cx - side // 2
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)  # [B,H]
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)  # [B,W]
    hole = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # [B,1,H,W]
    return x.masked_fill(hole, CUTOUT_FILL)


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
