#!/usr/bin/env python3
"""Images/s of one EKD training step against the student alone (mode ce), on this machine.

    python experiments/distill_throughput.py [--recipe recipes/cifar10-limited.yaml] [--rounds 5] [--steps 10]

Uses the recipe's teachers and student (randomly initialised: speed does not depend on the weights),
its precision and memory format, one batch of the recipe's batch size. The two step kinds are timed
interleaved over rounds and the medians compared, as a ratio measured in one run. It also prints how
much of an EKD step the teachers' forward passes take, and what a teacher-output cache keyed by
(sample, augmentation view) could save: the expected share of repeated views over the recipe's epochs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ekdc import load_recipe
from ekdc.losses import Objective
from ekdc.training.runtime import setup_runtime
from ekdc.training.trainer import make_optimizer, param_groups
from ekdc.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/cifar10-limited.yaml")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    r = load_recipe(args.recipe)
    rt = setup_runtime(r.device, r.precision, r.channels_last)
    torch.manual_seed(0)
    c, size, bs = 10, r.data.image_size, r.distill.batch_size
    teachers = [rt.prepare(create_model(t.arch, num_classes=c)).eval() for t in r.teachers]
    student = rt.prepare(create_model("ekd_student", num_classes=c, **r.student.model_kwargs()))
    opt = make_optimizer(param_groups(student), r.distill)
    x = torch.randn(bs, 3, size, size, device=rt.device)
    x = x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x
    y = torch.randint(0, c, (bs,), device=rt.device)
    losses = {m: Objective(m, r.distill.weights, r.distill.term_settings(), temperature=r.distill.temperature)
              for m in ("ce", "ekd")}

    def teachers_forward():
        with torch.inference_mode(), rt.autocast():
            return torch.stack([t(x) for t in teachers]).clone()

    def step(mode: str) -> None:
        t_logits = teachers_forward() if mode == "ekd" else None
        with rt.autocast():
            loss, _ = losses[mode](student(x, return_branches=True), y, 0, t_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    kinds = {"student alone (ce)": lambda: step("ce"), "EKD (3 teachers)": lambda: step("ekd"),
             "teachers' forward only": teachers_forward}
    for fn in kinds.values():  # warm-up
        fn()
    samples: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for name, fn in kinds.items():
            t0 = time.perf_counter()
            for _ in range(args.steps):
                fn()
            samples[name].append(bs * args.steps / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"recipe {args.recipe}, batch {bs}, {rt.device}, amp {rt.amp_dtype}, channels_last {rt.channels_last}, "
          f"{torch.get_num_threads()} threads; median of {args.rounds} rounds x {args.steps} steps")
    for k, v in med.items():
        spread = (max(samples[k]) - min(samples[k])) / v
        print(f"  {k:<24} {v:8.1f} images/s   (spread {spread:.0%})")
    ekd, ce, tf = med["EKD (3 teachers)"], med["student alone (ce)"], med["teachers' forward only"]
    print(f"  EKD / student alone: {ekd / ce:.2f}x the throughput; teachers' forward ~{(1 / tf) / (1 / ekd):.0%} of an EKD step")
    aug = r.data.augment_config
    if aug is not None and (aug.kind == "resized_crop" or aug.cutout):
        print("  teacher-output cache: views of continuous crops or cutout holes are practically never drawn twice "
              "(no hit rate to expect)")
        return
    views = ((2 * aug.crop_padding + 1) ** 2 * (2 if aug.hflip else 1)) if aug else 1
    e = r.distill.epochs
    distinct = views * (1 - (1 - 1 / views) ** e)
    hit = 1 - distinct / e
    print(f"  teacher-output cache: {views} augmentation views per image, {e} epochs -> expected hit rate {hit:.1%}; "
          f"best case EKD throughput with it {1 / ((1 / ekd) - hit * (1 / tf)):.1f} images/s")


if __name__ == "__main__":
    main()
