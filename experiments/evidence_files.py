"""docs/evidence/evidence.json: the one writer of the file, for both drivers that put rows in it.

experiments/headline.py owns the full-data rows and the ``teachers`` entry (it makes teachers.onnx);
experiments/evidence_study.py owns the limited-data rows. Each replaces its own rows and leaves the other's.
A row says which ensemble it was distilled from: ``"teachers"`` when the teacher files its grid recorded
(``ekdc compare``'s teacher_files.json: each file's sha256) are the ``teachers`` entry's, else
``"unrecorded_teachers"``; rows kept from an earlier ensemble name the key it is kept under
(``earlier_teachers``, ...).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional


def shipped_teachers(recipe) -> tuple[Path, dict]:
    """The folder the recipe's teachers are loaded from (``weights:``) and its teachers.json, the record
    experiments/ship_teachers.py wrote of them (accuracy, MACs, training time)."""
    folders = {Path(t.weights).parent for t in recipe.teachers if t.weights}
    if len(folders) != 1 or len(recipe.teachers) != sum(1 for t in recipe.teachers if t.weights):
        raise SystemExit(f"{recipe.name}: the drivers distil from shipped teachers, every one with weights: in one "
                         f"folder; this recipe's come from {sorted(map(str, folders)) or 'no weight files'}")
    folder = folders.pop()
    path = folder / "teachers.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: ship the teachers with experiments/ship_teachers.py first")
    record = json.loads(path.read_text())
    # the record must be of exactly these teachers: a folder shipped into one teacher at a time may hold more
    files, named = sorted(t["file"] for t in record["teachers"]), sorted(Path(t.weights).name for t in recipe.teachers)
    if files != named:
        raise SystemExit(f"{path} records the teachers {files}, the recipe {recipe.name} distils from {named}: "
                         "name the same teachers, or ship into a folder of their own")
    return folder, record


def teacher_files(grid: Path) -> Optional[dict]:
    """{teacher name: sha256} of the files a grid's cells were distilled from (None: not recorded)."""
    path = grid / "teacher_files.json"
    return {k: v["sha256"] for k, v in json.loads(path.read_text()).items()} if path.is_file() else None


def cpu_hours(metrics: Iterable[Path], teachers: dict) -> float:
    """Hours of training behind a page, on the machine that ran it: the shipped teachers' (``teachers``:
    their teachers.json), every cell's (its metrics.json), and each teacher-output cache's build once,
    however many cells read it."""
    secs = sum(t["train_seconds"] for t in teachers["teachers"])
    builds = {}
    for path in metrics:
        m = json.loads(Path(path).read_text())
        secs += float(m.get("seconds", 0))
        cache = m.get("teacher_cache") or {}
        builds[cache.get("path")] = float(cache.get("build_seconds") or 0)
    return (secs + sum(builds.values())) / 3600


FULL, LIMITED = "full", "limited"


def _kind(row: dict) -> str:
    return LIMITED if row.get("per_class") is not None else FULL


def update_evidence(folder: Path, kind: str, rows: list[dict], teachers: Optional[dict] = None) -> dict:
    """Replace the ``kind`` rows of ``folder``/evidence.json by ``rows`` (each with ``teacher_files``, its
    grid's, which tags it and is then dropped); ``teachers`` (with its own ``files``) replaces the ensemble's
    entry. An ensemble that rows kept here still name moves to a key of its own (``earlier_teachers``, then
    ``earlier_teachers_2``, ...); one that no row names any more is dropped."""
    path = folder / "evidence.json"
    data = json.loads(path.read_text()) if path.is_file() else {"files": []}
    kept = [f for f in data["files"] if _kind(f) != kind]
    earlier = data.get("teachers")
    if teachers is not None and earlier and earlier.get("files") != teachers.get("files"):
        if any(f.get("teachers") == "teachers" for f in kept):
            key = next(k for k in ("earlier_teachers", *(f"earlier_teachers_{i}" for i in range(2, 100)))
                       if k not in data)
            data[key] = earlier
            for f in kept:
                if f.get("teachers") == "teachers":
                    f["teachers"] = key
    if teachers is not None:
        data["teachers"] = teachers
    current = (data.get("teachers") or {}).get("files")
    new = []
    for row in rows:
        row = dict(row)
        files = row.pop("teacher_files", None)
        row["teachers"] = "teachers" if files and files == current else "unrecorded_teachers"
        new.append(row)
    data["files"] = kept + new
    named = {f.get("teachers") for f in data["files"]}
    for key in [k for k in data if k.startswith("earlier_teachers") and k not in named]:
        del data[key]
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data
