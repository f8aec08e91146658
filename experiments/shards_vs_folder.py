#!/usr/bin/env python3
"""The same student from an image folder and from WebDataset shards of it: single-process, and under a
two-node torchrun (two processes on this machine as two nodes, rendezvous on 127.0.0.1).

    python experiments/shards_vs_folder.py [--recipe recipes/cifar10-strong.yaml] [--per-class 500] [--epochs 10] [--mode ce]

The recipe's split at --per-class images a class (and the fixed validation split) is copied into train/ and val/
folders, which `ekdc data shard` writes as shards; three runs then train the recipe's student from the
strong teachers (live: a split read in order has no teacher-output cache; or, with --mode ce, the student
alone, the teachers only scored) for --epochs epochs, seed 0:
from the folders, from the shards, and from the shards under torchrun. Writes docs/SHARDS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ekdc import load_recipe  # noqa: E402
from ekdc.data import index_splits  # noqa: E402


def _copy_split(recipe, out: Path) -> None:
    index = index_splits(recipe.data)
    for split in ("train", "val"):
        part = index.part(split)
        for pos in part.positions:
            src = Path(part.source.files[pos])
            dst = out / split / index.classes[int(part.source.labels[pos])] / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                shutil.copyfile(src, dst)


def _recipe(base: dict, data: dict, path: Path, epochs: int, mode: str) -> Path:
    r = {**base, "mode": mode, "data": {**{k: base["data"][k] for k in ("image_size", "augment")}, **data}}
    r["distill"] = {**base["distill"], "epochs": epochs, "teacher_cache": {"views": 0}}
    if mode == "ce":  # the student alone: the KD term's settings would change nothing, and are refused
        for key in ("kd", "temperature"):
            r["distill"].pop(key, None)
    r["device"] = "cpu"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def _run(cmd: list[str], log: Path, env=None) -> None:
    with open(log, "a") as fh:
        res = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if res.returncode:
        sys.exit(f"shards_vs_folder: failed ({res.returncode}): {' '.join(cmd)}; see {log}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "cifar10-strong.yaml"))
    ap.add_argument("--per-class", type=int, default=500, help="training images a class taken from the recipe's split")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--mode", default=None, help="the recipe's mode unless given (ce: the student alone, faster)")
    ap.add_argument("--out", default="runs/shards_vs_folder")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    recipe = load_recipe(args.recipe, [f"data.per_class={args.per_class}"])
    base = recipe.model_dump(mode="json")
    mode = args.mode or recipe.mode
    _copy_split(recipe, out / "images")  # the runs go to out/run-<data>: apart from the images they read
    py = [sys.executable, "-m", "ekdc"]
    for split in ("train", "val"):
        if not (out / "shards" / split / "shards.json").is_file():
            _run([*py, "data", "shard", str(out / "images" / split), str(out / "shards" / split), "--shard-size", "500"], log)
    folder = _recipe(base, {"dataset": "imagefolder", "root": str(out / "images" / "train"),
                            "val_root": str(out / "images" / "val")}, out / "folder.yaml", args.epochs, mode)
    shard_data = {"dataset": "webdataset", "urls": sorted(str(p) for p in (out / "shards" / "train").glob("*.tar")),
                  "val_urls": sorted(str(p) for p in (out / "shards" / "val").glob("*.tar")), "loader": "stream",
                  "workers": 1}
    shards = _recipe(base, shard_data, out / "shards.yaml", args.epochs, mode)
    for name, r in (("folder", folder), ("shards", shards)):
        if not (out / f"run-{name}" / "metrics.json").is_file():
            _run([*py, "distill", str(r), "--out", str(out / f"run-{name}"), "-q"], log)
    if not (out / "run-two-nodes" / "metrics.json").is_file():
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
        port, env = _free_port(), {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        nodes = [subprocess.Popen([torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(k),
                                   "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "ekdc", "distill",
                                   str(shards), "--out", str(out / "run-two-nodes"), "-q"],
                                  cwd=ROOT, env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT) for k in (0, 1)]
        if any(n.wait() for n in nodes):
            sys.exit(f"shards_vs_folder: the two-node run failed; see {log}")
    rows = []
    for name in ("folder", "shards", "two-nodes"):
        m = json.loads((out / f"run-{name}" / "metrics.json").read_text())
        steps = [json.loads(line).get("steps") for line in (out / f"run-{name}" / "log.jsonl").read_text().splitlines()
                 if json.loads(line).get("stage", "").startswith("student-")]
        rows.append(f"| {name} | {m['world_size']} | {m['train_images']:,} | {steps[-1] if steps else '–'} | "
                    f"{100 * m['student']['ensemble_acc']:.2f} | {100 * m['teacher_ensemble_acc']:.2f} |")
    page = ["# The same student from a folder and from WebDataset shards", "",
            f"Written by `python experiments/shards_vs_folder.py --per-class {args.per_class} --epochs {args.epochs} "
            f"--mode {mode}` on this machine (2 CPU cores).",
            "", f"Recipe: `{Path(args.recipe).name}`'s split ({args.per_class} images a class, the fixed 5,000-image "
            "validation split) "
            f"copied into folders, then `ekdc data shard ... --shard-size 500` ({len(shard_data['urls'])} training "
            f"shards, {len(shard_data['val_urls'])} validation shards); its student trained in mode `{mode}` "
            f"(teachers live where the mode uses them) for {args.epochs} "
            "epochs, seed 0. The "
            "folder is read at random by position, the shards in order (shard order shuffled each epoch, a shuffle "
            "buffer, augmentation drawn per sample key), so the batches differ: the accuracies agree within seed noise "
            "or not at all. Training times are left out: these runs shared the 2 cores with other work.", "",
            "| data | processes | training images | steps an epoch | student acc % | teacher ensemble acc % |",
            "|---|---:|---:|---:|---:|---:|", *rows, "",
            "two-nodes: `torchrun --nnodes 2 --nproc_per_node 1 --node_rank R --master_addr 127.0.0.1` twice, one "
            "thread each; each rank reads its own shards (tests/test_shards.py counts them) and takes half of the recipe's "
            "global batch, so the schedule is the one-process one (tests/test_hardening.py checks the steps).", ""]
    (ROOT / "docs" / "SHARDS.md").write_text("\n".join(page))
    print("\n".join(page))


if __name__ == "__main__":
    main()
