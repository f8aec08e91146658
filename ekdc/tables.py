"""The Rich tables the CLI prints after distill and export, and the number formatters every table
(bench's too) uses."""
from __future__ import annotations

import collections
from typing import Optional

from rich.table import Table

PROBLEMS_SHOWN = 20  # data check: lines of one kind of problem (and of unreadable files) before "N more"


def count_text(n: Optional[float]) -> str:
    """A count, short: 812, 8.12K, 41.30M, 1.20G; ``-`` for an unknown one."""
    if n is None:
        return "-"
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _metrics_columns(title: str) -> Table:
    t = Table(title=title)
    for col, just in (("model", "left"), ("arch", "left"), ("val acc", "right"), ("params", "right"), ("MACs", "right")):
        t.add_column(col, justify=just)
    return t


def _teacher_rows(t: Table, m: dict) -> tuple[int, int]:
    """The teachers' rows and their ensemble's; returns the ensemble's (params, MACs)."""
    for tr in m["teachers"]:
        size = f" @{tr['input_size']}px" if tr.get("input_size") else ""
        t.add_row(f"teacher {tr['name']}", tr["arch"] + size, f"{tr['acc']:.4f}", count_text(tr["params"]), count_text(tr["macs"]))
    tp = sum(tr["params"] for tr in m["teachers"])
    tm = sum(tr["macs"] for tr in m["teachers"])
    n = len(m["teachers"])
    t.add_row("teacher ensemble", f"{n} teacher{'s' if n != 1 else ''}", f"{m['teacher_ensemble_acc']:.4f}",
              count_text(tp), count_text(tm))
    return tp, tm


def metrics_table(m: dict, title: str = "validation metrics") -> Table:
    t = _metrics_columns(title)
    s = m["student"]
    branches = " / ".join(f"{a:.4f}" for a in s["branch_acc"])
    t.add_row(f"student ({m['mode']})", f"{s.get('arch', 'ekd_student')} x{len(s['branch_acc'])}", f"{s['ensemble_acc']:.4f}",
              count_text(s["params"]), count_text(s["macs"]))
    t.add_row("  branches", "", branches, "", "")
    tp, tm = _teacher_rows(t, m)
    t.caption = (f"student/ensemble: {s['params'] / tp:.1%} of params, {s['macs'] / tm:.1%} of MACs; "
                 f"training {m['seconds']:.0f}s")
    return t


def teachers_table(m: dict, title: str = "teachers: validation metrics") -> Table:
    """``ekdc distill --teachers-only``'s table (teachers/metrics.json)."""
    t = _metrics_columns(title)
    _teacher_rows(t, m)
    t.caption = f"trained on {m['train_images']:,} images, scored on {m['val_images']:,}; training {m['seconds']:.0f}s"
    return t


def export_table(manifest: dict) -> Table:
    t = Table(title=f"ekdc export -> {manifest['out']}  (fold: {manifest['fold']['choice']})")
    for col, just in (("file", "left"), ("kind", "left"), ("precision", "left"), ("size", "right"),
                      ("parity", "left"), ("val acc", "right")):
        t.add_column(col, justify=just)
    for f in manifest["files"]:
        acc = f.get("accuracy")
        t.add_row(f["file"], f["kind"], f["precision"], f"{f['size_mb']:.2f} MB", f.get("parity_summary", ""),
                  "" if acc is None else f"{acc:.4f}")
    return t


def data_check_table(r: dict) -> Table:
    """``ekdc data check``'s table of classes (``ekdc.data.check.CheckReport.to_dict()``); what it found is
    in ``data_check_lines``."""
    t = Table(title=f"ekdc data check: {r['root']} ({r['images']:,} images, {len(r['classes'])} classes"
                    f"{', decoded' if r['decoded'] else ', headers'}; {r['seconds']:.1f} s)")
    for col, just in (("class", "left"), ("images", "right"), ("train", "right"), ("val", "right")):
        t.add_column(col, justify=just)
    for c in r["classes"]:
        t.add_row(c["name"], f"{c['images']:,}", "-" if c["train"] is None else f"{c['train']:,}",
                  "-" if c["val"] is None else f"{c['val']:,}")
    return t


def data_check_lines(r: dict) -> list[str]:
    """What ``ekdc data check`` found, one line each, the verdict last."""
    size = lambda s: "-" if s is None else f"{s[0]}x{s[1]}"  # noqa: E731
    modes = ", ".join(f"{m} {n:,}" for m, n in sorted(r["modes"].items()))
    lines = [f"split: {r['split'] or 'not computed (unreadable files: set data.skip_bad_files)'}",
             f"modes: {modes or '-'}; sizes: smallest {size(r['smallest'])}, largest {size(r['largest'])}; "
             + (f"imbalance (largest / smallest class): {r['imbalance']:.2f}" if r["imbalance"] else "imbalance: -")]
    if r.get("encodings"):
        lines.insert(2, "encodings: " + ", ".join(f"{e} {n:,}" for e, n in sorted(r["encodings"].items(), key=lambda kv: -kv[1])))
    shown = collections.Counter()
    for p in r["problems"]:  # a folder of 10,000 .txt files beside its images is one kind, not 10,000 lines
        shown[p["kind"]] += 1
        if shown[p["kind"]] <= PROBLEMS_SHOWN:
            lines.append(f"{'WRONG' if p['wrong'] else 'note'}: {p['kind']}: {p['path']}: {p['detail']}")
    for kind, n in shown.items():
        if n > PROBLEMS_SHOWN:
            lines.append(f"{kind}: {n - PROBLEMS_SHOWN} more (--json lists them all)")  # WRONG ones stay on the verdict
    for d in r["identical"]:
        where = f"in classes {', '.join(d['classes'])}" if d["wrong"] else f"in class {d['classes'][0]}"
        lines.append(f"{'WRONG' if d['wrong'] else 'note'}: identical files {where}: {', '.join(d['paths'][:3])}"
                     + (f" (+{len(d['paths']) - 3})" if len(d["paths"]) > 3 else ""))
    for u in r["unreadable"][:PROBLEMS_SHOWN]:
        lines.append(f"unreadable: {u['error']}")
    if len(r["unreadable"]) > PROBLEMS_SHOWN:
        lines.append(f"unreadable: {len(r['unreadable']) - PROBLEMS_SHOWN} more (--json lists them all)")
    lines.append("verdict: " + ("training on it would be wrong (WRONG lines above)" if r["wrong"] else "no problem found"))
    return lines
