#!/usr/bin/env python3
"""Does the EKD student earn its place? Strong teachers handed over as files, students on 250 and 500
CIFAR-10 images a class, and one-branch students of equal cost, through ``ekdc compare``.

    python experiments/evidence_study.py                  # run (or continue) the grid, then write the page
    python experiments/evidence_study.py --report-only    # rebuild docs/EVIDENCE.md and docs/evidence/ only

The teachers come from ``ekdc distill recipes/cifar10-strong-teachers.yaml --teachers-only --out
runs/strong-teachers`` (45,000 training JPEGs outside the validation split) and are loaded by every
cell with ``weights:`` (recipes/cifar10-strong.yaml). Rows, 3 seeds each, at each size:

    ce, avg_kd, ekd, ekd+dkd, avg_kd+dkd, avg_kd+conf        the 3-branch student
    plain:avg_kd, plain:<best>                               one branch widened to its MACs (within 5%)
    planned:avg_kd                                           one branch planned for its measured latency

``<best>`` is the KD loss of the best 3-branch KD row at 500 images a class (its avg_kd form: one branch
cannot pair with three teachers). 500 images a class run first. Every figure on the page comes from the
finished cells' files; seed 0's exported students at 500 a class are copied to docs/evidence/.
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

from ekdc import load_recipe  # noqa: E402
from ekdc.compare import compare, compare_table, parse_row, write_compare_plot  # noqa: E402
from ekdc.compare.stats import mean_std, paired_diffs, pct, pct_mean_std  # noqa: E402

KD_ROWS = ["avg_kd", "ekd", "ekd+dkd", "avg_kd+dkd", "avg_kd+conf"]
FIRST_ROWS = ["ce", *KD_ROWS, "plain:avg_kd", "planned:avg_kd"]
SIZES = (500, 250)
# the student under test: the 3-branch EKD student (the recipe itself now ships the one-branch winner,
# so the grid sets the 3-branch one back for every cell; the plain rows widen its single branch)
STUDY_STUDENT = ["student.num_branches=3", "student.trunk_width=16", "student.branch_widths=[16,32,64]"]
# the paired gaps the page shows: (row, baseline, what the gap answers)
PAIRS = [
    ("avg_kd", "ce", "KD from the averaged teachers, against the student alone"),
    ("ekd", "avg_kd", "EKD's pairing (branch i from teacher i), against the averaged teachers"),
    ("ekd+dkd", "ekd", "DKD instead of KL, in ekd"),
    ("avg_kd+dkd", "avg_kd", "DKD instead of KL, in avg_kd"),
    ("avg_kd+conf", "avg_kd", "confidence-weighted teachers instead of their mean"),
    ("avg_kd", "plain:avg_kd", "3 branches against 1 branch of equal MACs, both avg_kd"),
    ("{best}", "plain:{best_plain}", "the best 3-branch row against 1 branch of equal MACs with its loss"),
    ("avg_kd", "planned:avg_kd", "3 branches against 1 branch of equal measured latency, both avg_kd"),
]


def _plain_of(row: str) -> str:
    """The one-branch form of a 3-branch row: its loss, with the teachers' mean (ekd has no one-branch form)."""
    return row.replace("ekd", "avg_kd", 1) if row.startswith("ekd") else row


def best_kd_row(report: dict) -> str:
    means = {e["row"]: e["mean"] for e in report["rows"] if e["row"] in KD_ROWS and e["mean"] is not None}
    return max(means, key=means.get) if means else "avg_kd"


def rows_for(best: str) -> list[str]:
    plain_best = f"plain:{_plain_of(best)}"
    return FIRST_ROWS + ([plain_best] if plain_best not in FIRST_ROWS else [])


def run(args) -> dict[int, dict]:
    reports, best = {}, None
    for size in args.sizes:
        recipe = load_recipe(args.recipe, [*STUDY_STUDENT, f"data.per_class={size}", *args.set])
        out = Path(args.runs_root) / f"n{size}"
        if args.report_only:
            first = json.loads((out / "compare.json").read_text()) if (out / "compare.json").is_file() else None
            best = best or (best_kd_row(first) if first else "avg_kd")
            reports[size] = compare(recipe, rows_for(best), args.seeds, out, report_only=True)
            continue
        if best is None:  # the first size decides the loss the plain student is also trained with
            first = compare(recipe, FIRST_ROWS, args.seeds, out, console=args.console, progress=False)
            best = best_kd_row(first)
            print(f"evidence: best 3-branch KD row at {size} a class: {best}", flush=True)
        reports[size] = compare(recipe, rows_for(best), args.seeds, out, console=args.console, progress=False)
        write_page(reports, args)
    return reports


# --------------------------------------------------------------------------------------------------
# the page


_pct, _mean_std = pct, pct_mean_std  # the page's figures: ekdc.compare.stats, as compare's own report


def _training_hours(log: Path, metrics: dict) -> float:
    """Training time robust to a pause: per teacher stage, the median epoch's seconds times its epochs."""
    if not log.is_file():
        return metrics["seconds"] / 3600
    epochs: dict[str, list[float]] = {}
    for line in log.read_text().splitlines():
        e = json.loads(line)
        if e.get("stage", "").startswith("teacher-") and "seconds" in e:
            epochs.setdefault(e["stage"], []).append(e["seconds"])
    return sum(statistics.median(v) * len(v) for v in epochs.values()) / 3600


def _teachers_section(teachers_dir: Path) -> tuple[list[str], dict]:
    m = json.loads((teachers_dir / "metrics.json").read_text())
    lines = ["| teacher | arch | val acc | params | MACs |", "|---|---|---:|---:|---:|"]
    for t in m["teachers"]:
        lines.append(f"| {t['name']} | {t['arch']} | {_pct(t['acc'])} | {t['params'] / 1e6:.2f}M | {t['macs'] / 1e6:.1f}M |")
    macs = sum(t["macs"] for t in m["teachers"])
    lines.append(f"| **ensemble** | {len(m['teachers'])} teachers | **{_pct(m['teacher_ensemble_acc'])}** | "
                 f"{sum(t['params'] for t in m['teachers']) / 1e6:.2f}M | {macs / 1e6:.1f}M |")
    lines.append("")
    lines.append(f"Trained on {m['train_images']:,} images (`ekdc distill recipes/cifar10-strong-teachers.yaml "
                 f"--teachers-only`), {_training_hours(teachers_dir.parent / 'log.jsonl', m):.2f} h of training on "
                 f"this machine (each teacher's median epoch time times its epochs, from the run's log.jsonl, so "
                 f"that an epoch the run was paused in does not count); scored on the "
                 f"{m['val_images']:,}-image validation split every student is scored on.")
    return lines, {"val_acc": m["teacher_ensemble_acc"], "macs": macs, "train_images": m["train_images"],
                   "teachers": [{k: t[k] for k in ("name", "arch", "acc", "params", "macs")} for t in m["teachers"]]}


def _rows_table(report: dict) -> list[str]:
    lines = ["| row | mode | KD loss | branches | student | MACs | p50 ms (batch 1) | n | acc % (exported ONNX) | "
             "PyTorch acc % |", "|---|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for e in report["rows"]:
        lat = "–" if e["latency_ms"] is None else f"{e['latency_ms']:.3f}"
        lines.append(f"| `{e['row']}` | {e['mode'] or '–'} | {e['kd_loss'] or '–'} | {e['num_branches'] or '–'} | "
                     f"{e['student'] or '–'} | {(e['macs'] or 0) / 1e6:.1f}M | {lat} | {len(e['acc'])} | "
                     f"{_mean_std(list(e['acc'].values()))} | {_mean_std(list(e['torch_acc'].values()))} |")
    return lines


def _pairs_table(report: dict, best: str) -> tuple[list[str], list[dict]]:
    by = {e["row"]: e for e in report["rows"]}
    lines = ["| row − baseline | what it answers | seeds | gap, points (mean ± std) | row ahead in | seed spread of "
             "the baseline |", "|---|---|---:|---:|---:|---:|"]
    out, seen = [], set()
    for row, base, what in PAIRS:
        row, base = row.format(best=best), base.format(best_plain=_plain_of(best))
        if row not in by or base not in by or (row, base) in seen:
            continue
        seen.add((row, base))
        seeds = [s for s in by[row]["acc"] if s in by[base]["acc"]]
        diffs = paired_diffs(by[row]["acc"], by[base]["acc"])
        spread = list(by[base]["acc"].values())
        sd = pct(mean_std(spread)[1])
        lines.append(f"| `{row}` − `{base}` | {what} | {len(seeds)} | {_mean_std(diffs, True)} | "
                     f"{sum(d > 0 for d in diffs)} of {len(seeds)} | {sd} |")
        out.append({"row": row, "baseline": base, "seeds": len(seeds), "diffs": diffs})
    return lines, out


def _training_text(report: dict) -> str:
    """Device and precision as a finished cell's metrics.json recorded them."""
    for e in report["rows"]:
        for seed in e["acc"]:
            cell = Path(report["out"]) / parse_row(e["row"]).slug / f"s{seed}" / "metrics.json"
            if cell.is_file():
                m = json.loads(cell.read_text())
                return f"{m.get('device', 'cpu')}, {m.get('precision', 'precision not recorded')}, channels_last"
    return "(no finished cell yet)"


def write_page(reports: dict[int, dict], args) -> None:
    docs = Path(args.docs)
    (docs / "evidence").mkdir(parents=True, exist_ok=True)
    first = next(iter(reports.values()))
    best = best_kd_row(reports[max(reports)]) if reports else "avg_kd"
    teachers_dir = Path(args.teachers)
    cfg = load_recipe(args.recipe, [*STUDY_STUDENT, *args.set])
    t_lines, t_info = _teachers_section(teachers_dir) if (teachers_dir / "metrics.json").is_file() else ([], {})
    lines = ["# Evidence: does the multi-branch EKD student earn its place?", "",
             f"Written by `python experiments/evidence_study.py --sizes {','.join(map(str, args.sizes))} --seeds "
             f"{','.join(map(str, args.seeds))}` from finished runs (`--report-only` rebuilds it); "
             "every cell is a run of `ekdc compare` (see `runs/evidence/n<size>/`). Machine: "
             f"{first.get('machine', 'this 2-core CPU')}; training on {_training_text(first)}.", "",
             "Recipe: `recipes/cifar10-strong.yaml` with the 3-branch student under test ("
             + ", ".join(f"`{o}`" for o in STUDY_STUDENT) + ") and `data.per_class` set per size"
             + (f" and {', '.join(f'`--set {s}`' for s in args.set)} for every cell" if args.set else "")
             + "; the teachers' outputs are read "
             f"from a cache of {cfg.distill.teacher_cache.views} fixed views an image; {cfg.distill.epochs} epochs of "
             f"batch {cfg.distill.batch_size} for every student. Validation: the fixed 5,000-image split (500 a class) no run "
             "trains on. Accuracies are the exported fp32 ONNX students' own on it, in %, mean ± std over the seeds "
             "that finished (n). A seed fixes the student's initialisation and batch order; the training subset of a "
             "size is the same for every cell.", "", "## Teachers", "", *t_lines, ""]
    pairs_json = {}
    for size, report in sorted(reports.items(), reverse=True):
        write_compare_plot(report, docs / f"evidence-{size}.png")
        p_lines, pairs_json[size] = _pairs_table(report, best)
        lines += [f"## {size} images a class ({size * 10:,} training images)", "", *_rows_table(report), "",
                  "Paired by seed:", "", *p_lines, "", f"![accuracy by row, {size} a class](evidence-{size}.png)", ""]
    lines += ["<!-- reading -->", "## Reading", "", *(args.reading or ["(written once the grid is complete)"]), ""]
    (docs / "EVIDENCE.md").write_text("\n".join(lines))
    _artifacts(reports, docs / "evidence", t_info)
    (docs / "evidence" / "pairs.json").write_text(json.dumps({"best_kd_row": best, "pairs": pairs_json}, indent=1))


def _artifacts(reports: dict[int, dict], folder: Path, teachers: dict) -> None:
    """Seed 0's exported student of every row at 500 a class, named by row, and evidence.json."""
    report = reports.get(500)
    files = []
    if report is not None:
        out = Path(report["out"])
        for e in report["rows"]:
            if "0" not in e["acc"]:
                continue
            slug = parse_row(e["row"]).slug
            name = f"{slug}-500-s0.onnx"
            shutil.copyfile(out / slug / "s0" / "export" / "student.onnx", folder / name)
            files.append({"row": e["row"], "onnx": name, "mode": e["mode"], "kd_loss": e["kd_loss"],
                          "student": e["student"], "num_branches": e["num_branches"], "per_class": 500, "seed": 0,
                          "macs": e["macs"], "params": e["params"], "val_acc": e["acc"]["0"],
                          "latency_ms": e["latency_ms"]})
    (folder / "evidence.json").write_text(json.dumps({"files": files, "teachers": teachers}, indent=1))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(ROOT / "recipes" / "cifar10-strong.yaml"))
    ap.add_argument("--runs-root", default="runs/evidence")
    ap.add_argument("--teachers", default="runs/strong-teachers/teachers", help="the teachers' folder (metrics.json)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="images a class, first decides the best loss")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--set", action="append", default=[], help="recipe override for every cell (repeatable)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.console = None
    reading = Path(args.docs) / "EVIDENCE.md"
    args.reading = _kept_reading(reading)
    reports = run(args)
    write_page(reports, args)
    for report in reports.values():
        from rich.console import Console

        Console(width=200).print(compare_table(report))


def _kept_reading(page: Path):
    """The reading written by hand below ``<!-- reading -->`` survives a rebuild of the figures."""
    if not page.is_file() or "<!-- reading -->" not in page.read_text():
        return None
    tail = page.read_text().split("<!-- reading -->", 1)[1].strip().splitlines()
    return tail[1:] if tail and tail[0].startswith("## Reading") else tail


if __name__ == "__main__":
    main()
