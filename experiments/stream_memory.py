#!/usr/bin/env python3
"""Peak memory and throughput of the two loaders over a whole distill at 128 px.

    python experiments/stream_memory.py [--sizes 500,6000] [--image-size 128] [--loaders stream,memory]

For each training-set size, a whole `ekdc distill` (every stage: two resnet8 teachers trained one epoch
each, then the student one epoch against them in avg_kd, its evaluation and save) with
`data.loader: stream` and with `memory`, on the shared CIFAR-10 JPEGs resized to the image size. The
peak resident memory of the whole process tree (the main process and its decoding workers) is sampled
every 50 ms from /proc (proportional set sizes: shared pages count once); the largest single process's
peak resident memory (what an out-of-memory killer sees, and what ``/usr/bin/time -v`` reports) comes
from the kernel's own account of the finished command (``wait4``'s ``ru_maxrss``: the largest of the
process and its descendants). Also: images/s of the stream loader alone (decoding an epoch, no training)
against the training step's images/s, to show which one bounds a run on this machine.
Writes docs/STREAMING.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10-jpeg" / "train"


def _tree_rss_mib(pid: int) -> float:
    """Memory of ``pid`` and all its descendants, in MiB: their proportional set sizes (PSS), so that
    pages the forked decoding workers share with the main process count once, not once a process."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def _run_measured(cmd: list[str]) -> tuple[float, float, float]:
    """(peak tree PSS MiB, the largest single process's peak RSS MiB, wall seconds) of a command."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0.0
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        peak = max(peak, _tree_rss_mib(proc.pid))
        time.sleep(0.05)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"stream_memory: failed: {shlex.join(cmd)}\n{proc.stderr.read()[-2000:]}")
    return peak, usage.ru_maxrss / 1024, time.time() - t0


def _recipe(out: Path, size: int, image_size: int) -> Path:
    import yaml

    teacher = {"arch": "resnet8", "train": {"epochs": 1, "batch_size": 64, "lr": 0.05}}
    r = {"name": "stream-memory", "seed": 0, "mode": "avg_kd",
         "data": {"dataset": "imagefolder", "root": str(DATA), "image_size": image_size, "per_class": size // 10,
                  "val_per_class": 50, "augment": {"crop_padding": 16, "hflip": True}},
         "teachers": [teacher, dict(teacher)],
         "student": {"trunk_width": 16, "trunk_blocks": 1, "branch_widths": [16, 32, 64], "branch_blocks": 1,
                     "stem": "imagenet", "block": "inverted_residual", "expand_ratio": 4, "num_branches": 1},
         "distill": {"epochs": 1, "batch_size": 64, "lr": 0.05}}
    p = out / f"n{size}.yaml"
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    return p


def _loader_only(recipe: Path) -> float:
    """Images/s of the stream loader decoding one epoch, nothing else."""
    code = ("import sys, time; from ekdc import load_recipe; from ekdc.data import load_data, iterate_batches;"
            "d = load_data(load_recipe(sys.argv[1], ['data.loader=stream']).data); t = time.time();"
            "n = sum(len(x) for x, _ in d.train.batches(list(iterate_batches(len(d.train), 64)))); print(n / (time.time() - t))")
    return float(subprocess.run([sys.executable, "-c", code, str(recipe)], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.split()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="500,6000")
    ap.add_argument("--loaders", default="stream,memory")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--out", default="runs/stream_memory")
    args = ap.parse_args(argv)
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    loaders = [x for x in args.loaders.split(",") if x]
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        recipe = _recipe(out, size, args.image_size)
        row = {"size": size, "loader_only_ips": _loader_only(recipe)}
        for loader in loaders:
            run = out / f"n{size}-{loader}"
            cmd = [sys.executable, "-m", "ekdc", "distill", str(recipe), "--out", str(run), "-q",
                   "--set", f"data.loader={loader}"]
            if run.exists():
                import shutil

                shutil.rmtree(run)
            peak, largest, wall = _run_measured(cmd)
            log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if '"stage"' in line]
            student = [e for e in log if e["stage"].startswith("student")]
            row[loader] = {"peak_mib": peak, "largest_mib": largest, "wall_s": wall,
                           "train_ips": student[-1]["images_per_s"]}
            print(size, loader, row[loader], flush=True)
        rows.append(row)
    lines = ["# Streaming: peak memory and throughput of a whole distill", "",
             "Written by `" + shlex.join(["python", "experiments/stream_memory.py", *(argv if argv is not None else sys.argv[1:])])
             + "` on this machine (2 CPU cores).", "",
             f"The shared CIFAR-10 JPEGs resized to {args.image_size} px; a whole `ekdc distill`: two resnet8 teachers "
             "trained one epoch each, then the student (imagenet stem, inverted-residual blocks) one epoch against "
             "them in avg_kd, batch 64, with the evaluations and saves between; peak resident memory of the whole process tree "
             "(main process and decoding workers; proportional set size, so the pages forked workers share with the "
             "main process count once), sampled every 50 ms.", "",
             "| training images | loader | tree peak PSS MiB | largest process peak RSS MiB | student images/s | wall s "
             "| stream loader alone, images/s |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        for loader in loaders:
            m = r[loader]
            extra = f"{r['loader_only_ips']:.0f}" if loader == "stream" else ""
            lines.append(f"| {r['size']:,} | {loader} | {m['peak_mib']:.0f} | {m['largest_mib']:.0f} | "
                         f"{m['train_ips']:.0f} | {m['wall_s']:.0f} | {extra} |")
    first, last = rows[0]["stream"]["largest_mib"], rows[-1]["stream"]["largest_mib"]
    lines += ["", f"Stream loader, largest process: {first:.0f} MiB at {rows[0]['size']:,} images, {last:.0f} MiB at "
              f"{rows[-1]['size']:,} ({100 * (last / first - 1):+.1f}%)."]
    (ROOT / "docs" / "STREAMING.md").write_text("\n".join(lines) + "\n")
    print("wrote docs/STREAMING.md")


if __name__ == "__main__":
    main()
