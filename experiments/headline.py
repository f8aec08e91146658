#!/usr/bin/env python3
"""ekdc's headline: how much of the teachers' accuracy the student keeps, at what cost, on full CIFAR-10.

    python experiments/headline.py --commit         # train what is missing (resumable), then report
    python experiments/headline.py --report-only    # rebuild the pages from finished runs
    python experiments/headline.py --keep-cache --commit   # at a session's end: the teacher cache built so far

Trains the rows of ``recipes/cifar10-strong.yaml`` through ``ekdc compare`` (the recipe's student, the
same student with ``ce`` and with DKD at the same schedule; one seed) into runs/headline/, and the branch question beside
them (runs/headline/three-branch/: a 3-branch student of the recipe student's MACs with ``avg_kd`` and ``ekd``,
and the one-branch student ``ekdc plan`` picks for its latency), exports the recipe's student
in fp32 and int8 with the teacher ensemble beside it, benches every file (``ekdc bench``: 3 interleaved
rounds at batch 1 and 64, accuracy on the validation split), and writes:

- docs/HEADLINE.md and docs/headline.json: the table, with the command, machine and CPU time;
- docs/headline.png: accuracy against batch-64 throughput;
- the README's headline table (between its ``<!-- headline -->`` markers);
- experiments/records/headline/: each finished cell's record and the teacher-output cache
  (experiments/grid_records.py; ``--commit`` commits them as each cell ends), put back into runs/headline/
  when the driver starts again in a later session;
- docs/evidence/: each exported fp32 student (full-<row>.onnx), the ensemble as teachers.onnx with fp16
  weights (float32 inputs and outputs), and the full-data rows of evidence.json. Every accuracy written is
  the exported file's own on the validation split.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ekdc import bench, export, load_recipe  # noqa: E402
from ekdc.comparison import compare  # noqa: E402
from ekdc.comparison.grid import fold_choice  # noqa: E402
from ekdc.comparison.rows import parse_row  # noqa: E402

sys.path.insert(0, str(ROOT / "experiments"))
from grid_records import CACHE, RECORDS, commit, keep_cache, keep_cell, keep_grid, restore  # noqa: E402
from evidence_files import FULL, cpu_hours, file_row, shipped_teachers, split_of, teacher_files, update_evidence  # noqa: E402

RECIPE = ROOT / "recipes" / "cifar10-strong.yaml"
OUT = DEFAULT_OUT = ROOT / "runs" / "headline"
DOCS = ROOT / "docs"
README_MARKERS = ("<!-- headline -->", "<!-- /headline -->")
READING = "<!-- reading -->"  # HEADLINE.md below this line is kept as it is by a rebuild


def weights_to_fp16(src: Path, dst: Path) -> None:
    """An ONNX graph whose float initializers are stored in fp16, each cast back to float32 where it is
    used: half the file, float32 inputs, outputs and arithmetic."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(src))
    g = model.graph
    casts, inits = [], []
    for init in g.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.float32 and arr.size > 16:
            inits.append(numpy_helper.from_array(arr.astype(np.float16), init.name + "_fp16"))
            casts.append(helper.make_node("Cast", [init.name + "_fp16"], [init.name], to=onnx.TensorProto.FLOAT))
        else:
            inits.append(init)
    del g.initializer[:]
    g.initializer.extend(inits)
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(casts + nodes)
    for prop in model.metadata_props:  # what the file stores, as ekdc's own fp16 export says it (float32 I/O)
        if prop.key == "ekdc.precision":
            prop.value = "fp16"
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


# the branch question at full data: the recipe's one-branch student against a 3-branch student of about
# its MACs (119.0M against 118.1M: the same trunk, each branch half as wide; every width a multiple of 8),
# trained from the same teacher-output cache; its planned:avg_kd row is the one-branch student of its latency
THREE_BRANCH = ["student.num_branches=3", "student.widths=[64,128,128]"]


def _records(grid: Path, args):
    """Finished cells of earlier sessions back into ``grid`` (experiments/records/headline/), and the
    ``on_cell`` that keeps each new one there (the recipe's student with its weights: the deploy export,
    int8 included, is made from them), committed with ``--commit``; and what keeps the grid's latencies
    once they are timed. Only for the headline itself: a dry run (--out elsewhere, --set) neither reads nor
    writes the records."""
    if not _is_the_headline(args):
        return None, lambda _: None
    commit_them = args.commit
    store = _store(grid)
    if restore(store, grid):
        print(f"headline: finished cells of {grid} restored from {store}")

    def on_cell(cell: Path) -> None:
        keep_cell(grid, cell, store, extra=("student.pt",) if cell.parent == OUT / "recipe" else ())
        if grid == OUT:  # every row's cache is built in the headline's folder (the 3-branch rows read it there)
            keep_cache(grid, store)
        if commit_them:
            commit(store, f"headline: cell {cell.relative_to(OUT)} finished (records)")

    def after(report_only: bool) -> None:  # the latencies are timed after the cells
        if not report_only:
            keep_grid(grid, store)
            if commit_them:
                commit(store, f"headline: {grid.relative_to(OUT.parent)}'s latencies (records)")
    return on_cell, after


def _is_the_headline(args) -> bool:
    """The headline itself, whose records are kept: not a dry run (--out elsewhere, --set)."""
    return OUT == DEFAULT_OUT and not args.set


def _store(grid: Path) -> Path:
    return RECORDS / "headline" / (grid.relative_to(OUT) if grid != OUT else "rows")


def keep_teacher_cache(args) -> None:
    """--keep-cache: the teacher-output cache as it stands (a build still running, stopped, or done) into the
    records, committed with --commit: what a session ending in the middle of the build keeps of it."""
    kept = keep_cache(OUT, _store(OUT))
    print(f"headline: {len(kept)} teacher-cache files kept in {_store(OUT)}")
    if args.commit:
        commit(_store(OUT), "headline: the teacher-output cache so far (records)")


def train(args) -> dict:
    recipe = load_recipe(RECIPE, args.set)
    t0 = time.perf_counter()
    on_cell, after = _records(OUT, args)
    report = compare(recipe, rows=args.rows, seeds=[0], out=OUT, report_only=args.report_only, progress=False,
                     on_cell=on_cell)
    after(args.report_only)
    deploy = OUT / "deploy"
    if not (deploy / "manifest.json").is_file():
        export(OUT / "recipe" / "s0", deploy, int8=True, teachers=True)
    branch_report = None
    if args.branch_rows:
        branched = load_recipe(RECIPE, [*args.set, *THREE_BRANCH,
                                        f"distill.teacher_cache.path={OUT / CACHE}"])
        on_cell, after = _records(OUT / "three-branch", args)
        branch_report = compare(branched, rows=args.branch_rows, seeds=[0], out=OUT / "three-branch",
                                report_only=args.report_only, progress=False, on_cell=on_cell)
        after(args.report_only)
    return {"compare": report, "three_branch": branch_report, "seconds_this_call": time.perf_counter() - t0}


def main() -> None:
    global OUT, DOCS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # recipe+dkd: does DKD, which paid +2.01 points on 500 images a class (docs/EVIDENCE.md), pay at full data?
    ap.add_argument("--rows", default="recipe,recipe+dkd,ce")
    ap.add_argument("--branch-rows", default="avg_kd,ekd,planned:avg_kd",
                    help="rows of the 3-branch student ('' for none)")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--commit", action="store_true", help="commit each cell's record as it ends "
                    "(experiments/records/headline/): the rows may take more than one work session")
    ap.add_argument("--keep-cache", action="store_true", help="only keep the teacher-output cache as it stands in "
                    "the records (with --commit, commit it): at a session's end, while the build runs")
    ap.add_argument("--set", action="append", default=[], help="a recipe override (a dry run: data.per_class=20)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--docs", type=Path, default=ROOT / "docs", help="where the pages go (README only with docs/)")
    args = ap.parse_args()
    OUT, DOCS = args.out.resolve(), args.docs.resolve()
    if args.keep_cache:
        if not _is_the_headline(args):
            ap.error("--keep-cache keeps the headline's own teacher cache: give neither --out nor --set")
        return keep_teacher_cache(args)
    DOCS.mkdir(parents=True, exist_ok=True)
    reports = train(args)
    deploy = OUT / "deploy"
    students = _student_files(args)
    files = {label: onnx for label, (onnx, _, _) in students.items()}
    files["teacher ensemble"] = deploy / "teachers.onnx"
    rep = bench(list(files.values()), against=deploy / "teachers.onnx", batches=[1, 64], repeats=3, data=OUT / "recipe" / "s0",
                json_path=OUT / "bench.json")
    models = dict(zip(files, rep["models"]))
    teacher_folder, teachers = shipped_teachers(load_recipe(RECIPE, args.set))
    student_run = json.loads((OUT / "recipe" / "s0" / "metrics.json").read_text())
    ens = models["teacher ensemble"]
    table = []
    for label, m in models.items():
        table.append({
            "model": label, "file": files[label].name, "accuracy": m["accuracy"], "macs": m["macs"],
            "file_mb": m["file_mb"], "p50_ms_b1": m["latency_ms"]["1"]["p50"],
            "p50_ms_b64": m["latency_ms"]["64"]["p50"], "img_s_b64": m["throughput"]["64"],
            "speedup_b1": ens["latency_ms"]["1"]["p50"] / m["latency_ms"]["1"]["p50"],
            "speedup_b64": m["throughput"]["64"] / ens["throughput"]["64"],
            "gap_points": 100 * (m["accuracy"] - ens["accuracy"]),
        })
    cells = [*OUT.glob("*/s*/metrics.json"), *OUT.glob("three-branch/*/s*/metrics.json")]
    record = {"recipe": "recipes/cifar10-strong.yaml", "command": shlex.join(["python", "experiments/headline.py", *sys.argv[1:]]),
              "teachers": [{k: t[k] for k in ("name", "arch", "val_acc", "macs")} for t in teachers["teachers"]],
              "teacher_ensemble_acc": ens["accuracy"], "rows": table, "machine": rep["machine"],
              "threads": rep["settings"]["threads"], "cpu_hours": round(cpu_hours(cells, teachers), 2),
              "teacher_folder": str(teacher_folder.relative_to(ROOT)) if teacher_folder.is_relative_to(ROOT) else
              str(teacher_folder),
              "train_images": student_run["train_images"], "val_images": student_run["val_images"],
              "teacher_train_images": teachers["train_images"]}
    (DOCS / "headline.json").write_text(json.dumps(record, indent=2) + "\n")
    page = DOCS / "HEADLINE.md"
    kept = page.read_text() if page.is_file() else ""
    reading = kept.split(READING, 1)[1] if READING in kept else \
        "\n## Reading\n\n(written by hand once the figures are in; `--report-only` keeps it)\n"
    md = _markdown(record)
    page.write_text(md + "\n" + READING + reading)
    if DOCS == ROOT / "docs":
        _readme(record)
    _plot(record, DOCS / "headline.png")
    _evidence(record, students, files["teacher ensemble"], split_of(load_recipe(RECIPE, args.set).data, DOCS / "evidence"), reports)
    print(md)


def _table_lines(record: dict) -> list[str]:
    lines = ["| model | val acc | vs ensemble | MACs | file MB | batch 1 p50 ms | speedup b1 | batch 64 img/s | speedup b64 |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ens = 100 * record["teacher_ensemble_acc"]
    for t in record["teachers"]:  # each teacher alone: its own validation accuracy (teachers.json), not benched
        lines.append(f"| teacher {t['arch']} | {100 * t['val_acc']:.2f}% | {100 * t['val_acc'] - ens:+.2f} | "
                     f"{t['macs'] / 1e6:.1f}M | | | | | |")
    for r in record["rows"]:
        lines.append(f"| {r['model']} | {100 * r['accuracy']:.2f}% | {r['gap_points']:+.2f} | {r['macs'] / 1e6:.1f}M | "
                     f"{r['file_mb']:.1f} | {r['p50_ms_b1']:.2f} | {r['speedup_b1']:.2f}x | {r['img_s_b64']:,.0f} | "
                     f"{r['speedup_b64']:.2f}x |")
    return lines


def _student_files(args) -> dict[str, tuple[Path, Path, str]]:
    """Each student to bench, by its label in the table: (its ONNX file, its run, its row in evidence.json, or ""
    for none). The recipe's student is the deploy export (fp32 and int8); every other row is compare's own
    export of its cell. Rows not trained yet are left out."""
    deploy, recipe_run = OUT / "deploy", OUT / "recipe" / "s0"
    out = {"student fp32": (deploy / "student.onnx", recipe_run, "recipe"),
           "student int8": (deploy / "student.int8.onnx", recipe_run, "")}
    for row in [r.strip() for r in args.rows.split(",") if r.strip() and r.strip() != "recipe"]:
        run = OUT / parse_row(row).slug / "s0"
        out[f"{row} student fp32"] = (run / "export" / "student.onnx", run, row)
    for row in [r.strip() for r in args.branch_rows.split(",") if r.strip()]:
        run = OUT / "three-branch" / parse_row(row).slug / "s0"
        out[_branch_label(row)] = (run / "export" / "student.onnx", run, f"3-branch {row}")
    return {label: v for label, v in out.items() if v[0].is_file()}


def _branch_label(row: str) -> str:
    """A 3-branch grid row's label in the table: a planned row is the one-branch student of the 3-branch
    student's latency."""
    if parse_row(row).student == "planned":
        return f"1-branch at 3-branch latency ({row}) student fp32"
    return f"3-branch {row} student fp32"


def _findings(record: dict) -> list[str]:
    """What the table answers, in numbers taken from it (so that a rebuild rewrites them with it): how much
    of the ensemble's accuracy the student keeps at what cost, what distillation adds over the labels, and
    whether three branches pay against one at equal MACs and at equal latency. Rows not finished are left out."""
    rows = {r["model"]: r for r in record["rows"]}
    ens = rows["teacher ensemble"]
    pts = lambda a, b: 100 * (a["accuracy"] - b["accuracy"])  # noqa: E731
    acc = lambda r: f"{100 * r['accuracy']:.2f}%"  # noqa: E731
    lines = []
    student = rows.get("student fp32")
    if student:
        share = ens["macs"] / student["macs"]
        met = student["gap_points"] >= -2 and share >= 5
        lines.append(
            f"- **Kept:** the student scores {acc(student)} against the ensemble's {acc(ens)} "
            f"({student['gap_points']:+.2f} points) at 1/{share:.1f} of its MACs, {student['speedup_b1']:.1f}x its "
            f"speed at batch 1 and {student['speedup_b64']:.1f}x its throughput at batch 64: the aim (within 2 points "
            f"at no more than a fifth of the MACs) is {'met' if met else '**not met**'}.")
    int8 = rows.get("student int8")
    if student and int8:
        lines.append(f"- **int8:** {acc(int8)} ({pts(int8, student):+.2f} against fp32), "
                     f"{int8['speedup_b1'] / student['speedup_b1']:.2f}x the fp32 file's speed at batch 1, "
                     f"{int8['speedup_b64'] / student['speedup_b64']:.2f}x at batch 64.")
    ce = rows.get("ce student fp32")
    if student and ce:
        lines.append(f"- **Distillation against the labels alone** (`ce`, the same student and schedule): "
                     f"{pts(student, ce):+.2f} points ({acc(student)} against {acc(ce)}).")
    dkd = rows.get("recipe+dkd student fp32")
    if student and dkd:
        lines.append(f"- **DKD** (the same student and schedule, DKD with its warm-up instead of KL): "
                     f"{pts(dkd, student):+.2f} points ({acc(dkd)} against {acc(student)}).")
    three = rows.get(_branch_label("avg_kd"))
    if student and three:
        lines.append(f"- **Equal MACs:** three branches ({three['macs'] / 1e6:.1f}M MACs) against the one-branch "
                     f"student ({student['macs'] / 1e6:.1f}M), both `avg_kd`: {pts(three, student):+.2f} points; "
                     f"batch-1 latency {three['p50_ms_b1']:.2f} against {student['p50_ms_b1']:.2f} ms.")
    ekd = rows.get(_branch_label("ekd"))
    if three and ekd:
        lines.append(f"- **EKD's objective** on the 3-branch student: `ekd` {acc(ekd)}, "
                     f"{pts(ekd, three):+.2f} points against `avg_kd`.")
    planned = rows.get(_branch_label("planned:avg_kd"))
    if three and planned:
        lines.append(f"- **Equal latency:** three branches against the one branch `ekdc plan` picked for their "
                     f"latency ({planned['macs'] / 1e6:.1f}M MACs; {planned['p50_ms_b1']:.2f} against "
                     f"{three['p50_ms_b1']:.2f} ms at batch 1 here): {pts(three, planned):+.2f} points.")
        if student and abs(student["p50_ms_b1"] / three["p50_ms_b1"] - 1) <= 0.05:  # a second one-branch answer
            lines.append(f"- **Equal latency, the recipe's one branch:** the one-branch student runs at "
                         f"{student['p50_ms_b1']:.2f} ms too (within 5% of the three branches' "
                         f"{three['p50_ms_b1']:.2f} ms): three branches against it, {pts(three, student):+.2f} points. "
                         "Which one branch stands against them decides the sign: the plan's widest-MACs pick is not "
                         "the most accurate shape.")
    if lines:
        lines.append("- One seed a row: the spread between seeds at full data was not measured.")
        if ens.get("file_mb"):
            lines.append(f"- The teacher ensemble's file MB is the fp32 file benchmarked here ({ens['file_mb']:.1f} MB); "
                         "docs/evidence/teachers.onnx ships the same graph with fp16 weights behind float32 I/O, half "
                         "the size.")
    return lines


def _machine(m: dict) -> str:
    return (f"{m.get('cpu', 'a CPU')} ({m.get('usable_cores', m.get('cores'))} cores; "
            f"{', '.join(m.get('cpu_flags') or []) or 'no AVX'}), ONNX Runtime {m.get('onnxruntime', '?')}")


def _markdown(record: dict) -> str:
    t = ", ".join(f"{x['arch']} {100 * x['val_acc']:.2f}%" for x in record["teachers"])
    return "\n".join([
        "# Headline: how much of the teachers' accuracy the student keeps",
        "",
        f"CIFAR-10: the student distilled on {record['train_images']:,} training JPEGs, everything scored on the "
        f"fixed {record['val_images']:,}-image "
        f"validation split. Teachers (ekdc's pretrained weights, {record.get('teacher_folder', 'weights/cifar10')}/): "
        f"{t}. Every accuracy is the "
        "exported ONNX file's own; latency and throughput from `ekdc bench` (ONNX Runtime CPU, 3 interleaved "
        f"rounds) on {_machine(record['machine'])}, {record['threads']} threads.",
        "",
        *_table_lines(record),
        "",
        f"    {record['command']}      # CPU time of every training behind it: {record['cpu_hours']} h",
        "",
        *_findings(record),
        "",
    ])


def _readme(record: dict) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        return
    block = "\n".join([start, *_table_lines(record), "", "![accuracy against throughput](docs/headline.png)", "",
                       *_findings(record), end])
    a, b = text.index(start), text.index(end) + len(end)
    readme.write_text(text[:a] + block + text[b:])


def _plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for r in record["rows"]:
        ax.scatter(r["img_s_b64"], 100 * r["accuracy"], s=20 + r["macs"] / 4e6)
        ax.annotate(f"{r['model']}\n{r['macs'] / 1e6:.0f}M MACs", (r["img_s_b64"], 100 * r["accuracy"]), fontsize=8,
                    xytext=(5, -10), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("throughput at batch 64 (images/s, ONNX Runtime CPU)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("CIFAR-10: the student against the teacher ensemble")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _evidence(record: dict, students: dict, ensemble: Path, split: dict, reports: dict) -> None:
    """The full-data rows of evidence.json: each row's compare entry (``reports``: both grids' reports), with
    the accuracy and latencies the bench measured on the very file shipped (the recipe's row is the deploy
    export, not its cell's)."""
    ev = DOCS / "evidence"
    ev.mkdir(exist_ok=True)
    by_label = {r["model"]: r for r in record["rows"]}
    compared = {e["row"]: e for e in (reports["compare"] or {}).get("rows", [])}
    compared.update({f"3-branch {e['row']}": e for e in (reports["three_branch"] or {}).get("rows", [])})
    entries = []
    for label, (onnx, run, row) in students.items():
        if not row or label not in by_label:
            continue
        if row not in compared:  # never silently: a row benched but missing from its grid's report
            print(f"headline: {row} is not in its grid's report; left out of evidence.json")
            continue
        name = f"full-{row.replace(' ', '-').replace(':', '-')}.onnx"
        shutil.copyfile(onnx, ev / name)
        r = by_label[label]
        entry = {**compared[row], "row": row}
        entries.append(file_row(entry, run.parent.parent, name, per_class=None, train_images=record["train_images"],
                                val_acc=r["accuracy"], latency_ms=r["p50_ms_b1"], latency_rounds_ms=None,
                                latency_ms_b64=r["p50_ms_b64"], img_s_b64=r["img_s_b64"], fold=fold_choice(onnx)))
    weights_to_fp16(ensemble, ev / "teachers.onnx")
    ens = next(r for r in record["rows"] if r["model"] == "teacher ensemble")
    check = bench([ev / "teachers.onnx"], batches=[1], repeats=1, data=OUT / "recipe" / "s0")["models"][0]["accuracy"]
    teachers = {"val_acc": check, "val_acc_fp32_weights": ens["accuracy"], "macs": ens["macs"],
                "train_images": record["teacher_train_images"], "onnx": "teachers.onnx", "files": teacher_files(OUT)}
    update_evidence(ev, FULL, entries, teachers, split=split)


if __name__ == "__main__":
    main()
