#!/usr/bin/env python3
"""EKD against the same student alone and against classic ensemble KD, on limited CIFAR-10.

    python experiments/limited_data_study.py                 # run (or continue) the whole grid, then report
    python experiments/limited_data_study.py --report-only   # rebuild docs/RESULTS.md from finished runs
    python experiments/limited_data_study.py --sizes 5000 --modes avg_kd,avg_kd_k4,avg_kd_k10,avg_kd_k30,ekd,ekd_k4,ekd_k10,ekd_k30 \
        --page TEACHER-CACHE.md                                # the teacher-output cache against live teachers

The grid: training subsets of 5,000 and 10,000 images (seeded, stratified, disjoint from a fixed
5,000-image validation split) x modes ``ce`` (student alone), ``avg_kd`` (every branch from the
averaged teachers), ``ekd`` (branch i from teacher i), ``ekd_feat`` (ekd plus feature matching) x
seeds 0, 1, 2. The ``<mode>_k<K>`` modes read the teachers' outputs from a cache of K fixed views an
image (``distill.teacher_cache``), built once a subset size and K and shared by every seed and mode
(the views' own seed stays 0). Every cell uses the same recipe (recipes/cifar10-limited.yaml): same student, epochs,
schedule, temperature; no mode gets more tuning than another. The teachers of each subset size are
trained once a size and loaded by every cell of that size.

Each size is one ``ekdc compare`` grid (the one way to run a grid): this script maps its modes to rows
(``ekd_feat`` is ``ekd+feat``, ``avg_kd_k10`` is ``avg_kd+k10``) and writes the page. Resumable: a
finished cell is never redone, an interrupted one is continued; the grid can span several sessions.
Each finished student is exported (folded, fp32 ONNX) to show export loses nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ekdc import load_recipe  # noqa: E402
from ekdc.comparison import compare, parse_row, parse_seeds  # noqa: E402
from ekdc.comparison.stats import mean_std  # noqa: E402

# each mode of the page and the ``ekdc compare`` row that trains it
MODES = {
    "ce": "ce", "avg_kd": "avg_kd", "ekd": "ekd", "ekd_feat": "ekd+feat",
    **{f"{m}_k{k}": f"{m}+k{k}" for m in ("avg_kd", "ekd") for k in (4, 10, 30)},
}


def _cell_dir(root: Path, size: int, mode: str, seed: int) -> Path:
    return root / f"n{size}" / parse_row(MODES[mode]).slug / f"s{seed}"


def run_grid(args) -> None:
    """Each size is one ``ekdc compare`` grid (teachers trained once a size, one teacher-output cache a
    size, seed-major, resumable); the page is rebuilt after every size."""
    teachers = dict(args.teachers)
    for size in args.sizes:
        sets = [f"data.per_class={size // 10}", *args.set]
        recipe = load_recipe(args.recipe, sets)
        given = teachers.get(size)
        if given:  # teachers trained elsewhere: every cell loads them as they are
            recipe = load_recipe(args.recipe, sets + [
                s for i, t in enumerate(recipe.teachers)
                for s in (f"teachers.{i}.weights={(Path(given) / f'{t.name}.pt').resolve()}", f"teachers.{i}.train=null")])
        compare(recipe, [MODES[m] for m in args.modes], args.seeds, Path(args.runs_root) / f"n{size}", progress=False)
        report(args)


def _shown(path: str) -> str:
    """A path as the page shows it: relative to the repository when inside it."""
    p = Path(path)
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p)


def _pct_stats(xs: list[float]) -> dict:
    """Fractions as percent: n, mean (None with no value) and sample std (None with fewer than two)."""
    mean, std = mean_std(xs)
    return {"n": len(xs), "mean": None if mean is None else 100 * mean, "std": None if std is None else 100 * std}


def _stats_text(st: dict, signed: bool = False) -> str:
    """``_pct_stats`` as the page shows it, mean ± std; ``signed`` writes gaps with an explicit + or − sign."""
    if st["mean"] is None:
        return "–"
    mean = f"{st['mean']:+.2f}".replace("-", "−") if signed else f"{st['mean']:.2f}"
    return mean if st["std"] is None else f"{mean} ± {st['std']:.2f}"


def _mean_std(xs: list[float], signed: bool = False) -> str:
    """Fractions shown in %, mean ± std; ``signed`` writes gaps with an explicit + or − sign."""
    return _stats_text(_pct_stats(xs), signed)


# (mode, baseline) pairs whose per-seed gaps the report shows: what KD adds to the student alone, and
# what EKD's one-teacher-a-branch pairing adds to classic averaged-teacher KD
_COMPARISONS = [("avg_kd", "ce"), ("ekd", "ce"), ("ekd_feat", "ce"), ("ekd", "avg_kd"), ("ekd_feat", "avg_kd"),
                *[(f"{m}_k{k}", m) for m in ("avg_kd", "ekd") for k in (4, 10, 30)]]


def paired_gaps(rows: list[dict], size: int, mode: str, baseline: str) -> list[float]:
    """Per-seed ensemble-accuracy gaps, mode minus baseline, over the seeds both have finished.

    Cells of one seed share the training subset, the student's initialisation and the batch order, so a
    gap taken seed by seed leaves out the run-to-run noise the two rows have in common."""
    by_seed = {(r["mode"], c["seed"]): c["ensemble"] for r in rows if r["size"] == size for c in r["cells"]}
    return [by_seed[(mode, s)] - by_seed[(baseline, s)] for (m, s) in sorted(by_seed) if m == mode and (baseline, s) in by_seed]


def _stage_seconds(log: Path, prefix: str) -> dict[str, float]:
    """Training seconds per stage whose name starts with ``prefix`` (keyed by the rest of the name),
    summed over a run's log.jsonl epochs."""
    out: dict[str, float] = {}
    for line in log.read_text().splitlines() if log.exists() else []:
        r = json.loads(line)
        stage = str(r.get("stage", ""))
        if stage.startswith(prefix):
            name = stage[len(prefix):]
            out[name] = out.get(name, 0.0) + r.get("seconds", 0.0)
    return out


def _teacher_seconds(size_root: Path) -> dict[str, float]:
    """Training seconds per teacher, from the log of the size's teachers run (``compare``'s teachers/)."""
    return _stage_seconds(size_root / "teachers" / "log.jsonl", "teacher-")


def collect(root: Path, sizes, modes, seeds) -> dict:
    rows, teachers = [], {}
    for size in sizes:
        for mode in modes:
            cells = []
            for seed in seeds:
                cell = _cell_dir(root, size, mode, seed)
                if not (cell / "metrics.json").exists():
                    continue
                m = json.loads((cell / "metrics.json").read_text())
                exported = None
                mf = cell / "export" / "manifest.json"
                if mf.exists():
                    exported = next(f["accuracy"] for f in json.loads(mf.read_text())["files"] if f["file"] == "student.onnx")
                # the student stage's own training time (a cell that trained the teachers counts them too in metrics)
                student_s = sum(_stage_seconds(cell / "log.jsonl", "student-").values())
                cells.append({"seed": seed, "ensemble": m["student"]["ensemble_acc"],
                              "best_branch": max(m["student"]["branch_acc"]), "exported": exported,
                              "seconds": student_s, "macs": m["student"]["macs"], "params": m["student"]["params"],
                              "device": m.get("device"), "teacher_cache": m.get("teacher_cache")})
                if size not in teachers:
                    teachers[size] = {"teachers": m["teachers"], "ensemble": m["teacher_ensemble_acc"],
                                      "seconds": _teacher_seconds(root / f"n{size}")}
            rows.append({"size": size, "mode": mode, "cells": cells})
    return {"rows": rows, "teachers": teachers}


def _plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["size"] for r in data["rows"]})
    modes = list(dict.fromkeys(r["mode"] for r in data["rows"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(modes))
    for j, mode in enumerate(modes):
        xs, ys, es = [], [], []
        for i, size in enumerate(sizes):
            accs = [c["ensemble"] for r in data["rows"] if r["size"] == size and r["mode"] == mode for c in r["cells"]]
            if accs:
                xs.append(i + (j - (len(modes) - 1) / 2) * width)
                ys.append(100 * mean_std(accs)[0])
                es.append(100 * (mean_std(accs)[1] or 0))
        if xs:  # a mode with no finished run yet gets no legend entry
            ax.bar(xs, ys, width, yerr=es, capsize=3, label=mode, color=f"C{j}")
    ax.set_xticks(range(len(sizes)), [f"{s:,} images" for s in sizes])
    ax.set_ylabel("student validation accuracy (%)")
    lo = min((100 * c["ensemble"] for r in data["rows"] for c in r["cells"]), default=0)
    ax.set_ylim(max(0, lo - 5), None)
    ax.legend(title="mode")
    ax.set_title("EKD student on limited CIFAR-10 (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summarise(data: dict, sizes) -> dict:
    """The numbers the page shows, from ``collect``'s data, as plain data: accuracies and gaps in %
    (points), times in seconds (``training`` also in hours), MACs and parameters as counts.

    ``teachers``: per subset size, each teacher and the ensemble's totals. ``student``: the student's
    size and its MACs as a share (%) of each distinct teacher-ensemble MAC count (None before any run
    finished). ``rows``: per (size, mode), n and the ``_pct_stats`` of the ensemble, best-branch and
    exported accuracies, and the mean student training seconds. ``gaps``: the paired gaps of
    ``_COMPARISONS`` over ``sizes`` that have a finished pair, and in how many seeds the mode is ahead.
    ``training``: seconds and hours of the finished runs' training."""
    teachers = []
    for size, t in sorted(data["teachers"].items()):
        secs = t.get("seconds", {})
        teachers.append({
            "size": size,
            "teachers": [{"name": tr["name"], "arch": tr["arch"], "acc": 100 * tr["acc"], "params": tr["params"],
                          "macs": tr["macs"], "seconds": secs.get(tr["name"])} for tr in t["teachers"]],
            "count": len(t["teachers"]), "acc": 100 * t["ensemble"],
            "params": sum(tr["params"] for tr in t["teachers"]), "macs": sum(tr["macs"] for tr in t["teachers"]),
            "seconds": sum(secs.values()) if secs else None,
        })
    first = next((c for r in data["rows"] for c in r["cells"]), None)
    student = None
    if first:
        student = {"params": first["params"], "macs": first["macs"],
                   "ensemble_mac_share": [100 * first["macs"] / m for m in sorted({t["macs"] for t in teachers})]}
    rows = []
    for r in data["rows"]:
        c = r["cells"]
        rows.append({"size": r["size"], "mode": r["mode"], "n": len(c),
                     "ensemble": _pct_stats([x["ensemble"] for x in c]),
                     "best_branch": _pct_stats([x["best_branch"] for x in c]),
                     "exported": _pct_stats([x["exported"] for x in c if x["exported"] is not None]),
                     "seconds": statistics.mean(x["seconds"] for x in c) if c else None})
    gaps = []
    for size in sizes:
        for mode, baseline in _COMPARISONS:
            g = paired_gaps(data["rows"], size, mode, baseline)
            if g:
                gaps.append({"size": size, "mode": mode, "baseline": baseline, "gap": _pct_stats(g),
                             "ahead": sum(x > 0 for x in g)})
    student_s = sum(c["seconds"] for r in data["rows"] for c in r["cells"])
    teacher_s = sum(sum(t.get("seconds", {}).values()) for t in data["teachers"].values())
    training = {"teacher_seconds": teacher_s, "student_seconds": student_s, "hours": (student_s + teacher_s) / 3600,
                "teacher_hours": teacher_s / 3600, "student_hours": student_s / 3600}
    caches = {}
    for r in data["rows"]:
        for c in r["cells"]:
            tc = c.get("teacher_cache")
            if tc and tc.get("build_seconds") is not None:
                caches.setdefault((r["size"], tc["views"]), {"size": r["size"], "views": tc["views"],
                                                             "build_seconds": tc["build_seconds"], "bytes": tc["bytes"]})
    return {"teachers": teachers, "student": student, "rows": rows, "gaps": gaps, "training": training,
            "caches": [caches[k] for k in sorted(caches)]}


def _seconds_text(s) -> str:
    return "–" if s is None else f"{s:.0f}"


def render(summary: dict, recipe: str, cpu: str, cores, title: str = "Results: EKD on limited CIFAR-10",
           command: str = "--teachers 5000=runs/cifar10-limited/teachers", gpu: str | None = None,
           figure: str = "results.png") -> str:
    """``summarise``'s numbers as the page's Markdown (everything above the reading marker)."""
    where = (f"Machine: {gpu} (one GPU, bf16 autocast, channels_last), {cores} CPU cores." if gpu else
             f"Machine: {cpu}, {cores} cores, CPU training (bf16 autocast, channels_last).")
    lines = [
        f"# {title}",
        "",
        f"Written by `python experiments/limited_data_study.py {command}`",
        *(["(resumable; `--report-only` rebuilds this page; the 5,000-image teachers come from",
            "`ekdc distill recipes/cifar10-limited.yaml`, the same recipe, seed and split)."] if gpu is None and "--teachers" in command
          else ["(resumable; `--report-only` rebuilds this page; each size's first cell trains the teachers every other cell loads)."]),
        f"Recipe: `{_shown(recipe)}`, with `data.per_class` = size/10, `seed` and `mode` set per cell.",
        where,
        "",
        "Validation: a fixed, seeded, stratified split of 5,000 images (500 a class) that no run trains on.",
        "Accuracies in %, mean ± std over the seeds that have finished (n).",
        "",
        "## Teachers",
        "",
        "| train images | teacher | arch | acc | params | MACs | training s |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for t in summary["teachers"]:
        size = t["size"]
        for tr in t["teachers"]:
            lines.append(f"| {size:,} | {tr['name']} | {tr['arch']} | {tr['acc']:.2f} | {tr['params'] / 1e6:.2f}M "
                         f"| {tr['macs'] / 1e6:.0f}M | {_seconds_text(tr['seconds'])} |")
        lines.append(f"| {size:,} | **ensemble** | {t['count']} teachers | **{t['acc']:.2f}** "
                     f"| {t['params'] / 1e6:.2f}M | {t['macs'] / 1e6:.0f}M | {_seconds_text(t['seconds'])} |")
    lines += ["", "## Student (same architecture, epochs and schedule in every mode)", ""]
    student = summary["student"]
    if student:
        share = ", ".join(f"{x:.1f}%" for x in student["ensemble_mac_share"])
        lines += [f"`ekd_student`: {student['params'] / 1e6:.2f}M params, {student['macs'] / 1e6:.1f}M MACs "
                  f"a 32x32 image ({share} of the teacher ensemble's).", ""]
    lines += [
        "| train images | mode | n | ensemble acc | best branch acc | exported ONNX acc | student training s/run |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        lines.append(f"| {r['size']:,} | {r['mode']} | {r['n']} | {_stats_text(r['ensemble'])} | "
                     f"{_stats_text(r['best_branch'])} | {_stats_text(r['exported'])} | {_seconds_text(r['seconds'])} |")
    gap_lines = [f"| {g['size']:,} | {g['mode']} − {g['baseline']} | {g['gap']['n']} | "
                 f"{_stats_text(g['gap'], signed=True)} | {g['ahead']} of {g['gap']['n']} |" for g in summary["gaps"]]
    if gap_lines:
        lines += ["", "Paired by seed (a seed fixes the student's initialisation and batch order; every cell trains on",
                  "the same subset), gap in points, mean ± std over the seeds both rows have finished:", "",
                  "| train images | mode − baseline | seeds | gap, points | mode ahead in |", "|---:|---|---:|---:|---:|", *gap_lines]
    if summary.get("caches"):
        lines += ["", "Teacher-output caches (built once a size and K, shared by every seed and mode):", "",
                  "| train images | views K | build s | size on disk |", "|---:|---:|---:|---:|",
                  *[f"| {c['size']:,} | {c['views']} | {c['build_seconds']:.1f} | {c['bytes'] / 2**20:.1f} MiB |"
                    for c in summary["caches"]]]
    tr = summary["training"]
    lines += ["", f"Training time of the finished runs: {tr['hours']:.1f} h on this machine "
              f"({tr['teacher_hours']:.1f} h teachers, {tr['student_hours']:.1f} h students; export and evaluation not counted).",
              "", f"![accuracy by mode and training-set size]({figure})", ""]
    return "\n".join(lines) + "\n"


def report(args) -> None:
    root = Path(args.runs_root)
    data = collect(root, args.sizes, args.modes, args.seeds)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    stem = Path(args.page).stem.lower()
    (docs / f"{stem}.json").write_text(json.dumps(data, indent=2) + "\n")
    _plot(data, docs / f"{stem}.png")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    devices = {c.get("device") for r in data["rows"] for c in r["cells"]}
    gpu = None
    if any(str(d).startswith("cuda") for d in devices):
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "a CUDA GPU"
    title = "Results: EKD on limited CIFAR-10" if args.page == "RESULTS.md" else \
        "Teacher-output cache against live teachers, on limited CIFAR-10"
    command = ("--teachers 5000=runs/cifar10-limited/teachers" if args.page == "RESULTS.md"
               else " ".join(args.argv))
    page = render(summarise(data, args.sizes), args.recipe, cpu, os.cpu_count(), title, command, gpu, f"{stem}.png")
    out = docs / args.page
    marker = "<!-- reading -->"
    reading = ""
    if out.exists() and marker in out.read_text():
        reading = out.read_text().split(marker, 1)[1]
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(page + marker + (reading or "\n## Reading\n\n(to be written once the grid is complete)\n"))
    tmp.replace(out)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/cifar10-limited.yaml")
    ap.add_argument("--runs-root", default="runs/study")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[5000, 10000])
    ap.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    ap.add_argument("--seeds", type=parse_seeds, default=[0, 1, 2])
    ap.add_argument("--set", action="append", default=[], help="extra recipe override for every cell")
    ap.add_argument("--teachers", action="append", default=[], metavar="SIZE=DIR",
                    type=lambda s: (int(s.split("=", 1)[0]), s.split("=", 1)[1]),
                    help="load the teachers of a subset size from DIR (e.g. 5000=runs/cifar10-limited/teachers, "
                         "trained by the same recipe) instead of training them in the first cell")
    ap.add_argument("--docs", default=str(ROOT / "docs"), help="where RESULTS.md, results.json and results.png go")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--page", default="RESULTS.md", help="the page written in --docs (its results.json and .png "
                                                         "take the page's name: TEACHER-CACHE.md -> teacher-cache.json)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    # the cells run with the repository as working directory: make every path the caller typed absolute
    args.recipe, args.runs_root, args.docs = (str(Path(p).resolve()) for p in (args.recipe, args.runs_root, args.docs))
    args.teachers = [(size, str(Path(d).resolve())) for size, d in args.teachers]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        sys.exit(f"limited_data_study: unknown mode(s) {bad}; choose from {list(MODES)}")
    report(args) if args.report_only else run_grid(args)


if __name__ == "__main__":
    main()
