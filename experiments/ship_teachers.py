#!/usr/bin/env python3
"""Ship a teachers-only run's teachers as ekdc's pretrained weights: each teacher's checkpoint with its
weights in fp16 (half the bytes; a teacher loads them into fp32), and teachers.json with what each scores.

    python experiments/ship_teachers.py runs/strong-teachers weights/cifar10
    python experiments/ship_teachers.py runs/older-teachers runs/strong-teachers weights/cifar10   # later runs win
    python experiments/ship_teachers.py runs/large-wrn weights/cifar10-large   # adds to what is shipped there

Teachers already shipped in the folder (its teachers.json) and not in the runs stay, scored again from their
files, so that teachers trained in separate runs (on 2 CPU cores, one a session) ship one at a time and the
ensemble is always of all of them. They must have been scored on the same split.

Every accuracy in teachers.json is the shipped fp16 file's own, scored again here on the run's validation
split, one forward pass (val_acc) and with flip test-time augmentation (val_acc_flip_tta: the mean of the
image's and its mirror's logits, what ``tta: flip`` in a recipe uses). Teachers that the run
has not finished yet are left out, so the script can be run after each one.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ekdc import _io  # noqa: E402
from ekdc.checkpoint import load_teacher  # noqa: E402
from ekdc.contract import top1  # noqa: E402
from ekdc.data import load_data  # noqa: E402
from ekdc.distillation.evaluation import predict  # noqa: E402
from ekdc.training.runtime import setup_runtime  # noqa: E402
from ekdc.distillation.stages import data_info  # noqa: E402
from ekdc.models import count_macs, count_params  # noqa: E402
from ekdc.recipe import TeacherConfig, load_recipe  # noqa: E402
from ekdc.teachers import teacher_from_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", type=Path, nargs="+", help="RUN [RUN ...] OUT: teachers-only runs (of one data split), "
                                                         "then the folder to ship into")
    args = ap.parse_args()
    *runs, out = args.paths
    args.out = out
    found: dict[str, tuple[Path, object, int]] = {}  # teacher name -> (run, its config, index); later runs win
    for run in runs:
        recipe = load_recipe(run / "recipe.yaml")
        for i, tcfg in enumerate(recipe.teachers):
            if (run / "teachers" / f"{tcfg.name}.pt").exists():
                found[tcfg.name] = (run, tcfg, i)
            else:
                print(f"{run}: {tcfg.name} not finished yet, left out")
    data = load_data(recipe.data)
    rt = setup_runtime("cpu", "fp32", False)
    args.out.mkdir(parents=True, exist_ok=True)
    kept = _already_shipped(args.out, recipe, data, set(found))
    shipped, logits, logits_flip = [], [], []

    def score(model, ck, tcfg, i: int) -> tuple[float, float]:
        teacher = teacher_from_checkpoint(ck, model, tcfg.model_copy(update={"tta": "none"}), data_info(data), i)
        flipped = teacher_from_checkpoint(ck, model, tcfg.model_copy(update={"tta": "flip"}), data_info(data), i)
        out, out_flip = predict(teacher, data.val, rt), predict(flipped, data.val, rt)
        logits.append(out)
        logits_flip.append(out_flip)
        return top1(out, data.val_y), top1(out_flip, data.val_y)

    for i, entry in enumerate(kept):
        model, ck = load_teacher(args.out / entry["file"], entry["arch"])
        acc, acc_flip = score(model, ck, TeacherConfig(arch=entry["arch"], name=entry["name"]), i)
        shipped.append({**entry, "val_acc": acc, "val_acc_flip_tta": acc_flip})
        print(f"{entry['name']}: {acc:.4f} ({acc_flip:.4f} with flip TTA), already shipped in {args.out}")
    for name, (run, tcfg, i) in found.items():
        if load_recipe(run / "recipe.yaml").data != recipe.data:
            raise SystemExit(f"{run}: trained on other data than {runs[-1]}: its teachers cannot be scored together")
        src = run / "teachers" / f"{tcfg.name}.pt"
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
        ck = _io.load_checkpoint(src, "teacher checkpoint")
        half = {**ck, "state_dict": {k: v.half() if v.is_floating_point() else v for k, v in ck["state_dict"].items()}}
        dst = args.out / f"{tcfg.name}.pt"
        _io.save_checkpoint(half, dst)
        model, ck2 = load_teacher(dst, tcfg.arch)
        acc, acc_flip = score(model, ck2, tcfg, len(shipped))
        recipe_file = _ship_recipe(run, args.out / f"{tcfg.name}.recipe.yaml")
        epochs = [r for r in log if r.get("stage") == f"teacher-{tcfg.name}"]
        shipped.append({
            "name": tcfg.name, "arch": tcfg.arch, "run": str(run), "file": dst.name, "bytes": dst.stat().st_size,
            "val_acc": acc, "val_acc_flip_tta": acc_flip, "params": count_params(model),
            "macs": count_macs(model, data.image_size), "train": tcfg.train.model_dump() if tcfg.train else None,
            "train_seconds": round(float(ck.get("seconds", 0.0)), 1), "recipe": recipe_file.name,
            "epochs_logged": len(epochs), "last_train_acc": epochs[-1]["train_acc"] if epochs else None,
            **({"trained_on": (run / "machine.txt").read_text().strip()} if (run / "machine.txt").exists() else {}),
        })
        print(f"{tcfg.name}: {acc:.4f} ({acc_flip:.4f} with flip TTA) on {len(data.val)} validation images, "
              f"{dst} ({dst.stat().st_size / 1e6:.1f} MB)")
    record = {
        "runs": list(dict.fromkeys([t["run"] for t in shipped] + [str(r) for r in runs])),
        "data_root": recipe.data.root, "train_images": len(data.train), "val_images": len(data.val),
        "split": _split(recipe), "teachers": shipped,
        "ensemble_val_acc": top1(torch.stack(logits).mean(0), data.val_y) if logits else None,
        "ensemble_val_acc_flip_tta": top1(torch.stack(logits_flip).mean(0), data.val_y) if logits else None,
        "ensemble_macs": sum(t["macs"] for t in shipped),
        "train_hours": round(sum(t["train_seconds"] for t in shipped) / 3600, 2),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
    }
    (args.out / "teachers.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"ensemble of {len(shipped)}: {record['ensemble_val_acc']} "
          f"({record['ensemble_val_acc_flip_tta']} with flip TTA)")


def _split(recipe) -> dict:
    """What fixes the validation split, as teachers.json records it."""
    return {"val_per_class": recipe.data.val_per_class, "split_seed": recipe.data.split_seed}


def _ship_recipe(run: Path, dst: Path) -> Path:
    """The run's resolved recipe beside its teacher: what trained it, exactly (schedule, seed, split), with the
    data folder relative to the repository where it lies beside it, so that it reads alike on another checkout."""
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    root = resolved.get("data", {}).get("root")
    if root and Path(root).is_absolute():
        resolved["data"]["root"] = os.path.relpath(root, ROOT)
    dst.write_text(f"# the recipe that trained this teacher ({run}/recipe.yaml, resolved)\n"
                   + yaml.safe_dump(resolved, sort_keys=False))
    return dst


def _already_shipped(out: Path, recipe, data, replaced: set[str]) -> list[dict]:
    """The teachers.json entries of ``out`` that no run replaces, after checking they were scored on this
    recipe's split (an ensemble of teachers scored on different validation images means nothing)."""
    path = out / "teachers.json"
    if not path.exists():
        return []
    before = json.loads(path.read_text())
    seen = (before.get("split"), before.get("train_images"), before.get("val_images"))
    if seen != (_split(recipe), len(data.train), len(data.val)):
        raise SystemExit(f"{path}: its teachers were scored on another split than the runs' ({before.get('split')}, "
                         f"{before.get('val_images')} validation images): ship into another folder")
    kept = [t for t in before["teachers"] if t["name"] not in replaced]
    for t in kept:
        if not (out / t["file"]).exists():
            raise SystemExit(f"{path}: lists {t['name']}, but {out / t['file']} is missing")
    return kept


if __name__ == "__main__":
    main()
