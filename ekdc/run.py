"""The run folder: what ``distill`` writes and ``export`` reads.

    runs/<name>/recipe.yaml         the resolved recipe (every default filled in)
    runs/<name>/teachers/<t>.pt     trained (or copied) teacher checkpoints
    runs/<name>/teachers/metrics.json  ``--teachers-only``: the teachers' validation metrics
    runs/<name>/student.pt          the trained student (without training-only adapters)
    runs/<name>/ckpt/<stage>.pt     the in-progress stage's last epoch (deleted when the stage ends)
    runs/<name>/log.jsonl           one JSON line per epoch and per event
    runs/<name>/metrics.json        validation metrics (distillation/evaluation.py)
    runs/<name>/plan.json           student.latency_ms only: the planned student and every candidate timed
    runs/<name>/.lock               held by the one process training into the folder

The checkpoint files' contents belong to ``checkpoint.py``; this module owns the folder: where a run
goes, which run a command means, who may write into it, and its log.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from ._io import FileLock, WriteError, ensure_writable_dir, write_text
from .errors import UserError
from .plugins import missing_hint
from .recipe import dump_recipe, load_recipe


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    recipe_path = property(lambda self: self.path / "recipe.yaml")
    student_path = property(lambda self: self.path / "student.pt")
    metrics_path = property(lambda self: self.path / "metrics.json")
    teacher_metrics_path = property(lambda self: self.path / "teachers" / "metrics.json")
    plan_path = property(lambda self: self.path / "plan.json")
    log_path = property(lambda self: self.path / "log.jsonl")
    ckpt_dir = property(lambda self: self.path / "ckpt")
    lock_path = property(lambda self: self.path / ".lock")

    def teacher_path(self, name: str) -> Path:
        return self.path / "teachers" / f"{name}.pt"

    def stage_ckpt(self, stage: str) -> Path:
        return self.ckpt_dir / f"{stage}.pt"

    @property
    def finished(self) -> bool:
        return self.metrics_path.is_file() and self.student_path.is_file()

    def metrics(self) -> dict:
        return _read_json(self.metrics_path)

    def teacher_metrics(self) -> dict:
        """``teachers/metrics.json``, written by ``ekdc distill --teachers-only``."""
        return _read_json(self.teacher_metrics_path)

    def recipe(self):
        if not self.recipe_path.is_file():
            raise UserError(f"{self.path} is not an ekdc run folder (no recipe.yaml in it)")
        try:
            return load_recipe(self.recipe_path)
        except UserError as err:  # a plugin the run used, not installed here: say which
            raise UserError(f"{err}{missing_hint(self.path)}") from None

    def holds_files(self) -> bool:
        """Whether the folder holds anything but its lock."""
        return self.path.is_dir() and any(p.name != self.lock_path.name for p in self.path.iterdir())

    def append_log(self, record: dict) -> None:
        """Append one JSON line to log.jsonl. A write that fails part-way (full disk) is cut back off, so
        the log never keeps a torn last line."""
        line = (json.dumps(record) + "\n").encode()
        try:
            fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as err:
            raise WriteError(f"cannot write {self.log_path}: {err.strerror or err}") from None
        try:
            size = os.fstat(fd).st_size
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
        except OSError as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise WriteError(f"cannot write {self.log_path}: {err.strerror or err}") from None
        finally:
            os.close(fd)

    def repair_log(self) -> None:
        """Drop a torn last line (a process killed in the middle of a write) before appending again."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return
        if data and not data.endswith(b"\n"):
            with open(self.log_path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


class RunLock(FileLock):
    """The run folder's lock, held by the process that trains into it."""

    def __init__(self, run: RunDir):
        super().__init__(run.lock_path)
        self.run = run

    def acquire(self) -> "RunLock":
        holder = self.try_acquire()
        if holder is not None:
            raise UserError(f"run folder {self.run.path} is in use by process {holder} (an 'ekdc distill' "
                            "training into it); wait for it to end, or choose another --out")
        return self


def _numbered(base: Path) -> list[Path]:
    """``base`` and its numbered siblings ``base-2``, ``base-3`` ... that exist, oldest first."""
    pat = re.compile(re.escape(base.name) + r"(?:-(\d+))?$")
    found = []
    if base.parent.is_dir():
        for p in base.parent.iterdir():
            m = pat.fullmatch(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1) or 1), p))
    return [p for _, p in sorted(found)]


def latest_run_path(runs_root: Path, name: str) -> Path | None:
    found = [p for p in _numbered(runs_root / name) if RunDir(p).holds_files()]
    return found[-1] if found else None


def claim_new_run(runs_root: str | Path, name: str) -> tuple[RunDir, RunLock]:
    """``runs/<name>``, or ``runs/<name>-N`` after the runs already there, created and locked: two
    processes started at once get two folders, and nothing is overwritten."""
    runs_root = Path(runs_root)
    last = latest_run_path(runs_root, name)
    n = 1 if last is None else (int(last.name.rsplit("-", 1)[1]) if last != runs_root / name else 1) + 1
    while True:
        run = RunDir(runs_root / (name if n == 1 else f"{name}-{n}"))
        ensure_writable_dir(run.path)
        lock = RunLock(run)
        if lock.try_acquire() is None:
            if not run.holds_files():
                return run, lock
            lock.release()
        n += 1


def open_training_run(recipe, out: str | Path | None, resume: bool, runs_root: str | Path) -> tuple[RunDir, RunLock]:
    """The run folder ``ekdc distill`` trains into, locked for this process: a new one, the given
    ``--out``, or (``--resume``) the run to continue, whose recipe must be this one."""
    runs_root = Path(runs_root)
    if not resume and not out:
        return claim_new_run(runs_root, recipe.name)
    if resume:
        path = Path(out) if out else latest_run_path(runs_root, recipe.name)
        if path is None or not (path / "recipe.yaml").is_file():
            where = path if path else runs_root / recipe.name
            raise UserError(f"--resume: no run to resume at {where} (no recipe.yaml there)")
    else:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise UserError(f"--out {path} is a file, not a folder")
        if RunDir(path).holds_files():
            raise UserError(f"--out {path} already holds files; pass --resume to continue that run, or choose another folder")
    run = RunDir(path)
    ensure_writable_dir(run.path)
    lock = RunLock(run).acquire()
    try:
        if resume:
            _check_resumed_recipe(run, recipe)
        elif run.holds_files():  # another process wrote here between the check above and the lock
            raise UserError(f"--out {path} already holds files; pass --resume to continue that run, or choose another folder")
    except BaseException:
        lock.release()
        raise
    return run, lock


# what only the student stage reads: a run whose student has not started may resume with these changed
# (a new student.latency_ms after a budget nothing met, say), its teachers kept
STUDENT_STAGE_KEYS = ("student.", "distill.", "mode")


def _check_resumed_recipe(run: RunDir, recipe) -> None:
    from .recipe.inert import (
        effective,  # settings that change nothing (ekdc.recipe.inert) make no difference
    )

    saved, given = run.recipe().model_dump(mode="json"), recipe.model_dump(mode="json")
    # watching changes no result; nor does which runtime runs the frozen teachers (checked to agree)
    diffs = [d for d in all_differences(effective(saved), effective(given))
             if not d.startswith(("tracking.", "distill.teacher_runtime"))]
    if not diffs and saved != given:
        write_text(run.recipe_path, dump_recipe(recipe))
    if not diffs:
        return
    started = run.student_path.exists() or any(run.ckpt_dir.glob("student-*.pt"))
    if started or not all(d.startswith(STUDENT_STAGE_KEYS) for d in diffs):
        raise UserError(f"--resume: the recipe differs from {run.recipe_path} at '{diffs[0]}'; resume with the same "
                        "recipe" + ("" if started else " (before the student stage starts, only student:, distill: "
                                                       "and mode may change)"))
    # the student has not started: it will be built from the new keys; a plan for another student no longer holds
    write_text(run.recipe_path, dump_recipe(recipe))
    if any(d.startswith("student.") for d in diffs):
        run.plan_path.unlink(missing_ok=True)
        (run.path / "plan.png").unlink(missing_ok=True)


def all_differences(a, b, prefix: str = "") -> list[str]:
    """The dotted key paths where two plain-data trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in list(a) + [k for k in b if k not in a] for d in all_differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in all_differences(x, y, f"{prefix}{i}.")]
    return [prefix.rstrip(".")] if a != b else []


def open_finished_run(run_dir: str | Path | None, runs_root: str | Path = "runs") -> RunDir:
    """The run ``ekdc export`` reads: the one named, or the newest with a trained student. Reading takes
    no lock: a finished student is never rewritten."""
    if run_dir is None:
        return find_latest_run(runs_root)
    run = RunDir(run_dir)
    if run.path.is_file():
        raise UserError(f"{run.path} is a file; ekdc export reads a run folder (what ekdc distill wrote)")
    if not run.path.is_dir():
        raise UserError(f"run folder not found: {run.path}")
    if not run.recipe_path.is_file():
        raise UserError(f"{run.path} is not an ekdc run folder (no recipe.yaml in it)")
    if not run.student_path.is_file():
        raise UserError(f"run {run.path} has no trained student (student.pt missing); finish it with 'ekdc distill RECIPE --resume'")
    return run


def find_latest_run(runs_root: str | Path = "runs") -> RunDir:
    """The most recently modified run folder with a trained student under ``runs_root``."""
    root = Path(runs_root)
    if not root.is_dir():
        raise UserError(f"no run found: {root}/ does not exist (run 'ekdc distill RECIPE' first, or pass RUN_DIR)")
    runs = [p.parent for p in root.glob("*/student.pt")]
    if not runs:
        raise UserError(f"no run with a trained student under {root}/ (run 'ekdc distill RECIPE' first, or pass RUN_DIR)")
    return RunDir(max(runs, key=lambda p: (p / "student.pt").stat().st_mtime))
