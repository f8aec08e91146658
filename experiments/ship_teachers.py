#!/usr/bin/env python3
"""Ship a teachers-only run's teachers as ekdc's pretrained weights: each teacher's checkpoint with its
weights in fp16 (half the bytes; a teacher loads them into fp32), and teachers.json with what each scores.

    python experiments/ship_teachers.py runs/strong-teachers weights/cifar10
    python experiments/ship_teachers.py runs/older-teachers runs/strong-teachers weights/cifar10   # later runs win
    python experiments/ship_teachers.py runs/large-wrn weights/cifar10-large   # adds to what is shipped there

Teachers already shipped in the folder (its teachers.json) and not in the runs stay, scored again from their
files, so that teachers trained in separate runs (on 2 CPU cores, one a session) ship one at a time and the
ensemble is always of all of them. They must have been scored on the same split.

A run's teacher replaces the one shipped under its name only where it scores higher on the validation split
(one forward pass; ``--replace`` ships it anyway). One trained on from the very file it replaces (its
recipe's ``weights:`` names that file: a second training cycle) keeps the earlier cycles in its entry
(``earlier_cycles``: each cycle's run, schedule, recipe file, score, seconds, and the sha256 and git commit of
the weights it ended with), and its ``train_seconds`` counts them all.

    python experiments/ship_teachers.py runs/large-cycle2 weights/cifar10-large   # a second cycle, where it pays

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
import subprocess
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
    ap.add_argument("--replace", action="store_true",
                    help="ship a run's teacher even where it scores no higher than the one shipped under its name")
    args = ap.parse_args()
    *runs, out = args.paths
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
    out.mkdir(parents=True, exist_ok=True)
    before = _already_shipped(out, recipe, data)
    entries = {t["name"]: t for t in before}  # in the order they were shipped; a replaced teacher keeps its place

    for name, (run, tcfg, i) in found.items():
        if load_recipe(run / "recipe.yaml").data != recipe.data:
            raise SystemExit(f"{run}: trained on other data than {runs[-1]}: its teachers cannot be scored together")
        candidate = _write_fp16(run / "teachers" / f"{name}.pt", out / f".{name}.candidate.pt")
        try:
            model, ck = load_teacher(candidate, tcfg.arch)
            acc = _score(model, ck, tcfg, data, rt, i)[0]
            shipped = entries.get(name)
            if shipped is not None and acc <= shipped["val_acc"] and not args.replace:
                print(f"{name}: {run} scores {acc:.4f}, the shipped file {shipped['val_acc']:.4f}: the shipped one "
                      "stays (--replace ships it anyway)")
                continue
            entries[name] = _ship(run, tcfg, candidate, out, shipped, data)
        finally:
            candidate.unlink(missing_ok=True)
        print(f"{name}: {acc:.4f} from {run}" + (f", replacing {shipped['val_acc']:.4f}" if shipped else ""))

    shipped, logits, logits_flip = [], [], []
    for i, entry in enumerate(entries.values()):
        model, ck = load_teacher(out / entry["file"], entry["arch"])
        acc, acc_flip, out_plain, out_flip = _score(model, ck, TeacherConfig(arch=entry["arch"], name=entry["name"]),
                                                    data, rt, i)
        logits.append(out_plain)
        logits_flip.append(out_flip)
        shipped.append({**entry, "val_acc": acc, "val_acc_flip_tta": acc_flip})
        print(f"{entry['name']}: {acc:.4f} ({acc_flip:.4f} with flip TTA) on {len(data.val)} validation images, "
              f"{out / entry['file']} ({entry['bytes'] / 1e6:.1f} MB)")
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
    (out / "teachers.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"ensemble of {len(shipped)}: {record['ensemble_val_acc']} "
          f"({record['ensemble_val_acc_flip_tta']} with flip TTA)")


def _score(model, ck, tcfg, data, rt, i: int) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """A teacher's validation accuracy in one forward pass and with flip TTA, and the logits of both."""
    plain = teacher_from_checkpoint(ck, model, tcfg.model_copy(update={"tta": "none"}), data_info(data), i)
    flipped = teacher_from_checkpoint(ck, model, tcfg.model_copy(update={"tta": "flip"}), data_info(data), i)
    out, out_flip = predict(plain, data.val, rt), predict(flipped, data.val, rt)
    return top1(out, data.val_y), top1(out_flip, data.val_y), out, out_flip


def _write_fp16(src: Path, dst: Path) -> Path:
    """A teacher checkpoint with its float weights in fp16, written to ``dst``."""
    ck = _io.load_checkpoint(src, "teacher checkpoint")
    half = {**ck, "state_dict": {k: v.half() if v.is_floating_point() else v for k, v in ck["state_dict"].items()}}
    _io.save_checkpoint(half, dst)
    return dst


def _ship(run: Path, tcfg, candidate: Path, out: Path, shipped: dict | None, data) -> dict:
    """Move ``candidate`` into place as ``out/<name>.pt`` and return its teachers.json entry (scores are added by
    the caller). A teacher trained on from the very file it replaces (``weights:`` naming it) is a later cycle
    of that teacher: the earlier cycles stay in its entry (``earlier_cycles``, oldest first, with the sha256 and
    the git commit of the file each cycle started from), their recipe files are kept under a cycle number,
    and ``train_seconds`` counts every cycle."""
    dst = out / f"{tcfg.name}.pt"
    continues = (shipped is not None and tcfg.weights is not None
                 and Path(tcfg.weights).resolve() == dst.resolve())
    earlier: list[dict] = []
    if continues:
        earlier = [*shipped.get("earlier_cycles", []),
                   {k: v for k, v in shipped.items() if k not in ("earlier_cycles", "name", "arch", "file", "bytes")}]
        cycle_recipe = out / f"{tcfg.name}.cycle{len(earlier)}.recipe.yaml"
        kept_recipe = shipped.get("recipe") and (out / shipped["recipe"]).exists()
        if kept_recipe:
            os.replace(out / shipped["recipe"], cycle_recipe)
        earlier[-1]["recipe"] = cycle_recipe.name if kept_recipe else None  # its name is the new cycle's now
        earlier[-1]["file_sha256"] = _io.file_sha256(dst)
        commit = _last_commit(dst)
        if commit:
            earlier[-1]["file_commit"] = commit  # git show COMMIT:PATH gives that cycle's weights back
        earlier[-1]["train_seconds"] = earlier[-1].get("cycle_seconds", earlier[-1]["train_seconds"])
        earlier[-1].pop("cycle_seconds", None)
    os.replace(candidate, dst)
    ck = _io.load_checkpoint(dst, "teacher checkpoint")
    model, _ = load_teacher(dst, tcfg.arch)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r for r in log if r.get("stage") == f"teacher-{tcfg.name}" and "epoch" in r]
    cycle_seconds = round(float(ck.get("seconds", 0.0)), 1)
    return {
        "name": tcfg.name, "arch": tcfg.arch, "run": str(run), "file": dst.name, "bytes": dst.stat().st_size,
        "params": count_params(model), "macs": count_macs(model, data.image_size),
        "train": tcfg.train.model_dump() if tcfg.train else None,
        "train_seconds": round(cycle_seconds + sum(c["train_seconds"] for c in earlier), 1),
        **({"cycle_seconds": cycle_seconds, "earlier_cycles": earlier} if earlier else {}),
        "recipe": _ship_recipe(run, out / f"{tcfg.name}.recipe.yaml").name,
        "epochs_logged": len(epochs), "last_train_acc": epochs[-1]["train_acc"] if epochs else None,
        **({"last_val_acc": epochs[-1]["val_acc"]} if epochs and "val_acc" in epochs[-1] else {}),
        **({"trained_on": (run / "machine.txt").read_text().strip()} if (run / "machine.txt").exists() else {}),
    }


def _last_commit(path: Path) -> str | None:
    """The last git commit that changed ``path``, if it lies in a git work tree."""
    try:
        res = subprocess.run(["git", "log", "-1", "--format=%H", "--", path.name], cwd=path.parent,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None


def _split(recipe) -> dict:
    """What fixes the validation split, as teachers.json records it."""
    return {"val_per_class": recipe.data.val_per_class, "split_seed": recipe.data.split_seed}


def _ship_recipe(run: Path, dst: Path) -> Path:
    """The run's resolved recipe beside its teacher: what trained it, exactly (schedule, seed, split), with the
    data folder and the teacher files it started from relative to the repository where they lie in it, so that it
    reads alike on another checkout."""
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    root = resolved.get("data", {}).get("root")
    if root and Path(root).is_absolute():
        resolved["data"]["root"] = os.path.relpath(root, ROOT)
    for t in resolved.get("teachers") or []:  # the files a later cycle started from, where they lie in the checkout
        for key in ("weights", "checkpoint", "onnx"):
            if t.get(key) and Path(t[key]).is_absolute() and Path(t[key]).is_relative_to(ROOT):
                t[key] = os.path.relpath(t[key], ROOT)
    dst.write_text(f"# the recipe that trained this teacher ({run}/recipe.yaml, resolved)\n"
                   + yaml.safe_dump(resolved, sort_keys=False))
    return dst


def _already_shipped(out: Path, recipe, data) -> list[dict]:
    """The teachers.json entries of ``out``, after checking they were scored on this recipe's split (an
    ensemble of teachers scored on different validation images means nothing)."""
    path = out / "teachers.json"
    if not path.exists():
        return []
    before = json.loads(path.read_text())
    seen = (before.get("split"), before.get("train_images"), before.get("val_images"))
    if seen != (_split(recipe), len(data.train), len(data.val)):
        raise SystemExit(f"{path}: its teachers were scored on another split than the runs' ({before.get('split')}, "
                         f"{before.get('val_images')} validation images): ship into another folder")
    kept = before["teachers"]
    for t in kept:
        if not (out / t["file"]).exists():
            raise SystemExit(f"{path}: lists {t['name']}, but {out / t['file']} is missing")
    return kept


if __name__ == "__main__":
    main()
