#!/usr/bin/env python3
"""Does padding a FastNet student's widths to whole 16-channel blocks make its ONNX file faster on this CPU?

    python experiments/padded_widths.py            # writes docs/PADDED-WIDTHS.md

ONNX Runtime's CPU convolutions run in its NCHWc layout, in blocks of 16 floats on AVX-512 (8 on AVX2). A
grouped convolution whose groups are not whole blocks is left in plain NCHW, with reorders around it. The
students of docs/EVIDENCE.md's grid have such widths (72, 88, 104): each is folded here both ways, `grouped`
(as trained) and `padded` (every stage widened with zero channels to a multiple of 16: the same function,
``ekdc.models.folding.pad_conv``), through export's own path (``fold`` -> ``DeployModel`` -> ONNX), and the
files are timed by bench's worker (``time_models``: each file in its own process, rounds interleaved),
batch 1 and 64. Weights are random: speed does not depend on them. The ONNX graphs' node counts say which
convolutions ran in NCHWc.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ekdc.benchmark.machine import cpu_model  # noqa: E402
from ekdc.benchmark.runner import time_models  # noqa: E402
from ekdc.models import count_macs, create_model  # noqa: E402
from ekdc.plan.search import _export_files  # noqa: E402

# (name, student config): the limited-data grid's students, the full-data headline's, and one already in blocks
STUDENTS = [
    ("3-branch [64,72,80] (grid: ce, avg_kd, ekd, avg_kd+dkd)", dict(num_branches=3, widths=[64, 72, 80])),
    ("1-branch [88,104,112] (grid: plain, equal MACs)", dict(num_branches=1, widths=[88, 104, 112])),
    ("3-branch [64,80,80] (in whole blocks already)", dict(num_branches=3, widths=[64, 80, 80])),
]


def _nchwc_convs(path: Path) -> tuple[int, int]:
    """(convolutions ONNX Runtime runs in NCHWc, all convolutions) after its full graph optimisation."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    nodes = onnx.load(opts.optimized_model_filepath).graph.node
    kinds = collections.Counter(n.domain for n in nodes if n.op_type == "Conv")
    return kinds["com.microsoft.nchwc"], sum(kinds.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--doc", default=str(ROOT / "docs" / "PADDED-WIDTHS.md"))
    args = ap.parse_args()
    torch.manual_seed(0)
    rows, files = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cfg) in enumerate(STUDENTS):
            student = create_model("fastnet_student", num_classes=10, trunk_stages=1, **cfg).eval()
            for layout in student.fold_layouts:
                path = _export_files(student, layout, 32, "fp32", Path(tmp), f"s{i}-{layout}")
                rows.append({"name": name, "layout": layout, "macs": count_macs(student, 32),
                             "nchwc": _nchwc_convs(path)})
                files.append(path)
        report = time_models(files, batches=[1, 64], repeats=args.rounds)
    for row, m in zip(rows, report["models"]):
        row["b1"] = m["latency_ms"]["1"]["p50"]
        row["b1_rounds"] = m["round_p50_ms"]["1"]
        row["b64"] = m["latency_ms"]["64"]["p50"]
    lines = [
        "# Padded widths: whole 16-channel blocks for ONNX Runtime's CPU kernels",
        "",
        f"Written by `python experiments/padded_widths.py` on {cpu_model()}, {report['settings']['threads']} threads, "
        f"ONNX Runtime {ort.__version__}: each student folded `grouped` (as trained) and `padded` (every stage "
        "widened with zero channels to a multiple of 16; the same function), exported by export's own path and "
        f"timed by bench's worker, {args.rounds} rounds interleaved, each file in its own process (p50 ms, median "
        "over rounds; the rounds' p50 beside it). Random weights: speed does not depend on them. NCHWc: the "
        "convolutions ONNX Runtime runs in its blocked layout after its graph optimisation, of all.",
        "",
        "| student | MACs (trained) | fold | NCHWc convs | batch 1 p50 ms | rounds (batch 1) | batch 64 p50 ms |",
        "|---|---:|---|---:|---:|---|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['macs'] / 1e6:.1f}M | `{r['layout']}` | {r['nchwc'][0]} of {r['nchwc'][1]} | "
                     f"{r['b1']:.3f} | {' '.join(f'{x:.2f}' for x in r['b1_rounds'])} | {r['b64']:.1f} |")
    by = collections.defaultdict(dict)
    for r in rows:
        by[r["name"]][r["layout"]] = r
    lines += ["", "Padded against grouped, the same student (ratio of p50s; below 1: padded is faster):", ""]
    for name, d in by.items():
        if "padded" in d:
            lines.append(f"- {name}: batch 1 {d['padded']['b1'] / d['grouped']['b1']:.2f}x, "
                         f"batch 64 {d['padded']['b64'] / d['grouped']['b64']:.2f}x")
    spread = {r["name"] + " " + r["layout"]: max(r["b1_rounds"]) / min(r["b1_rounds"]) for r in rows}
    lines += ["", "Slowest round over fastest, batch 1: " + ", ".join(f"{k} {v:.2f}" for k, v in spread.items()) + ".",
              "", "`ekdc export --fold auto` times `grouped` and `padded` and keeps the faster; `ekdc plan` times "
              "every candidate in both. The fold is exact: export checks the file against the trained student. "
              "`ekdc bench` counts the padded file's MACs, zeros included (the runtime computes them): a padded "
              "3-branch [64,72,80] file has the MACs of [64,80,80].", ""]
    Path(args.doc).write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"median batch-1 p50 of all files: {statistics.median(r['b1'] for r in rows):.3f} ms")


if __name__ == "__main__":
    main()
