#!/usr/bin/env python3
"""int8 that keeps its accuracy? fp32, post-training int8 (ONNX Runtime), quantization-aware distillation
(NVIDIA ModelOpt, against the teachers) and QAD without the teachers (the labels only), on one trained
student, 3 seeds for the trained rows; accuracy, agreement with fp32, and batch 1 / 64 latency in one bench
run.

    python experiments/int8_study.py --run runs/headline/recipe/s0 [--epochs 2] [--seeds 0] [--methods ptq,qad]
    python experiments/int8_study.py --report-only

Writes docs/INT8.md and docs/int8/ (seed 0's files and int8.json). The student is any finished run's
(the headline's full-data student by default: experiments/headline.py trains it); the page describes it
from the run's own recipe.yaml and metrics.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ekdc import bench, export  # noqa: E402
from ekdc.comparison import parse_seeds  # noqa: E402
from ekdc.deploy.qad import QADSettings  # noqa: E402

METHODS = ("ptq", "qad", "qat_labels")


def _entry(manifest: dict, name: str) -> dict:
    return next(f for f in manifest["files"] if f["file"] == name)


def run(args) -> dict:
    out = Path(args.out)
    results = {"run": str(args.run), "rows": []}
    base = out / "ptq"
    if not (base / "manifest.json").is_file():
        export(args.run, base, int8=True)
    m = json.loads((base / "manifest.json").read_text())
    fp32 = _entry(m, "student.onnx")
    results["rows"].append({"method": "fp32", "seed": None, "val_acc": fp32["accuracy"], "agreement": 1.0,
                            "file": str(base / "student.onnx")})
    ptq = _entry(m, "student.int8.onnx")
    results["rows"].append({"method": "ptq", "seed": None, "val_acc": ptq["accuracy"],
                            "agreement": ptq["parity"]["argmax_agreement"], "file": str(base / "student.int8.onnx"),
                            "fold": m["fold"].get("int8_choice")})
    for method in (m for m in args.methods if m != "ptq"):
        for seed in args.seeds:
            folder = out / f"{method}-s{seed}"
            if not (folder / "manifest.json").is_file():
                export(args.run, folder, int8=True, teachers=False,
                       qad=QADSettings(epochs=args.epochs, seed=seed, teachers=method == "qad"))
            e = _entry(json.loads((folder / "manifest.json").read_text()), "student.int8.onnx")
            results["rows"].append({"method": method, "seed": seed, "val_acc": e["accuracy"],
                                    "agreement": e["parity"]["argmax_agreement"], "file": str(folder / "student.int8.onnx"),
                                    "quantization": e["quantization"]})
    return results


def timing(results: dict, args) -> dict:
    """fp32 and every int8 method's seed-0 file in one bench run, rounds interleaved."""
    files = [r["file"] for r in results["rows"] if r["seed"] in (None, args.seeds[0])]
    report = bench(files, batches=[1, 64], repeats=args.repeats, json_path=Path(args.out) / "bench.json")
    names = {m["path"]: m for m in report["models"]}
    return {f: {"p50_ms": {b: names[f]["latency_ms"][b]["p50"] for b in ("1", "64")}, "model_mem_mb": names[f]["model_mem_mb"]}
            for f in files}


def profile(path: str, batch: int = 64, runs: int = 30) -> list[tuple[str, float]]:
    """ONNX Runtime's profiler on one file: each operator type's share of the node time."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(path).with_suffix(""))
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((batch, 3, 32, 32), dtype=np.float32)
    for _ in range(runs):
        sess.run(None, {"images": x})
    trace = json.loads(Path(sess.end_profiling()).read_text())
    per: dict[str, float] = {}
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            per[op] = per.get(op, 0.0) + ev["dur"]
    total = sum(per.values()) or 1.0
    return sorted(((op, 100 * t / total) for op, t in per.items()), key=lambda kv: -kv[1])[:8]


def _mean_std(xs):
    m = statistics.mean(xs)
    return f"{100 * m:.2f}" + (f" ± {100 * statistics.stdev(xs):.2f}" if len(xs) > 1 else "")


def describe_student(run: Path) -> str:
    """The student in words, from its run's own files."""
    import yaml

    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    student = recipe.get("student") or {}
    shape = ", ".join(f"{k} {v}" for k, v in student.items() if k != "arch" and v is not None)
    return (f"the student of `{run}`: `{student.get('arch', 'ekd_student')}` ({shape}), mode `{recipe.get('mode')}`, "
            f"{metrics['train_images']:,} training images, {metrics['student']['macs'] / 1e6:.1f}M MACs")


def write(results: dict, times: dict, args) -> None:
    docs = Path(args.docs)
    (docs / "int8").mkdir(parents=True, exist_ok=True)
    rows = results["rows"]
    fp32 = rows[0]
    t_fp32 = times[fp32["file"]]["p50_ms"]
    lines = ["# int8: post-training against quantization-aware distillation", "",
             f"Written by `python experiments/int8_study.py --run {args.run} --epochs {args.epochs} --seeds "
             f"{','.join(map(str, args.seeds))} --methods {','.join(args.methods)}` from finished exports "
             "(`--report-only` rebuilds it). Machine: this 2-core CPU; ONNX Runtime CPU for every file.", "",
             f"The student: {describe_student(Path(args.run))}, folded. Accuracy: the files' own, on the validation "
             "split; agreement: the share of validation images where the int8 file's top class is the fp32 file's. "
             f"QAD: {args.epochs} epochs of the run's own objective (its teachers and loss) on the folded graph with "
             "NVIDIA ModelOpt's int8 fake quantisation (per-channel weights, per-tensor activations), a stage of "
             "ekdc's one training loop; its weights and ranges written in ONNX Runtime's QDQ form "
             "(`student.int8.onnx`: `QLinearConv` on CPU), ModelOpt's TensorRT-style file beside it. "
             "`qat_labels`: the same without the teachers. PTQ: ONNX Runtime static QDQ, per-channel int8 weights, "
             "uint8 activations.", "",
             "| method | seeds | val acc % | vs fp32, points | agreement with fp32 % | p50 ms @1 | p50 ms @64 | "
             "speedup @1 | speedup @64 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    summary = []
    for method in ("fp32", *args.methods):
        rs = [r for r in rows if r["method"] == method]
        if not rs:
            continue
        accs = [r["val_acc"] for r in rs]
        gaps = [a - fp32["val_acc"] for a in accs]
        t = times.get(next(r["file"] for r in rs if r["seed"] in (None, args.seeds[0])), {}).get("p50_ms")
        sp = {b: t_fp32[b] / t[b] for b in ("1", "64")} if t else None
        lines.append(f"| {method} | {len(rs)} | {_mean_std(accs)} | {100 * statistics.mean(gaps):+.2f} | "
                     f"{_mean_std([r['agreement'] for r in rs])} | {t['1']:.3f} | {t['64']:.2f} | {sp['1']:.2f}x | "
                     f"{sp['64']:.2f}x |")
        summary.append({"method": method, "accs": accs, "speedup": sp})
    lines += ["", "Latency: one `ekdc bench` run (3 rounds, files interleaved, each in a fresh process), seed 0's files; "
              "the fold layout of the int8 files is the one fastest in int8 (export times both).", ""]
    prof = args.profile
    if prof:
        lines += ["ONNX Runtime's profiler, share of node time by operator:", ""]
        for (name, batch), ops in prof.items():
            lines.append(f"- {name}, batch {batch}: " + ", ".join(f"{op} {pct:.0f}%" for op, pct in ops))
        lines.append("")
    lines += ["<!-- reading -->", "## Reading", "", *(args.reading or ["(written by hand once the figures are in)"]), ""]
    (docs / "INT8.md").write_text("\n".join(lines))
    files = []
    for r in rows:
        if r["seed"] in (None, args.seeds[0]):
            name = f"{r['method']}.onnx" if r["seed"] is None else f"{r['method']}-s{r['seed']}.onnx"
            shutil.copyfile(r["file"], docs / "int8" / name)
            files.append({"onnx": name, "method": r["method"], "seed": r["seed"] if r["seed"] is not None else 0,
                          "val_acc": r["val_acc"], "agreement": r["agreement"]})
    (docs / "int8" / "int8.json").write_text(json.dumps({"files": files}, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/headline/recipe/s0")
    ap.add_argument("--out", default="runs/int8_study")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS), help="of " + ", ".join(METHODS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    args.seeds = parse_seeds(args.seeds)
    args.methods = [m for m in args.methods.split(",") if m]
    if not args.methods or set(args.methods) - set(METHODS):
        ap.error(f"--methods {','.join(args.methods)}: each must be one of {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    if args.report_only:
        results, times = json.loads(results_path.read_text()), json.loads((out / "times.json").read_text())
    else:
        results = run(args)
        results_path.write_text(json.dumps(results, indent=1))
        times = timing(results, args)
        (out / "times.json").write_text(json.dumps(times, indent=1))
    args.profile = {(r["method"], b): profile(r["file"], batch=b) for r in results["rows"] for b in (1, 64)
                    if r["seed"] in (None, args.seeds[0]) and r["method"] in ("fp32", "ptq", "qad")}
    page = Path(args.docs) / "INT8.md"
    text = page.read_text() if page.is_file() else ""
    args.reading = text.split("<!-- reading -->", 1)[1].strip().splitlines()[1:] if "<!-- reading -->" in text else None
    write(results, times, args)
    print(f"wrote {page}")


if __name__ == "__main__":
    main()
