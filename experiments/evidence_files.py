"""docs/evidence/evidence.json: the one writer of the file, for both drivers that put rows in it.

experiments/headline.py owns the full-data rows and the ``teachers`` entry (it makes teachers.onnx);
experiments/evidence_study.py owns the limited-data rows. Each replaces its own rows and leaves the other's.
A row says which ensemble it was distilled from: ``"teachers"`` when the teacher files its grid recorded
(``ekdc compare``'s teacher_files.json: each file's sha256) are the ``teachers`` entry's, else
``"unrecorded_teachers"``; rows kept from an earlier ensemble name the key it is kept under
(``earlier_teachers``, ...).
"""
from __future__ import annotations

import hashlib
import json
import os
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

# what each key of evidence.json means (written into the file: a client elsewhere reads it there)
FIELDS = {
    "files[].row": "the ekdc compare row; with per_class null a full-data row ('3-branch ...' rows come from the "
                   "3-branch grid, whose planned:avg_kd row is the one-branch student ekdc plan picked at the "
                   "3-branch student's latency: num_branches says each file's branches)",
    "files[].onnx": "the exported fp32 student, beside this file",
    "files[].per_class": "training images a class (limited data), null for all train_images",
    "files[].train_images": "training images the student saw (train_images of the split outside validation)",
    "files[].val_acc": "the ONNX file's own top-1 accuracy on the validation split (split below)",
    "files[].macs": "the trained student's multiply-accumulates per image (PyTorch, before folding)",
    "files[].onnx_macs": "what the file computes per image, counted in its graph: a padded fold computes its "
                         "zero channels too, so it may exceed macs",
    "files[].onnx_params": "the weights and biases of the file's compute nodes (convolutions, matrix products), "
                           "counted as ekdc bench counts them (a padded fold stores its zero channels); small "
                           "constants such as the normalisation's mean and 1/std are not counted",
    "files[].latency_ms": "batch-1 p50 on ONNX Runtime CPU, from the driver's bench rounds (machine in the docs page)",
    "files[].latency_ms_b64": "p50 of a batch of 64, the same way; img_s_b64: images/s at batch 64",
    "files[].latency_rounds_ms": "each bench round's batch-1 p50 (null where the file was timed in one bench run)",
    "files[].fold": "how the file's branches are folded (export's choice: grouped, padded, separate)",
    "files[].mode, kd_loss, student, params": "how the student was trained (ekdc compare's row), its layout and "
                                              "its PyTorch parameters",
    "files[].teachers": "which ensemble it was distilled from: the key of that entry",
    "teachers": "the ensemble: val_acc (of its teachers.onnx, fp16 weights, float32 I/O; val_acc_fp32_weights: "
                "the same graph with fp32 weights), macs, train_images, onnx (with onnx_macs, onnx_params, "
                "onnx_bytes as for files[]), files (each teacher file's sha256)",
    "split": "the validation split every accuracy is on: val_per_class images of each class drawn with "
             "split_seed from the CIFAR-10 training JPEGs, the rest for training; val_files names its list "
             "beside this file (sha256sum's format: '<sha256>  <class>/<file>' under the data folder, "
             "checked with 'sha256sum -c' there; the label is the class's index in the ONNX files' "
             "ekdc.classes), val_files_sha256 the list's own digest. The draw, for another reader: "
             "numpy.random.default_rng(split_seed); the files sorted by path; for each class in label order, "
             "a permutation of its files, the first val_per_class of which are validation",
}


def file_row(entry: dict, grid: Path, onnx: str, *, per_class: Optional[int], train_images: int, **measured) -> dict:
    """evidence.json's row for one exported student: what ``ekdc compare``'s report ``entry`` says of its row
    (mode, KD loss, student, size, the grid's latency rounds), seed 0's accuracy, and ``measured`` (figures a
    driver measured on the very file it ships, which take precedence: the headline benches its deploy export).
    Both drivers build their rows here, so that every row has the same keys."""
    row = {"row": entry["row"], "onnx": onnx, "mode": entry["mode"], "kd_loss": entry["kd_loss"],
           "student": entry["student"], "num_branches": entry["num_branches"], "per_class": per_class,
           "train_images": train_images, "seed": 0, "macs": entry["macs"], "params": entry["params"],
           "val_acc": entry["acc"].get("0"), "latency_ms": entry.get("latency_ms"),
           "latency_rounds_ms": entry.get("latency_rounds_ms"), "latency_ms_b64": entry.get("latency_ms_b64"),
           "img_s_b64": entry.get("img_s_b64"), "fold": entry.get("fold"), "teacher_files": teacher_files(grid)}
    return {**row, **measured}


VAL_FILES = "val-files.sha256"


def split_of(data, folder: Path) -> dict:
    """The validation split a recipe's ``data:`` draws (what every accuracy of the page is on), its files
    listed in ``folder``/val-files.sha256: a client elsewhere scores the shipped files on exactly them."""
    from ekdc._io import write_text

    carve = {"val_per_class": data.val_per_class} if data.val_per_class else {"val_fraction": data.val_fraction}
    listing = val_listing(data)
    write_text(folder / VAL_FILES, listing)
    return {**carve, "split_seed": data.split_seed,
            "data": "/".join(Path(data.root).parts[-2:]) if data.root else data.dataset,
            "val_files": VAL_FILES, "val_files_sha256": hashlib.sha256(listing.encode()).hexdigest()}


def val_listing(data) -> str:
    """The validation split's files in ``sha256sum``'s format, paths relative to the data folder, in split
    order (the order ekdc scores them in)."""
    from ekdc._io import file_sha256
    from ekdc.data.splits import index_splits

    part = index_splits(data).val
    root = os.path.abspath(data.root)
    files = (part.source.files[i] for i in part.positions)
    return "".join(f"{file_sha256(f)}  {Path(os.path.relpath(os.path.abspath(f), root)).as_posix()}\n" for f in files)


def _file_figures(folder: Path, entry: dict) -> None:
    """The file's own MACs, parameters and bytes, counted in its graph as ekdc bench counts them."""
    import onnx

    from ekdc.onnx_graph.cost import count_params_macs

    path = folder / entry["onnx"]
    for key in ("onnx_macs", "onnx_params", "onnx_bytes"):  # never a figure of a file no longer there
        entry.pop(key, None)
    if path.is_file():
        params, macs, _ = count_params_macs(onnx.load(str(path)))
        entry.update(onnx_macs=int(macs), onnx_params=int(params), onnx_bytes=path.stat().st_size)


def _kind(row: dict) -> str:
    return LIMITED if row.get("per_class") is not None else FULL


def update_evidence(folder: Path, kind: str, rows: list[dict], teachers: Optional[dict] = None,
                    split: Optional[dict] = None) -> dict:
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
    return write_evidence(folder, data, split)


def write_evidence(folder: Path, data: dict, split: Optional[dict] = None) -> dict:
    """evidence.json with each file's own figures, the split and what each key means."""
    # the rows' files and the current ensemble's teachers.onnx (an earlier ensemble's file is not shipped)
    for entry in [*data["files"], *([data["teachers"]] if isinstance(data.get("teachers"), dict) else [])]:
        if entry.get("onnx"):
            _file_figures(folder, entry)
    if split is not None:
        data["split"] = split
    data["fields"] = FIELDS
    path = folder / "evidence.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return data


if __name__ == "__main__":  # refresh the files' own figures and the key descriptions in place
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    docs = Path(__file__).resolve().parents[1] / "docs" / "evidence"
    from ekdc import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "cifar10-strong.yaml")
    write_evidence(docs, json.loads((docs / "evidence.json").read_text()), split_of(recipe.data, docs))
    print(f"wrote {docs / 'evidence.json'}")
