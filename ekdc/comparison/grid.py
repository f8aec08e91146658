"""``compare``: the same question as the paper's, on any recipe: does the multi-branch student beat the
same student trained alone, and a one-branch student of the same cost? Each row trains over the seeds,
all rows share one set of teachers (trained or loaded once) and one teacher-output cache; every cell is
a run folder, so the grid resumes where it stopped.

    OUT/teachers/          the teachers, trained once (``distill --teachers-only``), loaded by every cell
    OUT/students.json      the one-branch students (equal MACs, planned) and the recipe student's latency
    OUT/teacher_files.json each teacher file the recipe names (weights:, onnx:) and its sha256: a grid is
                           never continued or reported with a file that changed under the same name
    OUT/<row>/s<seed>/     each cell's run folder; its export/ holds the fp32 ONNX student. A cell with its
                           metrics.json and export/manifest.json is finished, even without its student.pt: what
                           the report reads is the exported file's record, so a grid kept as those small files
                           (and seed 0's student.onnx, which is timed) resumes without training them again
    OUT/latency.json       each row's exported student timed at batch 1, all rows in one bench run
    OUT/compare.json       the report (``report.py``)
    OUT/grid.json          the folders the grid was run in (a copy elsewhere is the same grid)
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

from .. import _io
from ..benchmark.runner import time_models
from ..data import index_splits
from ..deploy.export import export
from ..distillation import distill
from ..errors import UserError
from ..plan import plan_space, short_config
from ..recipe import Recipe, dump_recipe, recipe_from_dict
from ..recipe.inert import check_recipe, effective
from ..run import RunDir, all_differences
from .report import build_report, cell_figures, read_grid_file
from .rows import DEFAULT_ROWS, Row, parse_rows, parse_seeds, row_recipe
from .students import (
    equal_macs_student,
    planned_student,
    recipe_latency_ms,
    student_macs,
)

LATENCY_BATCH = 1  # what a `planned:` row is matched on, and each row's latency_ms
THROUGHPUT_BATCH = 64  # a server's batch: grouped branches may rank otherwise there than at batch 1
# interleaved bench rounds (a fresh process each): on a shared 2-core host a grouped multi-branch graph runs
# about 2x slower in some processes and not in others (docs/EVIDENCE.md), so 3 rounds can land 2 slow ones;
# each round's p50 is kept in latency.json (rounds_ms) and shown beside the pooled p50
LATENCY_ROUNDS = 5


def _say(console) -> Callable[[str], None]:
    return (lambda text: console.print(text, markup=False, highlight=False, soft_wrap=True)) if console else (lambda t: None)


def _num_classes(recipe: Recipe) -> int:
    return len(index_splits(recipe.data).classes)


def _teacher_files(recipe: Recipe, out: Path) -> dict:
    """The base recipe mapping with every teacher that trains here replaced by its file in OUT/teachers/."""
    raw = recipe.model_dump(mode="json")
    run = RunDir(out / "teachers")
    for i, t in enumerate(recipe.teachers):
        if t.train is not None:
            raw["teachers"][i] = {**raw["teachers"][i], "weights": str(run.teacher_path(t.name)),
                                  "train": None, "checkpoint": None, "pretrained": False}
    return raw


def _teachers(recipe: Recipe, out: Path, move, console, progress: bool) -> dict:
    """The teachers that train here, trained once (or checked: trained from this recipe), and the base
    recipe mapping with each replaced by its trained file."""
    if any(t.train is not None for t in recipe.teachers):
        folder = out / "teachers"
        run = RunDir(folder)
        if run.teacher_metrics_path.is_file():
            _same_recipe(run, recipe, TEACHER_KEYS, move=move)
        else:
            distill(recipe, folder, resume=run.recipe_path.is_file(), console=console, progress=progress,
                    teachers_only=True)
    return _teacher_files(recipe, out)


def _teacher_sources(recipe: Recipe) -> dict[str, str]:
    """The file each teacher is read from (weights:, its old name checkpoint:, onnx:), by teacher name."""
    return {t.name: str(p) for t in recipe.teachers for p in [t.weights or t.checkpoint or t.onnx] if p}


def _same_teacher_files(recipe: Recipe, out: Path, record: bool) -> None:
    """The teacher files hold what they held when the grid's first cell was distilled from them (recorded
    then, in teacher_files.json): a recipe names its teachers' files by path, and a file replaced under the
    same name (new weights shipped) would otherwise mix cells of two sets of teachers in one report."""
    path = out / "teacher_files.json"
    now = {name: {"path": p, "sha256": _io.file_sha256(p)} for name, p in _teacher_sources(recipe).items()}
    if path.is_file():
        held = json.loads(path.read_text())
        for name, was in held.items():
            if name in now and now[name]["sha256"] != was.get("sha256"):
                raise UserError(f"compare: {now[name]['path']} (teacher {name}) is not the file this grid's cells were "
                                f"distilled from ({path} holds its earlier sha256): give another --out, or remove "
                                f"{out} to distil again from the new file")
    elif record and now:
        _io.write_json(path, now)


# what a teachers run depends on (a grid whose recipe changed elsewhere reuses its teachers)
TEACHER_KEYS = ("seed", "device", "precision", "channels_last", "data.", "teachers.")


def _value(tree, dotted: str):
    for part in dotted.split("."):
        tree = tree[int(part)] if isinstance(tree, list) else (tree or {}).get(part)
    return tree


GRID_FILE = "grid.json"  # the folders the grid was run in: a copy elsewhere knows the places its cells' paths name


def _grid_places(out: Path) -> list[str]:
    try:
        places = json.loads((out / GRID_FILE).read_text()).get("roots")
    except (OSError, ValueError, AttributeError):
        return []
    return [p for p in places if isinstance(p, str)] if isinstance(places, list) else []


def _grid_move(out: Path) -> Optional[tuple[list[Path], Path]]:
    """(the other folders the grid was run in, OUT) when it was copied or moved since, else None. A grid
    made before the record was kept is taken to be where it was made."""
    earlier = [Path(p) for p in _grid_places(out) if Path(p) != out]
    return (earlier, out) if earlier else None


def _record_place(out: Path) -> None:
    places = _grid_places(out)
    if str(out) not in places:
        _io.write_json(out / GRID_FILE, {"roots": [*places, str(out)]})


def _moved(before, now, move: Optional[tuple[list[Path], Path]]) -> bool:
    """A path into the grid that names the same file of it, at a place the grid was run in and at OUT."""
    if move is None or not (isinstance(before, str) and isinstance(now, str)):
        return False
    try:
        inside = Path(now).relative_to(move[1])
    except ValueError:
        return False
    return any(Path(before) == root / inside for root in move[0])


def _same_recipe(run: RunDir, recipe: Recipe, keys: Optional[tuple[str, ...]] = None,
                 move: Optional[tuple[list[Path], Path]] = None, follow: bool = False) -> None:
    """A folder of the grid holds what ``recipe`` makes (in ``keys``, default all but tracking), or one line.
    In a grid copied or moved (``move``: from, to), a path naming a file of the grid at its old place is
    the same path; with ``follow`` the folder's recipe.yaml is rewritten to the new place (a resumed cell
    then continues there)."""
    stored, now = effective(run.recipe().model_dump(mode="json")), effective(recipe.model_dump(mode="json"))
    diffs = [d for d in all_differences(stored, now)
             if not d.startswith("tracking.") and (keys is None or d.startswith(keys))]
    moved = [d for d in diffs if _moved(_value(stored, d), _value(now, d), move)]
    diffs = [d for d in diffs if d not in moved]
    if diffs:
        raise UserError(f"compare: {run.path} was trained from another recipe ('{diffs[0]}' differs): give another "
                        "--out, or remove that folder to train it again")
    if moved and follow:
        _io.write_text(run.recipe_path, dump_recipe(recipe))


def _students(recipe: Recipe, rows: list[Row], out: Path, say, console) -> dict:
    """The recipe student's config and, where rows need them, the one-branch students (kept in
    students.json: a resumed grid trains the students it chose before)."""
    path = out / "students.json"
    found = read_grid_file(path) or {}
    if recipe.student.latency_ms is not None:
        raise UserError("compare: give the recipe's student by its widths (plan it first with 'ekdc plan "
                        "--out'), not by student.latency_ms")
    base = recipe.student.model_kwargs()
    arch = recipe.student.arch
    n, size = _num_classes(recipe), recipe.data.image_size
    if found.get("recipe") != base:
        found = {"recipe": base, "recipe_macs": student_macs(base, n, size, arch)}
    if any(r.student == "plain" for r in rows) and "plain" not in found:
        cfg, macs, target = equal_macs_student(base, n, size, arch)
        found.update(plain=cfg, plain_macs=macs)
        say(f"compare: the plain student {short_config(cfg)} has {macs:,} MACs against the recipe student's {target:,}")
    if any(r.student == "planned" for r in rows) and "planned" not in found:
        plan_space(arch)  # one line, before any timing, for a family ekdc plan cannot search
        found["recipe_p50_ms"] = recipe_latency_ms(recipe, base, n, say, LATENCY_ROUNDS)
        found["planned"] = planned_student(recipe, found["recipe_p50_ms"], n, console)
    _io.write_json(path, found)
    return found


def _cells(raw: dict, rows: list[Row], seeds: Sequence[int], students: dict, out: Path) -> list[tuple[Row, int, Path, Recipe]]:
    cells = []
    for seed in seeds:  # seed-major: every row gets its first seed before any row gets its second
        for row in rows:
            r = row_recipe(raw, row, students.get(row.student) if row.one_branch else None)
            r["seed"] = int(seed)
            r["name"] = f"{raw['name']}-{row.slug}-s{seed}"
            if r["tracking"]["mlflow"] and not r["tracking"].get("experiment"):  # one experiment a grid
                r["tracking"] = {**r["tracking"], "experiment": raw["name"]}
            if r["distill"]["teacher_cache"]["views"] and not r["distill"]["teacher_cache"].get("path"):
                r["distill"]["teacher_cache"] = {**r["distill"]["teacher_cache"], "path": str(out / "teacher_cache")}
            cell = recipe_from_dict(r, where=f"row {row.name}")
            check_recipe(cell, f"row {row.name}")  # the rule ekdc distill follows
            cells.append((row, int(seed), out / row.slug / f"s{seed}", cell))
    return cells


def _config(cell_recipe: Recipe) -> str:
    """What a cell trains, less its name (which holds the row's label): two rows with the same train the same."""
    return json.dumps({k: v for k, v in effective(cell_recipe.model_dump(mode="json")).items() if k != "name"},
                      sort_keys=True)


def _distinct(cells: list[tuple[Row, int, Path, Recipe]], by_kind: bool) -> None:
    """No two rows train the same configuration (``by_kind``: one-branch rows told apart by their kind, for
    stand-in students that are not chosen yet)."""
    seen: dict[tuple, str] = {}
    for row, _, _, r in cells:
        key = (row.student if by_kind and row.one_branch else "", _config(r))
        if key in seen and seen[key] != row.name:
            raise UserError(f"--rows: '{row.name}' trains the same configuration as '{seen[key]}' on this recipe "
                            "(rows are told apart by what they train, not by their text): list it once")
        seen.setdefault(key, row.name)


def _modifiers(row: Row) -> list[tuple[str, Row]]:
    """Each modifier of a row, and the row without it."""
    out = []
    for flag, text in (("dkd", "dkd"), ("confidence", "conf"), ("feat", "feat")):
        if getattr(row, flag):
            out.append((text, dataclasses.replace(row, **{flag: False})))
    if row.views is not None:
        out.append((f"k{row.views}", dataclasses.replace(row, views=None)))
    return out


def _check_rows(recipe: Recipe, rows: list[Row], seeds: Sequence[int], out: Path) -> None:
    """Before any teacher trains: every row's recipe is valid and holds no setting that changes nothing
    (``ekdc.recipe.inert``, as ekdc distill checks it), no row's modifier changes nothing, and no two rows
    train the same configuration (the one-branch students stand in as one branch of the recipe's own
    layout)."""
    one = {**recipe.student.model_kwargs(), "num_branches": 1}
    raw, students = recipe.model_dump(mode="json"), {"plain": one, "planned": one}
    cells = _cells(raw, rows, seeds[:1], students, out)
    for row, _, _, r in cells:
        for mod, without in _modifiers(row):
            try:
                same = _config(_cells(raw, [without], seeds[:1], students, out)[0][3]) == _config(r)
            except UserError:  # the row without it is no valid row: the modifier does something
                same = False
            if same:
                raise UserError(f"--rows: '{row.name}': +{mod} changes nothing on this recipe (the row trains the "
                                "same without it)")
    _distinct(cells, by_kind=True)


def _check_finished(recipe: Recipe, rows: list[Row], seeds: Sequence[int], out: Path, students: dict, move) -> None:
    """--report-only: every folder of the grid that holds a run was trained from what this recipe makes, as
    a training run of the grid checks it; a grid of another recipe is refused, naming the key."""
    teachers = RunDir(out / "teachers")
    if teachers.recipe_path.is_file():
        _same_recipe(teachers, recipe, TEACHER_KEYS, move=move)
    if students and students.get("recipe") != recipe.student.model_kwargs():
        raise UserError(f"compare: {out / 'students.json'} was chosen for another recipe student: give another "
                        "--out, or run the grid without --report-only")
    raw = _teacher_files(recipe, out)
    for row in rows:
        if row.one_branch and row.student not in students:  # its student was never chosen: no cell trained
            continue
        for _, _, cell, r in _cells(raw, [row], seeds, students, out):
            if RunDir(cell).recipe_path.is_file():
                _same_recipe(RunDir(cell), r, move=move)


def _run_cell(recipe: Recipe, cell: Path, move, console, progress: bool) -> None:
    run = RunDir(cell)
    if run.recipe_path.is_file():
        _same_recipe(run, recipe, move=move, follow=True)
    exported = (cell / "export" / "manifest.json").is_file()
    if cell_figures(cell) is not None:  # trained and exported (its student.pt may be gone): done
        return
    if not run.finished:
        distill(recipe, cell, resume=run.recipe_path.is_file(), console=console, progress=progress)
    if not exported:
        export(cell, cell / "export", teachers=False)


def fold_choice(student_onnx: Path) -> Optional[str]:
    """The fold layout export chose for the file (its manifest beside it)."""
    manifest = student_onnx.parent / "manifest.json"
    return (json.loads(manifest.read_text()).get("fold") or {}).get("choice") if manifest.is_file() else None


def _latencies(rows: list[Row], seeds: Sequence[int], out: Path, say) -> dict:
    """Each row's exported student (its first seed's: speed does not depend on the weights), timed at batch
    1 and 64 in one bench run, rows interleaved. Kept in latency.json for the files it timed."""
    files = {r.slug: out / r.slug / f"s{seeds[0]}" / "export" / "student.onnx" for r in rows}
    files = {k: f for k, f in files.items() if f.is_file()}
    path = out / "latency.json"
    known = read_grid_file(path) or {}
    stamp = {k: f.stat().st_mtime_ns for k, f in files.items()}
    # timed again when a file changed, or when it was timed with fewer rounds or batches than today's
    if files and (known.get("files") != stamp or known.get("rounds") != LATENCY_ROUNDS or "img_s_b64" not in known):
        say(f"compare: timing {len(files)} students at batch {LATENCY_BATCH} and {THROUGHPUT_BATCH} (bench's worker, "
            f"{LATENCY_ROUNDS} rounds interleaved)")
        report = time_models(list(files.values()), batches=[LATENCY_BATCH, THROUGHPUT_BATCH], repeats=LATENCY_ROUNDS)
        timed = dict(zip(files, report["models"]))
        known = {"files": stamp, "rounds": LATENCY_ROUNDS,
                 "p50_ms": {k: m["latency_ms"][str(LATENCY_BATCH)]["p50"] for k, m in timed.items()},
                 "p50_ms_b64": {k: m["latency_ms"][str(THROUGHPUT_BATCH)]["p50"] for k, m in timed.items()},
                 "img_s_b64": {k: m["throughput"][str(THROUGHPUT_BATCH)] for k, m in timed.items()},
                 "rounds_ms": {k: m["round_p50_ms"][str(LATENCY_BATCH)] for k, m in timed.items()},
                 "machine": report["machine"], "threads": report["settings"]["threads"]}
        _io.write_json(path, known)
    fold = {k: fold_choice(f) for k, f in files.items()}  # read from the manifests: no timing needed
    if files and known.get("fold") != fold:
        known["fold"] = fold
        _io.write_json(path, known)
    return known


def compare(recipe: Recipe, rows: Sequence[str] | str = DEFAULT_ROWS, seeds: Sequence[int] = (0, 1, 2),
            out: Optional[str | Path] = None, *, console=None, progress: bool = True,
            report_only: bool = False, on_cell: Optional[Callable[[Path], None]] = None) -> dict:
    """Train every row over the seeds (or, ``report_only``, read what is finished) and return the
    report (``report.build_report``), also written to OUT/compare.json. ``on_cell(folder)`` is called after
    each cell is finished (trained and exported, now or before): a long grid can keep or commit its cells
    as they end."""
    parsed = parse_rows(rows)
    check_recipe(recipe)
    seeds = sorted(parse_seeds(seeds))  # cells and reports go seed-major, in ascending order
    # absolute from here on: a cell's recipe.yaml holds absolute paths (teacher files, the shared cache),
    # and a resumed grid compares its recipes with the ones it makes now, from whatever folder it runs in
    out = (Path(out) if out is not None else Path("runs") / "compare" / recipe.name).resolve()
    _check_rows(recipe, parsed, seeds, out)  # before OUT is made: a refused grid leaves nothing behind
    if report_only and not out.is_dir():  # nothing to report, and no folder made for it
        return build_report(recipe, parsed, seeds, out, {}, {})
    _io.ensure_writable_dir(out)
    if not report_only:
        _record_place(out)
    move = _grid_move(out)  # a grid copied or moved: the places its cells' paths may name
    say = _say(console)
    _same_teacher_files(recipe, out, record=not report_only)
    if report_only:
        students = read_grid_file(out / "students.json") or {}
        _check_finished(recipe, parsed, seeds, out, students, move)
    else:
        # the students first: a grid whose one-branch student cannot be matched fails before hours of teachers
        students = _students(recipe, parsed, out, say, console)
        raw = _teachers(recipe, out, move, console, progress)
        cells = _cells(raw, parsed, seeds, students, out)
        _distinct(cells[: len(parsed)], by_kind=False)  # the one-branch students chosen: still no two the same
        for k, (row, seed, cell, r) in enumerate(cells):
            say(f"compare [{k + 1}/{len(cells)}] {row.name}, seed {seed} -> {cell}")
            _run_cell(r, cell, move, console, progress)
            if on_cell is not None:
                on_cell(cell)
    latency = _latencies(parsed, seeds, out, say) if not report_only else (read_grid_file(out / "latency.json") or {})
    report = build_report(recipe, parsed, seeds, out, students, latency)
    if not report_only or any(row["acc"] for row in report["rows"]):  # an empty report writes no file
        _io.write_json(out / "compare.json", report)
    return report
