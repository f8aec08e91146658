#!/usr/bin/env python3
"""Bring your own teachers, end to end on CPU: three teachers made outside ekdc's registry, distilled.

    python experiments/byo_teachers.py [--out runs/byo] [--per-class 500] [--teacher-epochs 10] [--epochs 15]

1. Three models are trained briefly on a subset of the shared CIFAR-10 JPEGs (ekdc's own teacher
   stage, from random initialisation): ``torchvision:resnet18``, ``timm:resnet18`` and a registry
   ``resnet20``.
2. Each is then handed over the way a user would get it from elsewhere:
   - the torchvision model as torchvision's training script saves it (``{"model", "args", ...}``);
   - the timm model as timm's train.py saves it (``{"state_dict", "arch", "args", ...}``);
   - the resnet20 as an ONNX file from "another framework": legacy exporter, opset 13, NHWC input in
     BGR order, softmax probabilities, its classes in a shuffled order, batch fixed at 1.
3. ``ekdc distill`` learns a 3-branch student from those three files (``weights:`` and ``onnx:``),
   ``ekdc export`` writes the student and the composed teachers.onnx, ``ekdc bench`` measures both.

Writes docs/BYO-TEACHERS.md with the metrics, the export's parity figures and the bench table.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "train"


def _run(cmd: list[str], log: Path) -> float:
    print("$", shlex.join(cmd), flush=True)
    t0 = time.time()
    with open(log, "a") as fh:
        res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if res.returncode != 0:
        sys.exit(f"byo_teachers: command failed (exit {res.returncode}); see {log}")
    return time.time() - t0


def _ekdc(*args) -> list[str]:
    return [sys.executable, "-m", "ekdc", *map(str, args)]


def _data(args) -> dict:
    return {"dataset": "imagefolder", "root": str(args.data), "image_size": 32, "val_per_class": args.val_per_class,
            "per_class": args.per_class, "augment": {"crop_padding": 4, "hflip": True}}


def train_sources(args, out: Path, log: Path) -> tuple[Path, float]:
    """Step 1: ekdc's teacher stage trains the three models (the student stage is cut to one epoch)."""
    import yaml

    sched = {"epochs": args.teacher_epochs, "batch_size": 64, "lr": 0.05, "warmup_epochs": 1}
    recipe = {"name": "byo-sources", "seed": 0, "mode": "ce", "data": _data(args),
              "teachers": [{"arch": "torchvision:resnet18", "train": sched},
                           {"arch": "timm:resnet18", "input_size": 32, "train": sched},
                           {"arch": "resnet20", "train": sched}],
              "distill": {"epochs": 1, "batch_size": 64}}
    path = out / "sources.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = out / "sources"
    if not (run / "metrics.json").exists():
        resume = ["--resume"] if (run / "recipe.yaml").exists() else []
        _run(_ekdc("distill", path, "--out", run, "-q", *resume), log)
    return run, json.loads((run / "metrics.json").read_text())


def hand_over(run: Path, out: Path) -> dict:
    """Step 2: the trained models as files from elsewhere."""
    import torch
    import torch.nn as nn

    from ekdc import checkpoint

    files = {}
    tv, ck = checkpoint.load_teacher(run / "teachers" / "resnet18.pt", "torchvision:resnet18")
    files["tv"] = out / "resnet18_torchvision.pth"
    torch.save({"model": tv.state_dict(), "optimizer": {}, "lr_scheduler": {}, "epoch": 9,
                "args": argparse.Namespace(model="resnet18", data_path=pathlib.Path(DATA), lr=0.05)}, files["tv"])
    files["tv_norm"] = (ck["mean"], ck["std"])
    tm, ck = checkpoint.load_teacher(run / "teachers" / "resnet18_1.pt", "timm:resnet18")
    files["timm"] = out / "resnet18_timm.pth.tar"
    torch.save({"epoch": 9, "arch": "resnet18", "state_dict": tm.state_dict(), "optimizer": {}, "version": 2,
                "args": argparse.Namespace(model="resnet18", data_dir=pathlib.Path(DATA)), "metric": 0.0}, files["timm"])
    files["timm_norm"] = (ck["mean"], ck["std"])
    net, ck = checkpoint.load_teacher(run / "teachers" / "resnet20.pt", "resnet20")
    order = list(ck["classes"])
    random.Random(0).shuffle(order)
    perm = [ck["classes"].index(c) for c in order]

    class Foreign(nn.Module):  # NHWC, BGR, [0,1] in; probabilities in a shuffled class order out
        def __init__(self):
            super().__init__()
            self.net = net.eval()
            self.register_buffer("mean", torch.tensor(ck["mean"]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(ck["std"]).view(1, 3, 1, 1))
            self.register_buffer("perm", torch.tensor(perm))

        def forward(self, bgr_nhwc):
            rgb = bgr_nhwc.permute(0, 3, 1, 2).flip(1)
            return torch.softmax(self.net((rgb - self.mean) / self.std), -1).index_select(1, self.perm)

    files["onnx"] = out / "resnet20_foreign.onnx"
    torch.onnx.export(Foreign().eval(), (torch.rand(1, 32, 32, 3),), str(files["onnx"]), dynamo=False,
                      opset_version=13, input_names=["bgr_image"], output_names=["probs"])
    files["onnx_classes"] = order
    return files


def distill_from_files(args, files: dict, out: Path, log: Path) -> tuple[Path, float]:
    """Step 3: distill, export, bench."""
    import yaml

    recipe = {
        "name": "byo", "seed": 0, "mode": "avg_kd", "data": _data(args),
        "teachers": [
            {"arch": "torchvision:resnet18", "weights": str(files["tv"]), "input_size": 32,
             "mean": files["tv_norm"][0], "std": files["tv_norm"][1]},
            {"arch": "timm:resnet18", "weights": str(files["timm"]), "input_size": 32,
             "mean": files["timm_norm"][0], "std": files["timm_norm"][1]},
            {"onnx": str(files["onnx"]), "input_size": 32, "mean": [0, 0, 0], "std": [1, 1, 1], "channel_order": "bgr",
             "layout": "nhwc", "outputs": "probabilities", "classes": files["onnx_classes"]},
        ],
        "student": {"trunk_width": 16, "trunk_blocks": 1, "branch_widths": [16, 32, 64], "branch_blocks": 1},
        "distill": {"epochs": args.epochs, "batch_size": 64, "lr": 0.05, "warmup_epochs": 1, "temperature": 4.0},
    }
    path = out / "byo.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run = out / "byo"
    secs = 0.0
    if not (run / "metrics.json").exists():
        resume = ["--resume"] if (run / "recipe.yaml").exists() else []
        secs = _run(_ekdc("distill", path, "--out", run, "-q", *resume), log)
    _run(_ekdc("export", run, "--out", out / "export", "--int8"), log)
    _run(_ekdc("bench", out / "export" / "student.onnx", out / "export" / "student.int8.onnx", "--batch", "1,64",
               "--json", out / "bench.json"), log)
    return run, secs


def write_doc(args, sources: dict, run: Path, secs: float, out: Path) -> None:
    from ekdc.benchmark.report import markdown_table

    m = json.loads((run / "metrics.json").read_text())
    man = json.loads((out / "export" / "manifest.json").read_text())
    bench = json.loads((out / "bench.json").read_text())
    lines = ["# Bring your own teachers: a CPU run", "",
             "Written by `" + shlex.join(["python", "experiments/byo_teachers.py", *args.argv]) + "` on this machine (2 CPU cores, "
             "no GPU).",
             "", f"Data: {args.per_class * 10:,} training images of the shared CIFAR-10 JPEGs ({args.per_class} a class, "
             f"seeded), validated on {args.val_per_class * 10:,} held-out images, 32 px.", "",
             "## The teachers, as trained briefly by ekdc's teacher stage and handed over as files", "",
             "| teacher | handed over as | val acc | params | MACs |", "|---|---|---:|---:|---:|"]
    how = {"torchvision": "torchvision training-script checkpoint (`weights:`)",
           "timm": "timm train.py checkpoint (`weights:`)",
           "onnx": "ONNX, opset 13, NHWC, BGR, probabilities, shuffled classes, batch 1 (`onnx:`)"}
    for t in m["teachers"]:
        lines.append(f"| {t['arch']} | {how[t['source']]} | {100 * t['acc']:.2f} | {t['params'] / 1e6:.2f}M | {t['macs'] / 1e6:.1f}M |")
    src = {t["arch"]: t["acc"] for t in sources["teachers"]}
    lines += ["", "Accuracy of the same models right after training, before the hand-over: " +
              ", ".join(f"{a} {100 * v:.2f}" for a, v in src.items()) + ".", "",
              "## The student", "",
              f"`{m['mode']}`, {args.epochs} epochs: ensemble **{100 * m['student']['ensemble_acc']:.2f}%** "
              f"(branches {' / '.join(f'{100 * b:.2f}' for b in m['student']['branch_acc'])}); teacher ensemble "
              f"{100 * m['teacher_ensemble_acc']:.2f}%. Student {m['student']['params'] / 1e6:.2f}M params, "
              f"{m['student']['macs'] / 1e6:.1f}M MACs. Student training {m['seconds']:.0f} s (the teachers were used as "
              f"they are); the teachers' own training took {sources['seconds']:.0f} s.", "",
              "## Export parity (`ekdc export`, all validation images)", ""]
    for f in man["files"]:
        lines.append(f"- `{f['file']}`: {f['parity_summary']}, val acc {100 * f['accuracy']:.2f}%")
    lines += ["", "## Bench (`ekdc bench`, against the composed teachers.onnx)", "", markdown_table(bench)]
    (ROOT / "docs" / "BYO-TEACHERS.md").write_text("\n".join(lines) + "\n")
    print("wrote docs/BYO-TEACHERS.md")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/byo")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--val-per-class", type=int, default=100)
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=15)
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "byo.log"
    sources_run, sources = train_sources(args, out, log)
    files = hand_over(sources_run, out)
    run, secs = distill_from_files(args, files, out, log)
    write_doc(args, sources, run, secs, out)


if __name__ == "__main__":
    main()
