#!/usr/bin/env python3
"""A CPU run at real resolution: the shared CIFAR-10 JPEGs resized to 128 px, streamed, a photo-sized
student (imagenet stem, inverted-residual blocks), three small teachers trained here; then export and
bench against the teachers.

    python experiments/real_resolution.py [--per-class 200] [--teacher-epochs 4] [--epochs 6]

Writes docs/REAL-RESOLUTION.md (metrics, the student's MACs and its latency ratio against the teachers).
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "train"


def _run(cmd, log):
    print("$", shlex.join(map(str, cmd)), flush=True)
    with open(log, "a") as fh:
        if subprocess.run(list(map(str, cmd)), stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode:
            sys.exit(f"real_resolution: failed; see {log}")


def main(argv=None) -> None:
    import yaml

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/real_resolution")
    ap.add_argument("--per-class", type=int, default=200)
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=6)
    args = ap.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    sched = {"epochs": args.teacher_epochs, "batch_size": 64, "lr": 0.05, "warmup_epochs": 1}
    recipe = {
        "name": "real-resolution", "seed": 0, "mode": "avg_kd",
        "data": {"dataset": "imagefolder", "root": str(DATA), "image_size": 128, "per_class": args.per_class,
                 "val_per_class": 50, "loader": "stream", "augment": {"kind": "resized_crop", "scale": [0.35, 1.0]}},
        "teachers": [{"arch": "resnet8", "train": sched},
                     {"arch": "torchvision:mobilenet_v3_small", "train": sched},
                     {"arch": "torchvision:shufflenet_v2_x0_5", "train": sched}],
        "student": {"stem": "imagenet", "block": "inverted_residual", "expand_ratio": 4, "trunk_width": 16,
                    "branch_widths": [24, 48, 96], "branch_blocks": 1},
        "distill": {"epochs": args.epochs, "batch_size": 64, "lr": 0.05, "warmup_epochs": 1},
    }
    path = out / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run, log = out / "run", out / "log.txt"
    if not (run / "metrics.json").exists():
        _run([sys.executable, "-m", "ekdc", "distill", path, "--out", run, "-q",
              *(["--resume"] if (run / "recipe.yaml").exists() else [])], log)
    _run([sys.executable, "-m", "ekdc", "export", run, "--out", out / "export", "--int8"], log)
    _run([sys.executable, "-m", "ekdc", "bench", out / "export" / "student.onnx", out / "export" / "student.int8.onnx",
          "--batch", "1,16", "--json", out / "bench.json"], log)
    from ekdc.benchmark.report import markdown_table

    m = json.loads((run / "metrics.json").read_text())
    man = json.loads((out / "export" / "manifest.json").read_text())
    bench = json.loads((out / "bench.json").read_text())
    tm = sum(t["macs"] for t in m["teachers"])
    lines = ["# Real resolution: a CPU run at 128 px", "",
             "Written by `" + shlex.join(["python", "experiments/real_resolution.py", *(argv or sys.argv[1:])])
             + "` on this machine (2 CPU cores).", "",
             f"{m['train_images']:,} training / {m['val_images']:,} validation images of the shared CIFAR-10 JPEGs at 128 px "
             f"({m['loader']} loader; photos' view: decoded at 146 px, RandomResizedCrop for training, the centre for "
             "evaluation); teachers trained here for "
             f"{args.teacher_epochs} epochs, the student for {args.epochs} (`{m['mode']}`).", "",
             "| model | val acc | params | MACs per image |", "|---|---:|---:|---:|",
             f"| student (imagenet stem, inverted residual, 3 branches) | {100 * m['student']['ensemble_acc']:.2f} | "
             f"{m['student']['params'] / 1e6:.2f}M | {m['student']['macs'] / 1e6:.1f}M |"]
    for t in m["teachers"]:
        lines.append(f"| teacher {t['arch']} @{t['input_size']}px | {100 * t['acc']:.2f} | {t['params'] / 1e6:.2f}M | "
                     f"{t['macs'] / 1e6:.1f}M |")
    lines += [f"| teacher ensemble | {100 * m['teacher_ensemble_acc']:.2f} | | {tm / 1e6:.1f}M |", "",
              f"The student has {100 * m['student']['macs'] / tm:.1f}% of the ensemble's MACs. Training took "
              f"{m['seconds']:.0f} s (teachers and student).", "", "Export parity:", ""]
    for f in man["files"]:
        lines.append(f"- `{f['file']}`: {f['parity_summary']}, val acc {100 * f['accuracy']:.2f}%")
    lines += ["", "`ekdc bench` against the teachers.onnx beside the student:", "", markdown_table(bench)]
    (ROOT / "docs" / "REAL-RESOLUTION.md").write_text("\n".join(lines) + "\n")
    print("wrote docs/REAL-RESOLUTION.md")


if __name__ == "__main__":
    main()
