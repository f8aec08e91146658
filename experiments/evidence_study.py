#!/usr/bin/env python3
"""The paper's claim, on limited data: does the multi-branch EKD student earn its place at 500 CIFAR-10
images a class, distilled from ekdc's pretrained teachers, at a schedule that has converged?

    python experiments/evidence_study.py                  # run (or continue) the grid, then write the page
    python experiments/evidence_study.py --report-only    # rebuild docs/EVIDENCE.md and docs/evidence/ only

Every cell is a run of ``ekdc compare`` on ``recipes/cifar10-strong.yaml`` (its teachers, weights/cifar10-large/,
with ``weights:``, their outputs read from a cache of 8 fixed views an image) with ``data.per_class: 500``,
a 3-branch FastNet student (``THREE_BRANCH``: widths [64,72,80], 65.9M MACs, every width a multiple of 8;
export pads them to whole 16-channel blocks where that is faster: docs/PADDED-WIDTHS.md)
and the recipe's schedule stretched to ``--epochs`` (its warm-up the same fraction of them). Rows, 3 seeds:

    ce, avg_kd, ekd, avg_kd+dkd      the 3-branch student (+dkd: DKD with its warm-up, compare's rows.py)
    plain:avg_kd                     one branch, every width scaled to the 3-branch student's MACs
    planned:avg_kd                   one branch of the same stages, planned by ekdc plan for its measured latency

Each finished cell's record is kept in experiments/records/evidence/ (``--commit`` commits it as the cell ends)
and put back into runs/evidence/ when the driver starts (experiments/grid_records.py): a grid of several
sessions, whose run folders do not outlive them, goes on where it stopped.

Order: seed 0 of every row, then the convergence check (``avg_kd`` seed 0 at twice ``--epochs``, runs/evidence/
n500-x2; the page shows the gain), then the other seeds, seed-major. The page is written after each of the three.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from ekdc import load_recipe  # noqa: E402
from ekdc.benchmark.machine import cpu_model  # noqa: E402
from ekdc.comparison import compare, compare_table, parse_row, parse_seeds, write_compare_plot  # noqa: E402
from ekdc.comparison.stats import mean_std, paired_diffs, pct, pct_mean_std  # noqa: E402
from evidence_files import LIMITED, cpu_hours, file_row, shipped_teachers, split_of, update_evidence  # noqa: E402
from grid_records import RECORDS, commit, keep_cell, keep_grid, restore  # noqa: E402

RECIPE = ROOT / "recipes" / "cifar10-strong.yaml"
# the grid's student: smaller than the full-data headline's (119M MACs), as a student for 5,000 images may be,
# and the student of the earlier teachers' grid (docs/EARLIER-RESULTS.md, docs/PADDED-WIDTHS.md)
THREE_BRANCH = ["student.num_branches=3", "student.widths=[64,72,80]"]
DEFAULT_RUNS = ROOT / "runs" / "evidence"
PER_CLASS = 500
ROWS = ["ce", "avg_kd", "ekd", "avg_kd+dkd", "plain:avg_kd", "planned:avg_kd"]
CHECK_ROW = "avg_kd"  # the convergence check's row: the one every comparison below is paired with
EPOCHS = 200  # 9 steps an epoch at batch 512: 1,800 steps. avg_kd seed 0 at 50, 100, 200 epochs: 78.50, 79.66,
# 80.52% (runs/evidence-50ep, runs/evidence-100ep, this grid): each doubling gained 0.5 points or more
CONVERGED_POINTS = 0.5  # twice the epochs must gain less than this
# the paired gaps the page shows: (row, baseline, what the gap answers)
PAIRS = [
    ("avg_kd", "ce", "KD from the averaged teachers, against the student alone"),
    ("ekd", "avg_kd", "EKD's pairing (branch i from teacher i), against the averaged teachers"),
    ("avg_kd+dkd", "avg_kd", "DKD (with its warm-up) instead of KL, in avg_kd"),
    ("avg_kd", "plain:avg_kd", "3 branches against 1 branch of equal MACs, both avg_kd"),
    ("ekd", "plain:avg_kd", "EKD's 3 branches against 1 branch of equal MACs"),
    ("avg_kd", "planned:avg_kd", "3 branches against 1 branch of equal measured latency, both avg_kd"),
]


def grid_recipe(epochs: int, extra: list[str]):
    """The recipe at 500 a class with the 3-branch student, its schedule stretched to ``epochs``."""
    base = load_recipe(RECIPE)
    warmup = base.distill.warmup_epochs * epochs / base.distill.epochs
    return load_recipe(RECIPE, [f"data.per_class={PER_CLASS}", *THREE_BRANCH, f"distill.epochs={epochs}",
                                f"distill.warmup_epochs={warmup:g}", *extra])


def run(args) -> tuple[dict, dict]:
    root = Path(args.runs_root).resolve()  # compare hands on_cell absolute cell folders
    main_out, check_out = root / f"n{PER_CLASS}", root / f"n{PER_CLASS}-x2"
    cache = [f"distill.teacher_cache.path={(main_out / 'teacher_cache').resolve()}"]  # both grids read one cache
    recipe, doubled = grid_recipe(args.epochs, [*cache, *args.set]), grid_recipe(2 * args.epochs, [*cache, *args.set])
    go = dict(report_only=args.report_only, console=args.console, progress=False)
    # finished cells of earlier sessions (experiments/records/evidence/, in git) come back first
    # (only for the grid itself: a trial elsewhere, at other epochs or with --set neither reads nor writes them)
    kept = root == DEFAULT_RUNS.resolve() and args.epochs == EPOCHS and not args.set
    stores = {main_out: RECORDS / "evidence" / main_out.name, check_out: RECORDS / "evidence" / check_out.name}
    for grid, store in stores.items():
        if kept and restore(store, grid):
            print(f"evidence: finished cells of {grid} restored from {store}")

    def keep(grid: Path):
        if not kept:
            return None

        def on_cell(cell: Path) -> None:
            keep_cell(grid, cell, stores[grid], timed=f"s{args.seeds[0]}")
            if args.commit:
                commit(stores[grid], f"evidence: cell {grid.name}/{cell.relative_to(grid)} finished (records)")
        return on_cell

    go_main, go_check = {**go, "on_cell": keep(main_out)}, {**go, "on_cell": keep(check_out)}
    if not args.report_only:  # every row once, then the check, then the seeds that make the spread
        compare(recipe, ROWS, args.seeds[:1], main_out, **go_main)
        # the page is written from every finished cell, so that a resumed grid never shows less than before
        finished = compare(recipe, ROWS, args.seeds, main_out, **{**go, "report_only": True})
        write_page(finished, compare(doubled, [CHECK_ROW], [0], check_out, report_only=True), args)
        write_page(finished, compare(doubled, [CHECK_ROW], [0], check_out, **go_check), args)
    report = compare(recipe, ROWS, args.seeds, main_out, **go_main)
    check = compare(doubled, [CHECK_ROW], [0], check_out, report_only=True)
    if kept and not args.report_only:  # the latencies are timed after the cells
        for grid, store in stores.items():
            keep_grid(grid, store)
            if args.commit:
                commit(store, f"evidence: {grid.name}'s latencies (records)")
    return report, check


# --------------------------------------------------------------------------------------------------
# the page


def _rows_table(report: dict) -> list[str]:
    lines = ["| row | mode | KD loss | branches | student | MACs | fold | p50 ms (batch 1) | "
             "rounds' p50 ms (batch 1) | p50 ms (batch 64) | img/s (batch 64) | n | acc % (exported ONNX) | "
             "PyTorch acc % |",
             "|---|---|---|---:|---|---:|---|---:|---|---:|---:|---:|---:|---:|"]
    num = lambda x, f: "–" if x is None else format(x, f)  # noqa: E731
    for e in report["rows"]:
        rounds = e.get("latency_rounds_ms")  # each fresh process's p50: shows a bimodal file as such
        speed = " | ".join([num(e["latency_ms"], ".3f"),
                            " ".join(f"{x:.2f}" for x in sorted(rounds)) if rounds else "–",
                            num(e.get("latency_ms_b64"), ".2f"), num(e.get("img_s_b64"), ",.0f")])
        macs = f"{e['macs'] / 1e6:.1f}M" if e["macs"] else "–"
        lines.append(f"| `{e['row']}` | {e['mode'] or '–'} | {e['kd_loss'] or '–'} | {e['num_branches'] or '–'} | "
                     f"{e['student'] or '–'} | {macs} | {e.get('fold') or '–'} | {speed} | {len(e['acc'])} | "
                     f"{pct_mean_std(list(e['acc'].values()))} | {pct_mean_std(list(e['torch_acc'].values()))} |")
    return lines


def _pairs_table(report: dict) -> tuple[list[str], list[dict]]:
    by = {e["row"]: e for e in report["rows"]}
    lines = ["| row − baseline | what it answers | seeds | gap, points (mean ± std) | row ahead in | seed spread of "
             "the baseline |", "|---|---|---:|---:|---:|---:|"]
    out = []
    for row, base, what in PAIRS:
        if row not in by or base not in by:
            continue
        seeds = [s for s in by[row]["acc"] if s in by[base]["acc"]]
        if not seeds:
            continue
        diffs = paired_diffs(by[row]["acc"], by[base]["acc"])
        sd = pct(mean_std(list(by[base]["acc"].values()))[1])
        lines.append(f"| `{row}` − `{base}` | {what} | {len(seeds)} | {pct_mean_std(diffs, True)} | "
                     f"{sum(d > 0 for d in diffs)} of {len(seeds)} | {sd} |")
        out.append({"row": row, "baseline": base, "seeds": len(seeds), "diffs": diffs})
    return lines, out


def _convergence(report: dict, check: dict, epochs: int) -> tuple[list[str], dict]:
    """The check row's seed-0 accuracy at the grid's epochs and at twice as many."""
    at = lambda r: next((e["acc"].get("0") for e in r["rows"] if e["row"] == CHECK_ROW), None)  # noqa: E731
    one, two = at(report), at(check)
    if one is None or two is None:
        return ["(the check has not finished)"], {}
    gain = 100 * (two - one)
    verdict = ("converged: twice the epochs gain less than " if gain < CONVERGED_POINTS else
               "**not converged**: twice the epochs gain at least ") + f"{CONVERGED_POINTS} points"
    lines = ["| row, seed 0 | epochs | acc % (exported ONNX) |", "|---|---:|---:|",
             f"| `{CHECK_ROW}` | {epochs} | {pct(one)} |", f"| `{CHECK_ROW}` | {2 * epochs} | {pct(two)} |", "",
             f"Gain from twice the epochs: {gain:+.2f} points: {verdict}."]
    return lines, {"row": CHECK_ROW, "epochs": epochs, "acc": one, "acc_2x": two, "gain_points": gain}


def _teachers_lines(report: dict, recipe) -> list[str]:
    folder, shipped = shipped_teachers(recipe)
    where = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
    ens = None
    for e in report["rows"]:
        for seed in e["acc"]:
            m = Path(report["out"]) / parse_row(e["row"]).slug / f"s{seed}" / "metrics.json"
            if m.is_file():
                ens = json.loads(m.read_text())["teacher_ensemble_acc"]
                break
        if ens is not None:
            break
    lines = ["| teacher | val acc | MACs |", "|---|---:|---:|"]
    lines += [f"| {t['name']} | {pct(t['val_acc'])} | {t['macs'] / 1e6:.1f}M |" for t in shipped["teachers"]]
    macs = sum(t["macs"] for t in shipped["teachers"])
    lines.append(f"| **ensemble** | **{pct(ens) if ens is not None else '–'}** | {macs / 1e6:.1f}M |")
    return lines + ["", f"ekdc's pretrained teachers ({where}/, trained on all {shipped['train_images']:,} "
                        f"training images outside the validation split; {where}/teachers.json): the students "
                        "see 5,000 of "
                        "those images, the teachers saw all of them, as in the paper's setting."]


def write_page(report: dict, check: dict, args) -> None:
    docs = Path(args.docs)
    (docs / "evidence").mkdir(parents=True, exist_ok=True)
    recipe = grid_recipe(args.epochs, args.set)
    conv_lines, conv = _convergence(report, check, args.epochs)
    pair_lines, pairs = _pairs_table(report)
    write_compare_plot(report, docs / f"evidence-{PER_CLASS}.png")
    cmd = shlex.join(["python", "experiments/evidence_study.py",
                      *([f"--epochs={args.epochs}"] if args.epochs != EPOCHS else []),
                      *([f"--seeds={','.join(map(str, args.seeds))}"] if args.seeds != [0, 1, 2] else []),
                      *[f"--set={s}" for s in args.set]])
    d = recipe.distill
    hours = cpu_hours([*Path(report["out"]).glob("*/s*/metrics.json"), *Path(check["out"]).glob("*/s*/metrics.json")],
                      shipped_teachers(recipe)[1])
    lines = ["# Evidence: does the multi-branch EKD student earn its place on limited data?", "",
             f"Written by `{cmd}` from finished runs (`--report-only` rebuilds it); every cell is a run of "
             f"`ekdc compare` (runs/evidence/n{PER_CLASS}/). Machine: {report.get('machine') or cpu_model()}, "
             f"{os.cpu_count()} cores. Training time behind it on that machine: {hours:.2f} h (the teachers', every "
             "cell's, the convergence check's and the teacher-output cache's build).", "",
             f"Recipe: `recipes/cifar10-strong.yaml` with `data.per_class={PER_CLASS}` ({PER_CLASS * 10:,} training "
             "images, the same for every cell), the 3-branch student under test ("
             + ", ".join(f"`{o}`" for o in THREE_BRANCH) + f"), {d.epochs} epochs of batch {d.batch_size} "
             f"(warm-up {d.warmup_epochs:g} epochs, the recipe's fraction), the teachers' outputs read from a cache of "
             f"{d.teacher_cache.views} fixed views an image"
             + (f", and {', '.join(f'`--set {s}`' for s in args.set)} for every cell" if args.set else "") + ". "
             "Validation: the fixed 5,000-image split (500 a class) no run trains on. Accuracies are the exported fp32 "
             "ONNX students' own on it, in %, mean ± std over the seeds that finished (n). A seed fixes the student's "
             "initialisation and batch order.", "", "## Teachers", "", *_teachers_lines(report, recipe), "",
             "## Convergence", "", *conv_lines, "",
             f"## {PER_CLASS} images a class", "", *_rows_table(report), "", "Paired by seed:", "", *pair_lines, "",
             f"![accuracy by row]({f'evidence-{PER_CLASS}.png'})", "",
             "<!-- reading -->", "## Reading", "",
             *(_kept_reading(docs / "EVIDENCE.md") or ["(written once the grid is complete)"]), ""]
    (docs / "EVIDENCE.md").write_text("\n".join(lines))
    (docs / "evidence" / "pairs.json").write_text(json.dumps({"pairs": pairs, "convergence": conv}, indent=1) + "\n")
    _artifacts(report, docs / "evidence", split_of(recipe.data, docs / "evidence"))


def _artifacts(report: dict, folder: Path, split: dict) -> None:
    """Seed 0's exported student of every row, named by row, and its row of evidence.json."""
    out = Path(report["out"])
    for old in folder.glob(f"*-{PER_CLASS}-s0.onnx"):  # rows of an earlier grid
        old.unlink()
    rows = []
    for e in report["rows"]:
        if "0" not in e["acc"]:
            continue
        slug = parse_row(e["row"]).slug
        name = f"{slug}-{PER_CLASS}-s0.onnx"
        shutil.copyfile(out / slug / "s0" / "export" / "student.onnx", folder / name)
        rows.append(file_row(e, out, name, per_class=PER_CLASS, train_images=PER_CLASS * 10))
    update_evidence(folder, LIMITED, rows, split=split)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-root", default=str(DEFAULT_RUNS))
    ap.add_argument("--epochs", type=int, default=EPOCHS, help="the grid's epochs (the check trains twice as many)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--docs", default=str(ROOT / "docs"))
    ap.add_argument("--set", action="append", default=[], help="recipe override for every cell (repeatable)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--commit", action="store_true", help="commit each cell's record as it ends (experiments/records/"
                    "evidence/): a grid longer than a work session goes on in the next")
    args = ap.parse_args(argv)
    args.seeds = parse_seeds(args.seeds)
    args.console = None
    report, check = run(args)
    write_page(report, check, args)
    from rich.console import Console

    Console(width=200).print(compare_table(report))


def _kept_reading(page: Path):
    """The reading written by hand below ``<!-- reading -->`` survives a rebuild of the figures. Read when the
    page is written, not when the driver starts: a run of hours writes the page after each step, and the
    reading may be edited meanwhile."""
    text = page.read_text() if page.is_file() else ""
    if "<!-- reading -->" not in text:
        return None
    tail = text.split("<!-- reading -->", 1)[1].strip().splitlines()
    tail = tail[1:] if tail and tail[0].startswith("## Reading") else tail
    while tail and not tail[0].strip():  # the page puts its own blank line after the heading
        tail = tail[1:]
    return tail


if __name__ == "__main__":
    main()
