"""The run folder: what ``distill`` writes and ``export`` reads.

    runs/<name>/recipe.yaml         the resolved recipe (every default filled in)
    runs/<name>/teachers/<t>.pt     trained (or copied) teacher checkpoints
    runs/<name>/student.pt          the trained student (without training-only adapters)
    runs/<name>/ckpt/<stage>.pt     the in-progress stage's last epoch (deleted when the stage ends)
    runs/<name>/log.jsonl           one JSON line per epoch and per event
    runs/<name>/metrics.json        validation metrics (see DESIGN.md)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import UserError


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    recipe_path = property(lambda self: self.path / "recipe.yaml")
    student_path = property(lambda self: self.path / "student.pt")
    metrics_path = property(lambda self: self.path / "metrics.json")
    log_path = property(lambda self: self.path / "log.jsonl")
    ckpt_dir = property(lambda self: self.path / "ckpt")

    def teacher_path(self, name: str) -> Path:
        return self.path / "teachers" / f"{name}.pt"

    def stage_ckpt(self, stage: str) -> Path:
        return self.ckpt_dir / f"{stage}.pt"

    @property
    def finished(self) -> bool:
        return self.metrics_path.is_file() and self.student_path.is_file()

    def metrics(self) -> dict:
        try:
            return json.loads(self.metrics_path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {self.metrics_path}: {err}") from None

    def recipe(self):
        from .recipe import load_recipe

        if not self.recipe_path.is_file():
            raise UserError(f"{self.path} is not an ekdc run folder (no recipe.yaml in it)")
        return load_recipe(self.recipe_path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"


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


def new_run_path(runs_root: Path, name: str) -> Path:
    """``runs/<name>``, or ``runs/<name>-N`` when earlier runs are there: nothing is overwritten."""
    base = runs_root / name
    existing = [p for p in _numbered(base) if any(p.iterdir())]
    if not existing:
        return base
    last = existing[-1]
    n = int(last.name.rsplit("-", 1)[1]) if last != base else 1
    return runs_root / f"{name}-{n + 1}"


def latest_run_path(runs_root: Path, name: str) -> Path | None:
    found = [p for p in _numbered(runs_root / name) if any(p.iterdir())]
    return found[-1] if found else None


def find_latest_run(runs_root: str | Path = "runs") -> RunDir:
    """The most recently modified run folder with a trained student under ``runs_root``."""
    root = Path(runs_root)
    if not root.is_dir():
        raise UserError(f"no run found: {root}/ does not exist (run 'ekdc distill RECIPE' first, or pass RUN_DIR)")
    runs = [p.parent for p in root.glob("*/student.pt")]
    if not runs:
        raise UserError(f"no run with a trained student under {root}/ (run 'ekdc distill RECIPE' first, or pass RUN_DIR)")
    return RunDir(max(runs, key=lambda p: (p / "student.pt").stat().st_mtime))
