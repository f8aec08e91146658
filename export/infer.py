#!/usr/bin/env python3
"""Classify image files with any model exported by `ekdc export`. Needs onnxruntime, Pillow and
numpy; no torch, no ekdc.

    python infer.py student.onnx cat.jpg dog.png [--top 3]

The model's metadata says the class names and how a photo becomes the input (``ekdc.preprocess``:
resized to the input size, or for photos the shorter side resized and the centre cropped, as the
model was evaluated); normalisation is inside the graph, so the input is just RGB in [0, 1].
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

# as ekdc decodes (ekdc/data/decode.py's to_rgb and open_image, repeated here: this file imports no ekdc)
MAX_PIXELS = 89_478_485
_CONVERTIBLE = ("1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _gray(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB with the image's range kept: 16-bit by 255/65535, 32-bit integers and floats by their range."""
    if im.mode in _CONVERTIBLE:
        return im.convert("RGB")
    if im.mode in _SIXTEEN_BIT:
        return _gray(np.asarray(im).astype(np.float64) * (255.0 / 65535.0))
    if im.mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        if im.mode == "F":
            a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if im.mode == "F" and lo >= 0 and hi <= 1:
            return _gray(a * 255.0)
        if lo >= 0 and hi <= 255:
            return _gray(a)
        if im.mode == "I":
            return _gray(a * (255.0 / 65535.0) if lo >= 0 and hi <= 65535 else (a + 2.0**31) * (255.0 / (2.0**32 - 1)))
        return _gray((a - lo) * (255.0 / (hi - lo)) if hi > lo else a * 0)
    raise ValueError(f"{im.mode}: an image mode infer.py does not decode")


def open_image(path: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"cannot read image {path}: more than the {MAX_PIXELS:,} pixels it decodes "
                         "(a decompression bomb?)") from None
    if im.size[0] * im.size[1] > MAX_PIXELS:
        im.close()
        raise ValueError(f"cannot read image {path}: {im.size[0]}x{im.size[1]} is more than {MAX_PIXELS:,} pixels")
    return im


def _center(im: Image.Image, side: int) -> Image.Image:
    left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
    return im.crop((left, top, left + side, top + side))


def load_images(paths: list[str], size: int, pre: dict) -> np.ndarray:
    batch = np.empty((len(paths), 3, size, size), dtype=np.float32)
    for i, p in enumerate(paths):
        try:
            batch[i] = _load_one(p, size, pre)
        except (OSError, ValueError) as err:  # Pillow's own words ("Truncated File Read") name no file
            raise ValueError(str(err) if p in str(err) else f"cannot read image {p}: {err}") from None
    return batch


def _load_one(p: str, size: int, pre: dict) -> np.ndarray:
    with open_image(p) as im:
        if pre.get("exif_orientation") and im.getexif().get(0x0112, 1) not in (0, 1):  # turned as a viewer shows it
            im = ImageOps.exif_transpose(im)
        im = to_rgb(im)
        if "resize_shorter" in pre:  # as ekdc decodes photos: shorter side to C, centre C x C, centre crop
            c = int(pre["resize_shorter"])
            a = pre.get("max_aspect")
            if a and max(im.size) > a * min(im.size):  # a strip: its centre square first
                im = _center(im, min(im.size))
            k = c / min(im.size)
            im = _center(im.resize((max(c, round(im.size[0] * k)), max(c, round(im.size[1] * k))), Image.BILINEAR), c)
            im = _center(im, int(pre["center_crop"]))
        else:
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="an exported .onnx file (student.onnx, student.int8.onnx, teachers.onnx, ...)")
    ap.add_argument("images", nargs="+", help="image files")
    ap.add_argument("--top", type=int, default=1, help="how many classes to print per image")
    args = ap.parse_args()
    if args.top < 1:
        print(f"infer.py: error: --top {args.top}: must be 1 or more", file=sys.stderr)
        return 2
    try:
        sess = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 -- ONNX Runtime's load errors (NoSuchFile, InvalidProtobuf, ...) are plain Exceptions
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"infer.py: error: cannot load {args.model}: {first}", file=sys.stderr)
        return 2
    meta = sess.get_modelmeta().custom_metadata_map
    if "ekdc.classes" not in meta or "ekdc.input_size" not in meta:
        print(f"infer.py: error: {args.model} is not an ekdc export (no ekdc.classes / ekdc.input_size metadata)",
              file=sys.stderr)
        return 2
    classes = json.loads(meta["ekdc.classes"])
    size = int(meta["ekdc.input_size"])
    pre = json.loads(meta.get("ekdc.preprocess", "{}"))  # files exported before it existed: resize
    try:
        x = load_images(args.images, size, pre)
    except (OSError, ValueError) as err:
        print(f"infer.py: error: {err}", file=sys.stderr)
        return 2
    probs = softmax(sess.run(["logits"], {"images": x})[0])
    for path, p in zip(args.images, probs):
        top = np.argsort(-p)[: args.top]
        print(f"{path}: " + ", ".join(f"{classes[k]} ({p[k]:.1%})" for k in top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
