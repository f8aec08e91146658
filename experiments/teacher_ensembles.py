#!/usr/bin/env python3
"""Which ensembles of ekdc's shipped CIFAR-10 teachers score highest: more teachers, or stronger ones?

    python experiments/teacher_ensembles.py            # writes docs/TEACHER-ENSEMBLES.md

Scores every teacher file in weights/cifar10-large/ and weights/cifar10/ (one forward pass each, fp32, on the
fixed 5,000-image validation split both sets were scored on) and every ensemble of two or more of them, by the
mean of their logits (what ekdc's ensemble is) and, beside it, by the mean of their probabilities. The page
lists each teacher, the best ensembles, and the best within about 1 GMAC (the issue's bound on the teachers).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ekdc.checkpoint import load_teacher  # noqa: E402
from ekdc.contract import top1  # noqa: E402
from ekdc.data import load_data  # noqa: E402
from ekdc.distillation.evaluation import predict  # noqa: E402
from ekdc.distillation.stages import data_info  # noqa: E402
from ekdc.models import count_macs  # noqa: E402
from ekdc.recipe import TeacherConfig, load_recipe  # noqa: E402
from ekdc.teachers import teacher_from_checkpoint  # noqa: E402
from ekdc.training.runtime import setup_runtime  # noqa: E402

FOLDERS = ("weights/cifar10-large", "weights/cifar10")
MAC_BOUND = 1.05e9  # "within about 1 GMAC"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "TEACHER-ENSEMBLES.md")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    data = load_data(load_recipe(ROOT / "recipes" / "cifar10-strong.yaml").data)
    rt = setup_runtime("cpu", "fp32", False)
    logits, teachers = {}, []
    for folder in FOLDERS:
        for entry in json.loads((ROOT / folder / "teachers.json").read_text())["teachers"]:
            model, ck = load_teacher(ROOT / folder / entry["file"], entry["arch"])
            tcfg = TeacherConfig(arch=entry["arch"], name=entry["name"])
            key = f"{Path(folder).name}/{entry['name']}"
            logits[key] = predict(teacher_from_checkpoint(ck, model, tcfg, data_info(data), len(teachers)), data.val, rt)
            teachers.append({"teacher": key, "val_acc": top1(logits[key], data.val_y), "macs": count_macs(model, data.image_size)})
            print(f"{key}: {teachers[-1]['val_acc']:.4f}", flush=True)
    macs = {t["teacher"]: t["macs"] for t in teachers}
    ensembles = []
    for k in range(2, len(teachers) + 1):
        for names in itertools.combinations(logits, k):
            stacked = torch.stack([logits[n] for n in names])
            ensembles.append({"teachers": names, "logits": top1(stacked.mean(0), data.val_y),
                              "probs": top1(stacked.softmax(-1).mean(0), data.val_y), "macs": sum(macs[n] for n in names)})
    ensembles.sort(key=lambda e: (-e["logits"], e["macs"]))
    within = [e for e in ensembles if e["macs"] <= MAC_BOUND]

    def table(rows):
        lines = ["| teachers | logits averaged | probabilities averaged | MACs |", "|---|---:|---:|---:|"]
        lines += [f"| {', '.join(r['teachers'])} | {100 * r['logits']:.2f}% | {100 * r['probs']:.2f}% | "
                  f"{r['macs'] / 1e6:.0f}M |" for r in rows]
        return lines

    shipped = next(e for e in ensembles if e["teachers"] == tuple(k for k in logits if k.startswith(f"{Path(FOLDERS[0]).name}/")))
    md = ["# Teacher ensembles: more teachers, or stronger ones?", "",
          "    python experiments/teacher_ensembles.py", "",
          f"Every teacher file in {' and '.join(f'`{f}/`' for f in FOLDERS)}, one forward pass in fp32 on the fixed "
          f"{len(data.val):,}-image validation split, and every ensemble of two or more of them.", "",
          "| teacher | val acc | MACs |", "|---|---:|---:|",
          *[f"| {t['teacher']} | {100 * t['val_acc']:.2f}% | {t['macs'] / 1e6:.1f}M |" for t in teachers], "",
          f"The shipped ensemble ({', '.join(shipped['teachers'])}): {100 * shipped['logits']:.2f}%, "
          f"{shipped['macs'] / 1e6:.0f}M MACs.", "",
          f"## The {args.top} best ensembles", "", *table(ensembles[:args.top]), "",
          f"## The {args.top} best within {MAC_BOUND / 1e9:.2f} GMAC", "", *table(within[:args.top]), "",
          f"The best of all {len(ensembles)} ensembles scores {100 * ensembles[0]['logits']:.2f}%, "
          f"{100 * (ensembles[0]['logits'] - shipped['logits']):+.2f} points over the shipped three at "
          f"{ensembles[0]['macs'] / shipped['macs']:.2f}x their MACs; "
          f"{sum(e['logits'] >= 0.93 for e in ensembles)} of the {len(ensembles)} reach 93%.", ""]
    args.out.write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
