"""What the teachers' cached outputs tell a student beyond the label, on the training images.

Reads teacher-output caches (``logits.f16`` as ``ekdc.distillation.teacher_cache`` lays it out) and the
training split's labels from a recipe, and prints, for each cache: each teacher's accuracy on the cached
views, the ensemble's (mean probabilities), the mean probability the ensemble gives the true class, and the
mean mass it puts on the other nine classes' largest (the "dark knowledge" a student can learn from).

    python experiments/soft_targets.py recipes/cifar10-strong.yaml \\
        cycle1=experiments/records/headline-cycle1/rows/teacher_cache/8b60a99bf1d214db6cb7 \\
        cycle2=experiments/records/headline/rows/teacher_cache/f07325521a2f90ad2086

Teachers that fit their own training images give near one-hot outputs there, so distilling on those images
teaches little more than the label (with label smoothing, the smoothing's shape); this measures how close.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ekdc import load_recipe  # noqa: E402
from ekdc.data.splits import index_splits  # noqa: E402
from ekdc.distillation.teacher_cache import CHUNK  # noqa: E402


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def layout_of(folder: Path) -> dict:
    return json.loads((folder / "key.json").read_text())["layout"]


def finished_images(folder: Path) -> np.ndarray:
    """Which images a cache holds outputs for: those of its finished chunks (a build still running has some)."""
    n = layout_of(folder)["images"]
    done = np.frombuffer((folder / "done").read_bytes(), np.uint8) != 0
    return np.repeat(done, CHUNK)[:n]


def cache_stats(folder: Path, labels: np.ndarray, images: np.ndarray) -> dict:
    """The figures over the images where ``images`` is True, every view of each."""
    layout = layout_of(folder)
    n, k, m, c = layout["images"], layout["views"], layout["teachers"], layout["classes"]
    if n != len(labels):
        raise SystemExit(f"{folder}: {n} images, but the recipe's training split has {len(labels)}")
    logits = np.memmap(folder / "logits.f16", np.float16, "r", shape=(n, k, m, c))
    right, true_p, runner_up, ens_right = np.zeros(m), 0.0, 0.0, 0.0
    picked = np.flatnonzero(images)
    for lo in range(0, len(picked), 2048):  # in slices: the whole cache in float32 is GBs for 16 views
        z = np.asarray(logits[picked[lo:lo + 2048]], np.float32)
        y = labels[picked[lo:lo + 2048], None]
        right += (z.argmax(-1) == y[..., None]).sum((0, 1))
        p = softmax(z).mean(2)  # [b, k, c]: the ensemble's probabilities, as avg_kd's target at T=1
        ens_right += (p.argmax(-1) == y).sum()
        pt = np.take_along_axis(p, np.broadcast_to(y[..., None], (*p.shape[:2], 1)), -1)[..., 0]
        true_p += pt.sum()
        others = p.copy()
        np.put_along_axis(others, np.broadcast_to(y[..., None], (*p.shape[:2], 1)), -1.0, -1)
        runner_up += others.max(-1).sum()
    views = len(picked) * k
    return {"images": len(picked), "views": views, "teacher_acc": (right / views).tolist(), "ensemble_acc": ens_right / views,
            "mean_p_true": true_p / views, "mean_p_runner_up": runner_up / views}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", help="the recipe whose training split the caches were built on")
    ap.add_argument("caches", nargs="+", metavar="NAME=FOLDER")
    args = ap.parse_args(argv)
    labels = np.asarray(index_splits(load_recipe(args.recipe).data).train.labels)
    caches = [(name or folder, Path(folder)) for name, _, folder in (c.rpartition("=") for c in args.caches)]
    images = np.logical_and.reduce([finished_images(folder) for _, folder in caches])  # the same images for all
    print(f"{images.sum():,} training images (those every cache has finished), every view of each\n")
    print("| cache | views | each teacher's accuracy on them | ensemble | mean p(true) | mean p(runner-up) |")
    print("|---|---:|---|---:|---:|---:|")
    for name, folder in caches:
        s = cache_stats(folder, labels, images)
        accs = ", ".join(f"{a:.2%}" for a in s["teacher_acc"])
        print(f"| {name} | {s['views']:,} | {accs} | {s['ensemble_acc']:.2%} | {s['mean_p_true']:.4f} | "
              f"{s['mean_p_runner_up']:.4f} |")


if __name__ == "__main__":
    main()
