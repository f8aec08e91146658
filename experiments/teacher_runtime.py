"""Frozen teachers on the CPU: eager PyTorch against ONNX Runtime (``distill.teacher_runtime``), per teacher.

Loads a recipe's teachers as distillation does (``frozen_teacher``: their weights, preprocessing and class
order), and times one batch of random [0,1] images through each, in fp32, both ways, rounds interleaved;
prints the medians, their ratio and the largest difference between the two outputs.

    python experiments/teacher_runtime.py recipes/cifar10-strong.yaml --batch 256 --rounds 5

``ekdc.teachers.ort_runner`` quotes this script's figures; rerun it on another CPU before trusting them there.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ekdc import load_recipe  # noqa: E402
from ekdc.cores import usable_cores  # noqa: E402
from ekdc.data import load_data  # noqa: E402
from ekdc.teachers import DataInfo, frozen_teacher  # noqa: E402
from ekdc.teachers.ort_runner import CHECKS, OrtTeacher  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=usable_cores())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe)
    data = load_data(recipe.data)
    info = DataInfo(list(data.classes), data.image_size, list(data.mean), list(data.std))
    torch.manual_seed(0)
    pixels = torch.rand(args.batch, 3, data.image_size, data.image_size).contiguous(memory_format=torch.channels_last)
    rows = []
    for i, tcfg in enumerate(recipe.teachers):
        teacher = frozen_teacher(tcfg, i, info)
        ort_teacher = OrtTeacher(teacher, features=False, threads=args.threads)
        t0 = time.perf_counter()
        for _ in range(CHECKS + 1):  # export, the checks, and one plain run
            ort_teacher(pixels)
        start_s = time.perf_counter() - t0
        if ort_teacher.fallback_reason:
            print(f"{teacher.name}: runs in PyTorch: {ort_teacher.fallback_reason}")
            continue
        with torch.inference_mode():
            eager = teacher(pixels)
        diff = float((ort_teacher(pixels)[0] - eager).abs().max())
        times: dict[str, list[float]] = {"torch": [], "ort": []}
        for _ in range(args.rounds):
            for name, fn in (("torch", lambda: teacher(pixels)), ("ort", lambda: ort_teacher(pixels))):
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
        tt, to = statistics.median(times["torch"]), statistics.median(times["ort"])
        rows.append((teacher.name, tt, to, diff, start_s))
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, batch {args.batch}, fp32, "
          f"medians of {args.rounds} interleaved rounds")
    print("| teacher | PyTorch s/batch | ONNX Runtime s/batch | speedup | max abs diff | export + checks s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, tt, to, diff, start_s in rows:
        print(f"| {name} | {tt:.2f} | {to:.2f} | {tt / to:.2f}x | {diff:.1e} | {start_s:.1f} |")
    if rows:
        tt, to = sum(r[1] for r in rows), sum(r[2] for r in rows)
        print(f"| all | {tt:.2f} | {to:.2f} | {tt / to:.2f}x | | |")


if __name__ == "__main__":
    main()
