"""A comparison's report: per row, the accuracy of each seed (the exported ONNX student's own, on the
validation split), mean ± std, the gap to the first row paired by seed, MACs and measured latency; as
JSON, a Rich table and a plot.

    {"rows": [{"row", "mode", "kd_loss", "num_branches", "student", "macs", "latency_ms", "latency_ms_b64",
               "img_s_b64", "acc": {"SEED": value}, "mean", "std", ...}], "reference", "seeds", ...}
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table

from .._io import save_figure
from ..plan import short_config
from ..recipe import Recipe, load_recipe
from ..errors import UserError
from ..tables import count_text
from .rows import Row
from .stats import mean_std, paired_gap


def read_grid_file(path: Path) -> Optional[dict]:
    """A JSON file of the grid (a cell's metrics or manifest, students.json, latency.json): None when it is
    not there (not written yet); one line naming it when it is there but unreadable, or no JSON object."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise UserError(f"compare: cannot read {path} ({getattr(err, 'strerror', None) or err}): put it back, or "
                        "remove it (a cell's folder: it trains again)") from None
    if not isinstance(value, dict):
        raise UserError(f"compare: {path} is not a JSON object: put it back, or remove it")
    return value


def cell_figures(cell: Path) -> Optional[dict]:
    """A finished cell's figures: the exported file's accuracy (what ships), the PyTorch student's, size.
    None for a cell not finished (its metrics or manifest not written yet); a file there that does not
    hold what a finished cell writes is one line naming it, never a cell silently left out."""
    metrics, manifest = read_grid_file(cell / "metrics.json"), read_grid_file(cell / "export" / "manifest.json")
    if metrics is None or manifest is None:
        return None
    try:
        onnx_acc = next(f["accuracy"] for f in manifest["files"] if f["file"] == "student.onnx")
    except (KeyError, TypeError, StopIteration):
        raise UserError(f"compare: {cell / 'export' / 'manifest.json'} lists no student.onnx with its accuracy: "
                        f"remove {cell / 'export'} to export the cell again") from None
    try:
        return {"onnx_acc": onnx_acc, "torch_acc": metrics["student"]["ensemble_acc"],
                "macs": metrics["student"]["macs"], "params": metrics["student"]["params"],
                "teacher_ensemble_acc": metrics["teacher_ensemble_acc"], "seconds": metrics["seconds"],
                "train_images": metrics["train_images"], "val_images": metrics["val_images"]}
    except (KeyError, TypeError) as err:
        raise UserError(f"compare: {cell / 'metrics.json'} lacks {err} of a finished run: remove {cell} to train "
                        "the cell again") from None


def _row_entry(row: Row, seeds: Sequence[int], out: Path, students: dict, latency: dict) -> dict:
    cells = {s: cell_figures(out / row.slug / f"s{s}") for s in seeds}
    done = {s: c for s, c in cells.items() if c is not None}
    recipe_path = out / row.slug / f"s{seeds[0]}" / "recipe.yaml"
    r = load_recipe(recipe_path) if recipe_path.is_file() else None
    kd = r.distill.term_settings()["kd"] if r is not None else None
    student = r.student.model_kwargs() if r is not None else students.get(row.student if row.one_branch else "recipe")
    acc = {str(s): c["onnx_acc"] for s, c in done.items()}
    mean, std = mean_std(list(acc.values()))
    first = next(iter(done.values()), None)
    return {
        "row": row.name, "mode": r.mode if r is not None else None,
        "kd_loss": (kd.label if r is not None and r.mode != "ce" else None),
        "num_branches": student["num_branches"] if student else None,
        "student": short_config(student) if student else None, "config": student,
        "macs": first["macs"] if first else None, "params": first["params"] if first else None,
        **{key: latency.get(src, {}).get(row.slug)
           for key, src in (("latency_ms", "p50_ms"), ("latency_ms_b64", "p50_ms_b64"), ("img_s_b64", "img_s_b64"),
                            ("latency_rounds_ms", "rounds_ms"), ("fold", "fold"))},
        "acc": acc, "mean": mean, "std": std,
        "torch_acc": {str(s): c["torch_acc"] for s, c in done.items()},
        "seconds": {str(s): c["seconds"] for s, c in done.items()},
        "teacher_ensemble_acc": first["teacher_ensemble_acc"] if first else None,
        "train_images": first["train_images"] if first else None,
        "missing_seeds": [s for s in seeds if s not in done],
    }


def build_report(recipe: Recipe, rows: list[Row], seeds: Sequence[int], out: Path, students: dict,
                 latency: dict) -> dict:
    """``latency``: latency.json's content (each row's p50 at batch 1 and 64, its images/s at 64, and the
    machine it was timed on)."""
    entries = [_row_entry(r, seeds, out, students, latency) for r in rows]
    for e in entries:
        e["gap"] = paired_gap(e["acc"], entries[0]["acc"]) if e is not entries[0] else None
    return {"recipe": recipe.name, "out": str(out), "seeds": list(seeds), "reference": entries[0]["row"],
            "rows": entries, "recipe_p50_ms": students.get("recipe_p50_ms"),
            "machine": (latency.get("machine") or {}).get("cpu"), "latency_threads": latency.get("threads"),
            "units": {"acc": "fraction of the validation split, the exported fp32 ONNX student's own",
                      "latency_ms": "p50 at batch 1, ONNX Runtime CPU, bench's worker, all usable cores",
                      "latency_ms_b64": "p50 of a batch of 64, the same way", "img_s_b64": "images/s at batch 64",
                      "latency_rounds_ms": "each interleaved round's p50 at batch 1 (a fresh process each)",
                      "fold": "the fold layout of the timed file (export's choice: the faster)",
                      "gap": "row - reference, paired by seed: mean, std, and in how many seeds the row is ahead"}}


def _pct(x: Optional[float], signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def compare_table(report: dict) -> Table:
    t = Table(title=f"ekdc compare: {report['recipe']} ({len(report['seeds'])} seeds; accuracy of the exported student)")
    for col, just in (("row", "left"), ("mode", "left"), ("KD loss", "left"), ("student", "left"), ("MACs", "right"),
                      ("p50 ms b1", "right"), ("img/s b64", "right"), ("acc % mean ± std (n)", "right"),
                      (f"vs {report['reference']}", "right"),
                      ("ahead", "right")):
        t.add_column(col, justify=just)
    for e in report["rows"]:
        n = len(e["acc"])
        acc = f"{_pct(e['mean'])} ± {_pct(e['std'])} ({n})" if n else "-"
        g = e["gap"]
        gap = f"{_pct(g['mean'], True)} ± {_pct(g['std'])}" if g and g["seeds"] else ""
        ahead = f"{g['ahead']}/{g['seeds']}" if g and g["seeds"] else ""
        lat = "-" if e["latency_ms"] is None else f"{e['latency_ms']:.3f}"
        rate = "-" if e.get("img_s_b64") is None else f"{e['img_s_b64']:,.0f}"
        t.add_row(e["row"], e["mode"] or "-", e["kd_loss"] or "-", e["student"] or "-", count_text(e["macs"]), lat,
                  rate, acc, gap, ahead)
    t.caption = ("gap: row - reference in points, paired by seed, mean ± std; a gap smaller than the seeds' spread "
                 "is not evidence either way")
    return t


def write_compare_plot(report: dict, path: str | Path) -> Path:
    """Each row's accuracy per seed (dots) and mean ± std (bar), the reference's mean as a line."""
    fig = Figure(figsize=(max(5.0, 1.1 * len(report["rows"]) + 2), 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, e in enumerate(report["rows"]):
        vals = [100 * v for v in e["acc"].values()]
        if vals:
            ax.scatter([i] * len(vals), vals, s=14, color="gray", zorder=3)
            ax.errorbar([i], [100 * e["mean"]], yerr=[100 * (e["std"] or 0)], fmt="o", color="C0", capsize=4, zorder=4)
    ref = report["rows"][0]["mean"]
    if ref is not None:
        ax.axhline(100 * ref, color="C0", lw=0.8, ls="--", label=f"{report['reference']} (mean)")
        ax.legend(fontsize=7)
    ax.set_xticks(range(len(report["rows"])))
    ax.set_xticklabels([e["row"] for e in report["rows"]], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("validation accuracy of the exported student (%)")
    ax.set_title(f"ekdc compare: {report['recipe']}", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)
