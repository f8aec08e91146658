#!/usr/bin/env python3
"""Student-stage images/s with the teacher-output cache against live teachers, in one run.

    python experiments/teacher_cache_throughput.py [--recipe recipes/cifar10-limited.yaml] [--views 10]
        [--rounds 3] [--mode avg_kd] [--out runs/teacher_cache_throughput]

Uses the recipe's data, student and teacher architectures (teachers randomly initialised: a step's speed
does not depend on the weights), its precision and memory format. It builds the cache once (its time
and size are reported), then trains whole one-epoch student stages through ``train_stage``, the loop
``ekdc distill`` runs, alternating live and cached epochs over rounds; the medians are compared as a
ratio measured in this one run. Writes ``<out>/result.json``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ekdc import _io, load_recipe
from ekdc.data import load_data
from ekdc.distillation.distiller import Distiller
from ekdc.distillation.stages import data_info
from ekdc.losses import Objective
from ekdc.training.runtime import setup_runtime
from ekdc.distillation.teacher_cache import open_teacher_cache
from ekdc.training.trainer import Reporter, Stage, train_stage
from ekdc.models import create_model
from ekdc.run import RunDir
from ekdc.teachers import Teacher, trainable_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/cifar10-limited.yaml")
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mode", default=None, help="default: the recipe's")
    ap.add_argument("--out", default="runs/teacher_cache_throughput")
    args = ap.parse_args()
    r = load_recipe(args.recipe, [f"distill.teacher_cache.views={args.views}"] + ([f"mode={args.mode}"] if args.mode else []))
    rt = setup_runtime(r.device, r.precision, r.channels_last)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_data(r.data)
    info = data_info(data)
    torch.manual_seed(0)
    teachers = []
    for i, tcfg in enumerate(r.teachers):
        t = trainable_teacher(tcfg, i, info)
        teachers.append(rt.prepare(Teacher(t.model, t.pre, name=tcfg.name, arch=tcfg.arch, source="ekdc", head=t.head)))
    student = rt.prepare(create_model("ekd_student", num_classes=data.num_classes, **r.student.model_kwargs()))
    d = r.distill
    distiller = Distiller(student, teachers, Objective.from_recipe(r))
    run = RunDir(out / "run")
    (run.path / "ckpt").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cache = open_teacher_cache(d.teacher_cache, out, teachers, data, r.data.augment_config, rt,
                               distiller.teacher_targets, distiller.loss.needs_features, print)
    open_s = time.perf_counter() - t0
    one_epoch = d.model_copy(update={"epochs": 1})
    rates: dict[str, list[float]] = {"live": [], "cached": []}
    with Reporter(run, rt, None, False) as rep:
        for rnd in range(args.rounds):
            for kind in ("live", "cached"):
                distiller.cache = cache if kind == "cached" else None
                stage = Stage(f"student-{kind}-{rnd}", student, distiller.forward_train, distiller.param_groups(),
                              one_epoch, r.seed + rnd)
                if kind == "cached":
                    stage.fixed_views = lambda epoch, s=stage.seed: cache.views_for_epoch(s, epoch)
                t = time.perf_counter()
                train_stage(stage, data, r.data.augment_config, rt, run, rep)
                rates[kind].append(len(data.train) / (time.perf_counter() - t))
                print(f"round {rnd + 1} {kind:<6} {rates[kind][-1]:8.1f} images/s")
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {
        "recipe": args.recipe, "mode": r.mode, "views": args.views, "train_images": len(data.train),
        "device": str(rt.device), "precision": rt.precision_text, "threads": torch.get_num_threads(),
        "cache_build_seconds": cache.info.get("build_seconds"), "cache_open_seconds": round(open_s, 2),
        "cache_bytes": cache.info.get("bytes"), "images_per_s": rates, "median_images_per_s": med,
        "speedup": round(med["cached"] / med["live"], 2),
    }
    _io.write_json(out / "result.json", result)
    print(f"{args.recipe} ({r.mode}, {len(data.train)} images, {rt.device}, {rt.precision_text}, "
          f"{torch.get_num_threads()} threads): live {med['live']:.1f} images/s, cached ({args.views} views) "
          f"{med['cached']:.1f} images/s -> {result['speedup']:.2f}x; cache built in {result['cache_build_seconds']} s, "
          f"{(result['cache_bytes'] or 0) / 2**20:.1f} MiB")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
