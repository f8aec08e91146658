"""From an image file to the uint8 tensor training and evaluation take: the one decode of ekdc."""
from __future__ import annotations

from typing import IO, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

CENTER_CROP = 0.875  # photos: decoded with the shorter side at size / 0.875, evaluated on the centre crop
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


def canonical_size(size: int, view: str) -> int:
    """The side of the square every image is decoded to: the image size for ``pad_crop``; for
    ``resized_crop``, size / 0.875 (training crops from it, evaluation takes its centre)."""
    return size if view == "pad_crop" else int(round(size / CENTER_CROP))


def decode_image(src: Union[str, IO[bytes]], size: int, view: str = "pad_crop", name: str = "") -> torch.Tensor:
    """One image (a path or an open binary file) as uint8 ``[3,c,c]``, c = ``canonical_size``: any mode
    made RGB; ``pad_crop`` resizes to the square, ``resized_crop`` resizes the shorter side to c and keeps
    the centre square. An unreadable image is a UserError naming it."""
    from PIL import Image

    c = canonical_size(size, view)
    try:
        with Image.open(src) as im:
            im = im.convert("RGB")
            if view == "pad_crop":
                im = im.resize((c, c), Image.BILINEAR) if im.size != (c, c) else im
            else:
                w, h = im.size
                k = c / min(w, h)
                im = im.resize((max(c, round(w * k)), max(c, round(h * k))), Image.BILINEAR)
                left, top = (im.size[0] - c) // 2, (im.size[1] - c) // 2
                im = im.crop((left, top, left + c, top + c))
            return torch.from_numpy(np.array(im)).permute(2, 0, 1)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read image {name or src}: {err}") from None


def decode_files(files: list[str], size: int, view: str = "pad_crop") -> torch.Tensor:
    """Files as uint8 ``[n,3,c,c]`` (see ``decode_image``)."""
    c = canonical_size(size, view)
    out = torch.empty(len(files), 3, c, c, dtype=torch.uint8)
    for i, f in enumerate(files):
        out[i] = decode_image(f, size, view)
    return out


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images ``[n,3,h,w]`` resized (bilinear, antialiased) to ``size`` x ``size``."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.round().clamp(0, 255).to(torch.uint8)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size`` x ``size`` of images ``[...,c,c]`` (evaluation's view of a ``resized_crop`` decode)."""
    c = x.shape[-1]
    if c == size:
        return x
    o = (c - size) // 2
    return x[..., o : o + size, o : o + size]


def eval_preprocess(cfg) -> dict:
    """How a raw photo becomes the model's input, for the ONNX metadata (``export/infer.py`` follows it)."""
    if cfg.view == "pad_crop":
        return {"resize": cfg.image_size}
    return {"resize_shorter": canonical_size(cfg.image_size, "resized_crop"), "center_crop": cfg.image_size}
