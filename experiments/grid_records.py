"""Keep a compare grid's finished cells in git, so that a grid longer than one work session goes on in the next.

Here a session's run folders (runs/, ignored by git) do not outlive it, and a grid of 3 seeds takes several
sessions of 2 CPU cores. So a driver keeps each cell's record as the cell ends (``keep_cell``, called by
``ekdc compare``'s ``on_cell``) under experiments/records/<grid>/, commits it (``commit``), and puts the records
back into the grid folder before it runs (``restore``). ``ekdc compare`` takes a cell with its metrics.json and
export/manifest.json as finished, so a restored cell is reported, never trained again.

A record is the cell's small files (recipe.yaml, metrics.json, log.jsonl, export/manifest.json), the grid's own
(students.json, teacher_files.json, latency.json) and, for seed 0, the exported student.onnx that compare
times and the drivers copy into docs/evidence/ (git stores the same bytes once). Weights and checkpoints are not
kept. The teacher-output cache is kept where a driver asks (``keep_cache``): the full-data headline's took 2,416 s
of 2 cores to build and is 26 MB, so a session that restores it (a partial build too: the cache resumes by chunk)
saves that time. A cell's recipe.yaml holds absolute paths (teacher files, the cache), which compare
checks on resume: records go on in a checkout at the same path.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "experiments" / "records"
CELL_FILES = ("recipe.yaml", "metrics.json", "log.jsonl", "export/manifest.json")
GRID_FILES = ("students.json", "teacher_files.json", "latency.json")
TIMED = "export/student.onnx"  # seed 0's: the file compare times for its row


def keep_cell(grid: Path, cell: Path, store: Path, extra: tuple[str, ...] = (), timed: str = "s0") -> list[Path]:
    """Copy a finished cell's record (and the grid's files) from ``grid`` into ``store``, at the same relative
    paths; ``extra``: more of the cell's files to keep (the headline's student.pt); ``timed``: the seed folder
    whose ONNX file compare times (the grid's first seed). Returns the files written."""
    names = [*CELL_FILES, *((TIMED,) if cell.name == timed else ()), *extra]
    return _copy([(cell / n, store / cell.relative_to(grid) / n) for n in names]) + keep_grid(grid, store)


def keep_grid(grid: Path, store: Path) -> list[Path]:
    """Copy the grid's own files (students chosen, teacher files' sha256, latencies) into ``store``."""
    return _copy([(grid / n, store / n) for n in GRID_FILES])


CACHE = "teacher_cache"  # where ekdc compare builds a grid's teacher-output caches


def keep_cache(grid: Path, store: Path) -> list[Path]:
    """Copy the grid's teacher-output caches (each key's folder, whole or partly built) into ``store``; restore
    puts them back and the build resumes where it stopped. Safe while a build runs: complete.json is copied
    first and each ``done`` map before the outputs, and the builder sets a chunk's done byte only once its outputs
    are on disk, so a copy never holds a chunk marked done without its outputs (the lock is not copied)."""
    root = grid / CACHE
    order = {"complete.json": 0, "done": 1}
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.name != ".lock"),
                   key=lambda p: (order.get(p.name, 2), str(p))) if root.is_dir() else []
    return _copy([(p, store / p.relative_to(grid)) for p in files])


def _copy(pairs: list[tuple[Path, Path]]) -> list[Path]:
    written = []
    for src, dst in pairs:
        if src.is_file() and (not dst.is_file() or dst.read_bytes() != src.read_bytes()):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            written.append(dst)
    return written


def restore(store: Path, grid: Path) -> int:
    """Put ``store``'s records into ``grid`` where the grid lacks them (a file the grid has is newer or the
    same: it is left alone). Returns the number of cells restored."""
    if not store.is_dir():
        return 0
    cells = 0
    for src in sorted(p for p in store.rglob("*") if p.is_file()):
        dst = grid / src.relative_to(store)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            cells += src.name == "metrics.json"
    return cells


def commit(store: Path, message: str, repo: Path = ROOT) -> bool:
    """Commit everything under ``store`` that git does not hold yet (only that: whatever else is staged or
    changed stays as it is), so that a commit that failed once (a lock held, say) is made by the next. False
    where there is nothing new or no git repository, the reason printed, never an error: the grid goes on."""
    git = ["git", "-C", str(repo)]
    try:
        pending = subprocess.run([*git, "status", "--porcelain", "--", str(store)], check=True, capture_output=True,
                                 text=True).stdout.strip()
        if not pending:
            return False
        subprocess.run([*git, "add", "--", str(store)], check=True, capture_output=True, text=True)
        done = subprocess.run([*git, "commit", "-q", "-m", message, "--", str(store)], capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"grid_records: not committed ({e})")
        return False
    if done.returncode != 0:
        print(f"grid_records: not committed ({(done.stdout + done.stderr).strip().splitlines()[-1:]})")
        return False
    return True
