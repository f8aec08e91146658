"""How a bench report is shown: a Rich table, a Markdown table, a PNG of latency against batch size."""
from __future__ import annotations

import os
from typing import Any, Optional

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich import box
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
    return (f"{mc.get('cpu', '?')}, {mc.get('cores', '?')} cores ({mc.get('usable_cores', '?')} usable){gpu}; "
            f"onnxruntime {mc.get('onnxruntime', '?')}, provider {mc.get('provider', '?')}, "
            f"{mc.get('threads', '?')} intra-op threads")


# --------------------------------------------------------------------------------------------------
# Rich


def bench_table(report: dict) -> Table:
    """One row per model (the reference too). Each cell stacks related figures so that three batch
    sizes still fit an 80-column terminal; per batch size: p50 ms, img/s, speedup over the reference."""

    batches = [str(b) for b in report["batches"]]
    ref = report.get("reference")
    s = report["settings"]
    rounds = f"{s['repeats']} round" + ("s" if s["repeats"] != 1 else "")
    t = Table(title=f"ekdc bench: {s['provider']}, {s['threads']} threads, {rounds}",
              box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True)
    longest = max(len(m["name"]) for m in report["models"])
    t.add_column("model\nprecision\naccuracy", no_wrap=True, min_width=min(longest, 40))
    t.add_column("params\nMACs/img\nGFLOP/s", justify="right")
    t.add_column("file MB\nweights MiB\nmodel MiB\nmem ratio\npeak MiB", justify="right")
    for b in batches:
        t.add_column(f"batch {b}\np50 ms\nimg/s\nspeedup\nact MiB", justify="right")
    t.add_column("spread", justify="right")
    for m in report["models"]:
        vs = m["vs_reference"]
        tag = (m.get("precision") or "-") + (", reference" if m["is_reference"] else "")
        acc = "no data" if m.get("accuracy") is None else f"acc {m['accuracy']:.4f}"
        cells = [f"{m['name']}\n{tag}\n{acc}",
                 f"{count_text(m['params'])}\n{count_text(m['macs'])}\n{_num(m.get('gflops'))}",
                 f"{_num(m['file_mb'])}\n{_num(m.get('weights_mb'))}\n{m['model_mem_mb']:.1f}\n{_times(vs['memory_ratio'])}"
                 f"\n{m['peak_mem_mb']:.0f}"]
        for b in batches:
            act = (m.get("activations_mb") or {}).get(b)
            cells.append(f"{_num(m['latency_ms'][b]['p50'])}\n{_rate(m['throughput'][b])}\n{_times(vs['speedup'][b])}"
                         f"\n{_num(act)}")
        spread = _max_spread(m)
        cells.append("-" if spread is None else f"{spread:.1f}%")
        t.add_row(*cells, end_section=True)
    ratio_note = f"ratios: {ref} / model (> 1: faster, smaller)" if ref else "no reference: no ratios"
    t.caption = (f"{machine_line(report)}\nMACs per image; GFLOP/s at the largest batch; img/s = batch / mean "
                 f"latency; weights MiB: its stored tensors, from the graph; model MiB: its own memory, measured (peak less the "
                 f"runtime's fixed cost of a session), mem ratio from it; act MiB: the graph's peak of live activations; "
                 f"peak MiB: the whole process; spread: (max-min)/median of per-round p50, worst batch; {ratio_note}")
    return t


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
