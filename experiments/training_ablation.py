#!/usr/bin/env python3
"""What each fast-training option is worth: one teacher family (FastNet-S) trained by ekdc's one training
loop (``ekdc distill --teachers-only``) on a CIFAR-10 subset, the full fast recipe against the same recipe
with one option turned off at a time, each at several seeds.

    python experiments/training_ablation.py                       # 1,000 images a class, 8 epochs, seeds 0,1
    python experiments/training_ablation.py --report-only         # rebuild docs/TRAINING-ABLATION.md

Every cell is a run folder under runs/ablation/<row>-s<seed>/ (kept: a cell that finished is not run
again, so the script resumes where it stopped); docs/TRAINING-ABLATION.md and docs/training-ablation.json
are written from the finished cells. Validation: the fixed 5,000-image split (500 a class, split_seed 0).

Two options are model choices rather than recipe keys; the rows that turn them off do it here, in this
process: "no whitening" leaves FastNet's first layer at its random initialisation (still frozen), and
"no shift rate" trains the BatchNorm shifts at the schedule's own rate (no 64x parameter group).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ekdc import distill, load_recipe  # noqa: E402
from ekdc.comparison import parse_seeds  # noqa: E402
from ekdc.comparison.stats import mean_std, paired_diffs, paired_gap, pct_mean_std  # noqa: E402
from ekdc.models import fastnet  # noqa: E402

RECIPE = ROOT / "recipes" / "cifar10-strong-teachers.yaml"
FAST = {"arch": "fastnet_s", "epochs": 8, "batch_size": 512, "lr": 0.75, "momentum": 0.85, "weight_decay": 1.33e-3,
        "schedule": "linear", "warmup_epochs": 2, "label_smoothing": 0.2, "ema_decay": 0.99}
# row -> (what it changes, recipe overrides of teachers.0.train, model patch)
ROWS = {
    "all": ("the fast recipe", {}, None),
    "no-ema": ("no weight EMA", {"ema_decay": 0}, None),
    "no-smoothing": ("no label smoothing", {"label_smoothing": 0}, None),
    "cosine": ("cosine schedule, no warm-up (instead of triangular)", {"schedule": "cosine", "warmup_epochs": 0}, None),
    "no-whitening": ("random frozen first layer (no whitening)", {}, "no_whitening"),
    "no-shift-rate": ("BatchNorm shifts at the common rate", {}, "no_shift_rate"),
    "plain": ("all of the above off: SGD, cosine, no smoothing, no EMA, no whitening, no shift rate",
              {"ema_decay": 0, "label_smoothing": 0, "schedule": "cosine", "warmup_epochs": 0}, "both"),
}


def patched(which):
    """FastNet with one of its own choices undone, for the rows that ablate them."""
    saved = (fastnet.FastNet.init_from_data, fastnet.FastNet.param_groups)
    if which in ("no_whitening", "both"):
        fastnet.FastNet.init_from_data = lambda self, images: None
    if which in ("no_shift_rate", "both"):
        fastnet.FastNet.param_groups = lambda self: [{"params": [p for p in self.parameters() if p.requires_grad]}]
    return saved


def run_cell(row: str, seed: int, per_class: int, epochs: int, out: Path) -> dict:
    done = out / "teachers" / "metrics.json"
    if not done.exists():
        _, over, patch = ROWS[row]
        train = {**FAST, "epochs": epochs, **over}
        arch = train.pop("arch")
        sets = [f"seed={seed}", f"data.per_class={per_class}", f"teachers=[{{arch: {arch}}}]"]
        recipe = load_recipe(RECIPE, sets)
        recipe.teachers[0].train = recipe.teachers[0].train.model_copy(update=train)
        saved = patched(patch)
        try:
            t0 = time.perf_counter()
            distill(recipe, out, teachers_only=True, progress=False, resume=out.exists())
            print(f"{row} seed {seed}: {time.perf_counter() - t0:.0f} s", flush=True)
        finally:
            fastnet.FastNet.init_from_data, fastnet.FastNet.param_groups = saved
    m = json.loads(done.read_text())
    return {"row": row, "seed": seed, "val_acc": m["teachers"][0]["acc"]}


def report(cells: list[dict], args) -> None:
    by_row = {r: [c["val_acc"] for c in cells if c["row"] == r] for r in ROWS}
    base = {c["seed"]: c["val_acc"] for c in cells if c["row"] == "all"}
    lines = [
        "# What each fast-training option is worth",
        "",
        f"FastNet-S trained by ekdc's training loop (`ekdc distill --teachers-only`) on {args.per_class:,} CIFAR-10",
        f"images a class for {args.epochs} epochs, scored on the fixed 5,000-image validation split; seeds "
        f"{args.seeds}. Each row turns one option of the fast recipe off (the recipe: batch 512, lr 0.75,",
        "Nesterov momentum 0.85, weight decay 1.33e-3, triangular schedule with a 2-epoch warm-up, label",
        "smoothing 0.2, weight EMA 0.99, FastNet's whitening and 64x BatchNorm-shift rate).",
        "",
        f"    python experiments/training_ablation.py --per-class {args.per_class} --epochs {args.epochs} --seeds {args.seeds}",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}.",
        "",
        "| row | what changes | val acc (mean ± std) | vs the fast recipe (paired by seed) | n |",
        "|---|---|---:|---:|---:|",
    ]
    summary = {}
    for row, accs in by_row.items():
        if not accs:
            continue
        mine = {c["seed"]: c["val_acc"] for c in cells if c["row"] == row}
        gap = paired_gap(mine, base)
        text = f"{pct_mean_std(paired_diffs(mine, base), signed=True)} ({gap['ahead']} of {gap['seeds']} ahead)"
        lines.append(f"| {row} | {ROWS[row][0]} | {pct_mean_std(accs)} | {text if row != 'all' else ''} | {len(accs)} |")
        summary[row] = {"mean": mean_std(accs)[0], "std": mean_std(accs)[1], "n": len(accs), "gap_vs_all": gap}
    (ROOT / "docs" / "TRAINING-ABLATION.md").write_text("\n".join(lines) + "\n")
    (ROOT / "docs" / "training-ablation.json").write_text(json.dumps({"cells": cells, "summary": summary,
                                                                        "per_class": args.per_class,
                                                                        "epochs": args.epochs}, indent=2) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    cells = []
    for seed in parse_seeds(args.seeds):
        for row in args.rows.split(","):
            out = ROOT / "runs" / "ablation" / f"{row}-pc{args.per_class}-e{args.epochs}-s{seed}"
            if args.report_only and not (out / "teachers" / "metrics.json").exists():
                continue
            cells.append(run_cell(row, seed, args.per_class, args.epochs, out))
    report(cells, args)


if __name__ == "__main__":
    main()
