"""How a bench report is shown: a Rich table, a Markdown table, a PNG of latency against batch size."""
from __future__ import annotations

import os
from typing import Any, Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich import box
from rich.console import Group
from rich.table import Table

from .._io import save_figure
from ..tables import count_text


def _num(x: Optional[float], fmt: str = "{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def _rate(x: Optional[float]) -> str:
    """Images per second, short: 812, 8.1k, 1.2M."""
    if x is None:
        return "-"
    if x >= 1e6:
        return f"{x / 1e6:.2f}M"
    if x >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def _times(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _acc(m: dict) -> str:
    return "-" if m.get("accuracy") is None else f"{m['accuracy']:.4f}"


def _max_spread(m: dict) -> Optional[float]:
    vals = [v for v in m.get("spread_pct", {}).values() if v is not None]
    return max(vals) if vals else None


def machine_line(report: dict) -> str:
    mc = report.get("machine", {})
    gpu = f", GPU {mc['gpu']}" if mc.get("gpu") else ""
    flags = f" ({' '.join(mc['cpu_flags'])})" if mc.get("cpu_flags") else ""  # not [..]: Rich markup
    return (f"{mc.get('cpu', '?')}{flags}, {mc.get('cores', '?')} cores ({mc.get('usable_cores', '?')} usable){gpu}; "
            f"onnxruntime {mc.get('onnxruntime', '?')}, provider {mc.get('provider', '?')}, "
            f"{mc.get('threads', '?')} intra-op threads")


# --------------------------------------------------------------------------------------------------
# Rich


def _label(m: dict) -> str:
    return f"{m['name']} (reference)" if m["is_reference"] else m["name"]


def model_table(report: dict) -> Table:
    """One line per model: what it is, what it scores, what it weighs."""
    ref = report.get("reference")
    t = Table(title="ekdc bench: models", box=box.SIMPLE_HEAD, padding=(0, 1))
    for col in ("model", "precision", "accuracy", "params", "MACs", "file MB", "weights MiB", "model MiB",
                "memory vs ref", "peak MiB"):
        t.add_column(col, justify="left" if col in ("model", "precision") else "right", no_wrap=col == "model")
    for m in report["models"]:
        vs = m["vs_reference"]
        t.add_row(_label(m), m.get("precision") or "-", _acc(m), count_text(m["params"]), count_text(m["macs"]),
                  _num(m["file_mb"]), _num(m.get("weights_mb")), f"{m['model_mem_mb']:.1f}",
                  _times(vs["memory_ratio"]), f"{m['peak_mem_mb']:.0f}")
    t.caption = (f"accuracy on the validation split ({'no data given' if all(m.get('accuracy') is None for m in report['models']) else 'the same images for every model'}); "
                 "MACs per image; weights MiB: stored tensors; model MiB: its own memory, measured (peak less a "
                 f"trivial session's); memory vs ref: {ref or 'no reference'} / model")
    return t


def speed_table(report: dict) -> Table:
    """One line per model and batch size: latency, throughput, speedup (timm's benchmark shape)."""
    ref = report.get("reference")
    s = report["settings"]
    rounds = f"{s['repeats']} round" + ("s" if s["repeats"] != 1 else "")
    t = Table(title=f"ekdc bench: speed ({s['provider']}, {s['threads']} threads, {rounds})", box=box.SIMPLE_HEAD,
              padding=(0, 1))
    for col in ("model", "precision", "batch", "p50 ms", "p90 ms", "img/s", "speedup", "GFLOP/s", "act MiB", "spread %"):
        t.add_column(col, justify="left" if col in ("model", "precision") else "right", no_wrap=col == "model")
    big = str(max(int(b) for b in report["batches"]))
    for m in report["models"]:
        vs = m["vs_reference"]
        for i, b in enumerate(str(b) for b in report["batches"]):
            lat, spread = m["latency_ms"][b], (m.get("spread_pct") or {}).get(b)
            t.add_row(_label(m) if i == 0 else "", (m.get("precision") or "-") if i == 0 else "", b, _num(lat["p50"]),
                      _num(lat.get("p90")), _rate(m["throughput"][b]), _times(vs["speedup"][b]),
                      _num(m.get("gflops")) if b == big else "", _num((m.get("activations_mb") or {}).get(b)),
                      "-" if spread is None else f"{spread:.1f}",
                      end_section=(b == str(report["batches"][-1])))
    t.caption = (f"{machine_line(report)}\nimg/s = batch / mean latency; speedup: {ref or 'no reference'}'s latency / "
                 "the model's (> 1: faster); GFLOP/s at the largest batch; act MiB: the graph's peak of live "
                 "activations; spread: (max - min) / median of the per-round p50")
    return t


def bench_table(report: dict) -> Group:
    """The report as a person reads it: the models table, then the speed table under it."""
    return Group(model_table(report), speed_table(report))


# --------------------------------------------------------------------------------------------------
# Markdown


def markdown_table(report: dict) -> str:
    """The report as a GitHub Markdown table (one row per model, the reference included)."""
    batches = [str(b) for b in report["batches"]]
    head = ["model", "precision", "params", "MACs per image", "file MB", "weights MiB", "model MiB", "peak MiB", "accuracy"]
    for b in batches:
        head += [f"p50 ms @{b}", f"img/s @{b}", f"speedup @{b}"]
    head += ["GFLOP/s", "memory ratio", "spread %"]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(head))) + "|"]
    for m in report["models"]:
        vs = m["vs_reference"]
        name = f"{m['name']} (reference)" if m["is_reference"] else m["name"]
        cells = [f"`{name}`", m.get("precision") or "-", count_text(m["params"]), count_text(m["macs"]),
                 _num(m["file_mb"]), _num(m.get("weights_mb")), f"{m['model_mem_mb']:.1f}", f"{m['peak_mem_mb']:.0f}", _acc(m)]
        for b in batches:
            cells += [_num(m["latency_ms"][b]["p50"]), _rate(m["throughput"][b]), _times(vs["speedup"][b])]
        spread = _max_spread(m)
        cells += [_num(m.get("gflops")), _times(vs["memory_ratio"]), "-" if spread is None else f"{spread:.1f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------------------------------
# PNG


def write_plot(report: dict, path: str | os.PathLike) -> None:
    """Latency p50 against batch size, one line per model, log scale on both axes; written atomically."""
    # the object API with the Agg canvas: no pyplot global state, no display needed

    batches = [int(b) for b in report["batches"]]
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for m in report["models"]:
        ys = [m["latency_ms"][str(b)]["p50"] for b in batches]
        style: dict[str, Any] = {"linestyle": "--", "color": "black"} if m["is_reference"] else {}
        label = f"{m['name']} (reference)" if m["is_reference"] else m["name"]
        ax.plot(batches, ys, marker="o", label=label, **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.tick_params(axis="x", which="minor", labelbottom=False)  # only the measured batch sizes are labelled
    ax.set_xlabel("batch size")
    ax.set_ylabel("latency p50 (ms per batch)")
    s = report["settings"]
    ax.set_title(f"latency p50 against batch size ({s['provider']}, {s['threads']} threads)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
