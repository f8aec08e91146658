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

import numpy as np
import onnxruntime as ort
from PIL import Image


def _center(im: Image.Image, side: int) -> Image.Image:
    left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
    return im.crop((left, top, left + side, top + side))


def load_images(paths: list[str], size: int, pre: dict) -> np.ndarray:
    batch = np.empty((len(paths), 3, size, size), dtype=np.float32)
    for i, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB")
            if "resize_shorter" in pre:  # as ekdc decodes photos: shorter side to C, centre C x C, centre crop
                c = int(pre["resize_shorter"])
                k = c / min(im.size)
                im = _center(im.resize((max(c, round(im.size[0] * k)), max(c, round(im.size[1] * k))), Image.BILINEAR), c)
                im = _center(im, int(pre["center_crop"]))
            else:
                im = im.resize((size, size), Image.BILINEAR)
            batch[i] = np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return batch


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="an exported .onnx file (student.onnx, student.int8.onnx, teachers.onnx, ...)")
    ap.add_argument("images", nargs="+", help="image files")
    ap.add_argument("--top", type=int, default=1, help="how many classes to print per image")
    args = ap.parse_args()
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
