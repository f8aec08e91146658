"""docs/evidence/evidence.json: the one writer of the file, for both drivers that put rows in it.

experiments/headline.py owns the full-data rows and the ``teachers`` entry (it makes teachers.onnx);
experiments/evidence_study.py owns the limited-data rows. Each replaces its own rows and leaves the other's.
A row says which ensemble it was distilled from: ``"teachers"`` when the teacher files its grid recorded
(``ekdc compare``'s teacher_files.json: each file's sha256) are the ``teachers`` entry's, else
``"earlier_teachers"`` (the ensemble kept on record under that key).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def teacher_files(grid: Path) -> Optional[dict]:
    """{teacher name: sha256} of the files a grid's cells were distilled from (None: not recorded)."""
    path = grid / "teacher_files.json"
    return {k: v["sha256"] for k, v in json.loads(path.read_text()).items()} if path.is_file() else None

FULL, LIMITED = "full", "limited"


def _kind(row: dict) -> str:
    return LIMITED if row.get("per_class") is not None else FULL


def update_evidence(folder: Path, kind: str, rows: list[dict], teachers: Optional[dict] = None) -> dict:
    """Replace the ``kind`` rows of ``folder``/evidence.json by ``rows`` (each with ``teacher_files``, its
    grid's, which tags it and is then dropped); ``teachers`` (with its own ``files``) replaces the ensemble's
    entry."""
    path = folder / "evidence.json"
    data = json.loads(path.read_text()) if path.is_file() else {"files": []}
    if teachers is not None:
        earlier = data.get("teachers")
        if earlier and earlier.get("files") != teachers["files"]:
            data["earlier_teachers"] = earlier  # rows kept from before were distilled from it: keep it on record
            for f in data["files"]:
                if f.get("teachers") == "teachers":
                    f["teachers"] = "earlier_teachers"
        data["teachers"] = teachers
    kept = [f for f in data["files"] if _kind(f) != kind]
    current = (data.get("teachers") or {}).get("files")
    new = []
    for row in rows:
        row = dict(row)
        files = row.pop("teacher_files", None)
        row["teachers"] = "teachers" if files and files == current else "earlier_teachers"
        new.append(row)
    data["files"] = kept + new
    if not any(f.get("teachers") == "earlier_teachers" for f in data["files"]):
        data.pop("earlier_teachers", None)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return data
