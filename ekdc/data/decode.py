"""From an image file to the uint8 tensor training and evaluation take: the one decode of ekdc."""
from __future__ import annotations

import collections
import contextlib
import os
import warnings
from typing import IO, NamedTuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from ..errors import UserError

CENTER_CROP = 0.875  # photos: decoded with the shorter side at size / 0.875, evaluated on the centre crop
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")


def canonical_size(size: int, view: str) -> int:
    """The side of the square every image is decoded to: the image size for ``pad_crop``; for
    ``resized_crop``, size / 0.875 (training crops from it, evaluation takes its centre)."""
    return size if view == "pad_crop" else int(round(size / CENTER_CROP))


# Pillow's own limit on an image's pixels; past it an image is refused as a likely decompression bomb
# (Pillow warns past 1x and raises past 2x: here both are one "cannot read" error)
MAX_PIXELS = 89_478_485
# resized_crop resizes the shorter side to the view's size: past this aspect ratio the centre square is cut
# out first, so that a 2 x 40,000 strip never becomes a 256 x 5,120,000 image
MAX_ASPECT = 4
# modes made RGB by Pillow's own convert (palette expanded, alpha dropped, CMYK and YCbCr converted)
_CONVERTIBLE = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
MODES = (*_CONVERTIBLE, *_SIXTEEN_BIT, "I", "F")


def _gray_to_rgb(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode Pillow opens as 8-bit RGB with its range kept: 16-bit images scaled by 255/65535, 32-bit
    integer images by the range their values use (8-bit, 16-bit, else the int32 range), float images by
    theirs ([0,1], [0,255], else their own min to max); palette and alpha as Pillow converts them. Any
    other mode is a ValueError naming it. ``export/infer.py`` repeats this function (it imports no ekdc)."""
    mode = im.mode
    if mode in _CONVERTIBLE:
        return im.convert("RGB")
    if mode in _SIXTEEN_BIT:
        return _gray_to_rgb(np.asarray(im).astype(np.float64) * (255.0 / 65535.0))
    if mode == "I":
        a = np.asarray(im).astype(np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0 and hi <= 255:
            return _gray_to_rgb(a)
        if lo >= 0 and hi <= 65535:
            return _gray_to_rgb(a * (255.0 / 65535.0))
        return _gray_to_rgb((a + 2.0**31) * (255.0 / (2.0**32 - 1)))
    if mode == "F":
        a = np.nan_to_num(np.asarray(im).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if lo >= 0 and hi <= 1:
            return _gray_to_rgb(a * 255.0)
        if lo >= 0 and hi <= 255:
            return _gray_to_rgb(a)
        return _gray_to_rgb((a - lo) * (255.0 / (hi - lo)) if hi > lo else a * 0)
    raise ValueError(f"image mode '{mode}' is not one ekdc decodes ({', '.join(MODES)})")


@contextlib.contextmanager
def open_image(src: Union[str, IO[bytes]], name: str = ""):
    """``Image.open`` with ekdc's limits: more than ``MAX_PIXELS`` pixels (a decompression bomb, or just too
    large) and a file Pillow cannot read are one UserError naming the file ("cannot read image ...")."""
    label = name or src
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(src)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"cannot read image {label}: more than the {MAX_PIXELS:,} pixels ekdc decodes "
                        "(a decompression bomb?)") from None
    except Image.UnidentifiedImageError:  # Pillow's own words name the file object (<_io.BytesIO at 0x...>)
        raise UserError(f"cannot read image {label}: not in a format Pillow can identify") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise UserError(f"cannot read image {label}: {err}") from None
    with im:
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise UserError(f"cannot read image {label}: {w}x{h} is {w * h:,} pixels, more than the {MAX_PIXELS:,} "
                            "ekdc decodes (a decompression bomb?)")
        yield im


# the IJG (libjpeg) luminance quantisation table at quality 50, in natural order: every libjpeg-based encoder
# (Pillow, OpenCV, ImageMagick, most cameras' software) scales it by the quality it is given
_IJG_LUMINANCE = (16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                  14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                  49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99)
_CHROMA_SAMPLING = {0: "4:4:4", 1: "4:2:2", 2: "4:2:0"}  # Pillow's get_sampling codes


def _ijg_table(quality: int) -> list[int]:
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [min(255, max(1, (q * scale + 50) // 100)) for q in _IJG_LUMINANCE]


def jpeg_quality(luminance_table) -> str:
    """The libjpeg quality a JPEG's luminance table was scaled for: ``q75`` where it is exactly that table,
    ``~q75`` for the nearest where the encoder used tables of its own."""
    table = list(luminance_table)
    if len(table) != 64:
        return "q?"
    best = min(range(1, 101), key=lambda q: sum(abs(a - b) for a, b in zip(_ijg_table(q), table)))
    return f"q{best}" if _ijg_table(best) == table else f"~q{best}"


def encoding_of(im: Image.Image) -> str:
    """How an opened image file is encoded: its format, and for a JPEG the quality its quantisation tables
    were scaled for and its chroma subsampling (4:2:0 keeps colour at half the width and height)."""
    fmt = im.format or "unknown"
    if fmt != "JPEG":
        return fmt
    from PIL import JpegImagePlugin

    tables = getattr(im, "quantization", None) or {}
    parts = ["JPEG", jpeg_quality(tables[0]) if 0 in tables else "q?"]
    sampling = _CHROMA_SAMPLING.get(JpegImagePlugin.get_sampling(im)) if im.mode in ("RGB", "YCbCr") else None
    return " ".join(parts + ([sampling] if sampling else []))


class ImageHeader(NamedTuple):
    mode: str
    size: tuple[int, int]
    encoding: str  # ``encoding_of``


def check_image(src: Union[str, IO[bytes]], name: str = "", full: bool = False) -> ImageHeader:
    """Mode, size and encoding from the header and Pillow's ``verify``, or the UserError ``decode_image``
    would raise for this file's size or mode. ``verify`` does not read a JPEG's data, so a truncated JPEG
    passes unless ``full``, which decodes the image too."""
    with open_image(src, name) as im:
        if im.mode not in MODES:
            raise UserError(f"cannot read image {name or src}: image mode '{im.mode}' is not one ekdc decodes")
        mode, size, encoding = im.mode, im.size, encoding_of(im)
        try:
            im.verify()
        except (OSError, ValueError, SyntaxError) as err:
            raise UserError(f"cannot read image {name or src}: {err}") from None
    if full:
        with open_image(src, name) as im:
            try:
                im.load()
            except (OSError, ValueError, SyntaxError) as err:
                raise UserError(f"cannot read image {name or src}: {err}") from None
    return ImageHeader(mode, size, encoding)


EXIF_ORIENTATION = 0x0112  # the tag cameras and phones write instead of rotating the pixels
# what a file decodes to changed: 2, photos turned upright by their EXIF orientation (1: as stored). Whatever
# keeps outputs of decoded images under the files' names (the teacher-output cache) keys on it
DECODER_VERSION = 2


def upright(im: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: a photo whose EXIF orientation says "rotated" is turned, as
    browsers, phones and image viewers show it (and so as a deployed client most likely feeds it)."""
    if im.getexif().get(EXIF_ORIENTATION, 1) in (0, 1):  # most files: no tag, nothing to copy
        return im
    return ImageOps.exif_transpose(im)


def decode_image(src: Union[str, IO[bytes]], size: int, view: str = "pad_crop", name: str = "") -> torch.Tensor:
    """One image (a path or an open binary file) as uint8 ``[3,c,c]``, c = ``canonical_size``: made RGB by
    ``to_rgb``; ``pad_crop`` resizes to the square, ``resized_crop`` resizes the shorter side to c and keeps
    the centre square. An unreadable image is a UserError naming it."""
    c = canonical_size(size, view)
    with open_image(src, name) as im:
        try:
            im = to_rgb(upright(im))
            if view == "pad_crop":
                im = im.resize((c, c), Image.BILINEAR) if im.size != (c, c) else im
            else:
                w, h = im.size
                if max(w, h) > MAX_ASPECT * min(w, h):  # a strip: its centre square first, never a huge resize
                    s = min(w, h)
                    left, top = (w - s) // 2, (h - s) // 2
                    im = im.crop((left, top, left + s, top + s))
                    w, h = im.size
                k = c / min(w, h)
                im = im.resize((max(c, round(w * k)), max(c, round(h * k))), Image.BILINEAR)
                left, top = (im.size[0] - c) // 2, (im.size[1] - c) // 2
                im = im.crop((left, top, left + c, top + c))
            return torch.from_numpy(np.array(im)).permute(2, 0, 1)
        except (OSError, ValueError, SyntaxError) as err:
            raise UserError(f"cannot read image {name or src}: {err}") from None


def decode_files(files: list[str], size: int, view: str = "pad_crop") -> torch.Tensor:
    """Files as uint8 ``[n,3,c,c]`` (see ``decode_image``). A whole split decoded again in the same process
    (every cell of an ``ekdc compare`` grid, export's parity after training) is taken from a memo of the
    last splits, as long as no file has changed (path, size and mtime)."""
    key = _memo_key(files, size, view)
    if key is not None and key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key].clone()  # a copy: no caller can change what the next one gets
    c = canonical_size(size, view)
    out = torch.empty(len(files), 3, c, c, dtype=torch.uint8)
    for i, f in enumerate(files):
        out[i] = decode_image(f, size, view)
    if key is not None and out.numel() <= MEMO_MAX_BYTES:
        _MEMO[key] = out.clone()
        while len(_MEMO) > MEMO_SPLITS or sum(t.numel() for t in _MEMO.values()) > MEMO_MAX_BYTES:
            _MEMO.popitem(last=False)
    return out


# whole splits only (a streamed batch never reaches this many files), the last few, within a byte budget
MEMO_MIN_FILES, MEMO_SPLITS, MEMO_MAX_BYTES = 1024, 4, 1 << 29  # the memo is a second copy: keep it small
_MEMO: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()


def _memo_key(files: list[str], size: int, view: str):
    if len(files) < MEMO_MIN_FILES:
        return None
    try:
        stats = tuple((f, st.st_size, st.st_mtime_ns) for f in files for st in (os.stat(f),))
    except (OSError, TypeError):  # a file gone (decoding will say so) or a file object
        return None
    return size, view, stats


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
    """How a raw photo becomes the model's input, for the ONNX metadata (``export/infer.py`` follows it):
    turned upright by its EXIF orientation first (``upright``), then resized (and centre-cropped); a photo
    longer than ``max_aspect`` times its width gives its centre square first."""
    if cfg.view == "pad_crop":
        return {"exif_orientation": True, "resize": cfg.image_size}
    return {"exif_orientation": True, "resize_shorter": canonical_size(cfg.image_size, "resized_crop"),
            "center_crop": cfg.image_size, "max_aspect": MAX_ASPECT}
