"""A plan as a table and as a plot of latency against MACs."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from rich.table import Table

from .._io import save_figure
from ..tables import count_text
from .search import Plan


def plan_table(plan: Plan) -> Table:
    t = Table(title=f"ekdc plan: the most MACs within p50 {plan.budget_ms:g} ms at {plan.target}")
    for col, just in (("#", "right"), ("student", "left"), ("MACs", "right"), ("params", "right"),
                      ("p50 ms", "right"), ("spread", "right"), ("fold", "left"), ("Pareto", "center"),
                      ("chosen", "left")):
        t.add_column(col, justify=just)
    for c in sorted(plan.candidates, key=lambda c: (c.macs, c.p50_ms)):
        over = c.p50_ms > plan.budget_ms
        spread = "-" if c.spread_pct is None else f"{c.spread_pct:.0f}%"
        t.add_row(f"{c.index}{'+' if c.finer else ''}", c.short, count_text(c.macs), count_text(c.params),
                  f"[dim]{c.p50_ms:.3f}[/dim]" if over else f"{c.p50_ms:.3f}", spread, c.layout,
                  "*" if c.pareto else "", "<- chosen" if c.chosen else "")
    n = plan.settings["repeats"]
    t.caption = (f"p50: median over {n} interleaved round{'s' if n != 1 else ''}, fastest fold layout; spread: "
                 f"(max - min) / median of the rounds. * Pareto front (no candidate has more MACs at less latency). "
                 + ("+ timed in the finer pass, between the grid's chosen student and the next larger. "
                    if plan.settings.get("finer_pass") else "") +
                 f"{plan.holds_for}")
    return t


def write_plan_plot(plan: Plan, path: Union[str, Path]) -> Path:
    """p50 latency against MACs for every candidate, the Pareto front joined, the budget and the chosen
    candidate marked; written atomically."""
    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # ekd_student's grid mixes block kinds, one marker each; a family without blocks is one series
    kinds = {c.config.get("block", plan.arch) for c in plan.candidates}
    for kind, marker in zip(sorted(kinds), "osD^v"):
        for finer in (False, True):
            pts = [c for c in plan.candidates if c.config.get("block", plan.arch) == kind and c.finer == finer]
            if pts:
                ax.scatter([c.macs for c in pts], [c.p50_ms for c in pts], marker=marker, s=22, zorder=2,
                           facecolors="none" if finer else None, edgecolors="C0" if finer else None,
                           label=f"{kind} (finer pass)" if finer else kind)
    front = sorted((c for c in plan.candidates if c.pareto), key=lambda c: c.macs)
    ax.plot([c.macs for c in front], [c.p50_ms for c in front], color="gray", lw=1, zorder=1, label="Pareto front")
    for c in plan.candidates:
        ax.annotate(str(c.index), (c.macs, c.p50_ms), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.axhline(plan.budget_ms, color="red", ls="--", lw=1, label=f"budget {plan.budget_ms:g} ms")
    if plan.chosen is not None:
        ax.scatter([plan.chosen.macs], [plan.chosen.p50_ms], marker="*", s=180, color="red", zorder=3,
                   label=f"chosen: {plan.chosen.short}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("MACs per image")
    ax.set_ylabel(f"p50 latency (ms per batch of {plan.batch})")
    ax.set_title(f"ekdc plan: {plan.target}, {plan.image_size}px; this machine only", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
