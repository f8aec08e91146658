"""``ekdc export``: a run folder in, deployable files out.

    student.*           one file per format of ``ekdc.formats.export_formats()`` (student.onnx always)
    teachers.onnx       the teacher ensemble as one graph (the reference bench compares against)
    manifest.json       files, sizes, parity figures, fold choice with its timings

Export is explicit steps (``steps.py``: one ``step(ctx, source) -> Built`` per format, the teacher
ensemble a step of its own); this module checks the request, loads the run, runs the steps in order, each
given what the format it builds from made, and publishes the files only once every one is made and checked.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import tempfile
from pathlib import Path
from typing import Optional

from .. import _io, checkpoint
from ..data import eval_preprocess, index_splits
from ..data.fingerprint import check_held_out
from ..data.loading import streams
from ..data.splits import SplitImages
from ..errors import UserError
from ..formats import export_formats, get_format, with_prerequisites
from ..run import RunDir, open_finished_run
from ..teachers import DataInfo
from ..tracking import log_export
from .fold import LAYOUTS
from .qad import QADSettings, modelopt_quantization
from .steps import EXPORTERS, Built, ExportContext, export_teachers
from .tensorrt import check_tensorrt_available

FOLD_MODES = ("auto", *LAYOUTS)


# --------------------------------------------------------------------------------------------------
# the command


# what a format's ``needs`` names, and the check that it is there (one line naming the flag, else)
REQUIREMENTS = {"tensorrt": check_tensorrt_available}


def _requested(formats: dict[str, bool]) -> list[str]:
    """The formats to write: those asked for (``fp16=True``...), what they are built from, and fp32."""
    known = [f.name for f in export_formats() if f.name != "fp32"]
    unknown = [k for k in formats if k not in known]
    if unknown:
        raise UserError(f"unknown export format '{unknown[0]}' (formats: {', '.join(known)})")
    return with_prerequisites([k for k, on in formats.items() if on])


def _check_args(fold_mode: str, calib_images: int, parity_images: int, names: list[str]) -> None:
    if fold_mode not in FOLD_MODES:
        raise UserError(f"--fold {fold_mode!r}: choose one of {', '.join(FOLD_MODES)}")
    if calib_images < 1:
        raise UserError("--calib must be >= 1")
    if parity_images < 0:
        raise UserError("--parity-images must be >= 0 (0: every validation image)")
    for name in names:
        fmt = get_format(name)
        for need in fmt.needs:
            REQUIREMENTS[need](fmt.flag)


def _check_qad(qad: Optional[QADSettings], names: list[str]) -> None:
    if qad is None:
        return
    if "int8" not in names:
        raise UserError("--qad makes the int8 file: add --int8")
    qad.check()
    modelopt_quantization()  # installed, or one line naming the extra, before anything is exported


def _load_teachers(run: RunDir, recipe, ck: dict, hint: str) -> list:
    info = DataInfo(list(ck["classes"]), int(ck["input_size"]), list(ck["mean"]), list(ck["std"]))
    try:
        return [checkpoint.teacher_for_run(t, i, info, run).eval() for i, t in enumerate(recipe.teachers)]
    except UserError as err:
        raise UserError(f"{err} ({hint})") from None


def _images(recipe, classes: list[str], parity_images: int, calib_images: int, run_path: Optional[Path] = None,
            say=None):
    """Only the images export uses are decoded: the validation images (or a seeded subset) and a seeded
    sample of training images for int8 calibration. Data the run streamed (``data.loader``) is streamed
    here too: the validation images are decoded a batch at a time, each time a model is run on them,
    never held whole (nor kept a second time in the decode memo)."""
    index = index_splits(recipe.data)
    if list(index.classes) != classes:
        raise UserError(f"the data of the run's recipe has classes {index.classes[:5]}..., the student {classes[:5]}...")
    note = check_held_out(run_path, index) if run_path is not None else None  # the split the run held out
    if note and say is not None:
        say(note)
    n_val = index.size("val")
    pick = index.sample("val", parity_images, 0) if 0 < parity_images < n_val else None
    if streams(recipe.data, index):
        val_x = SplitImages(index, "val", pick)
        val_y = val_x.labels()
    else:
        val_x, val_y = index.take("val", pick)
        val_y = val_y.numpy()
    calib_x, _ = index.take("train", index.sample("train", calib_images, 1))
    return val_x, val_y, calib_x


@_io.leaves_no_new_empty_folder("out")
def export(run_dir: str | Path | None = None, out: str | Path = "export", *, fold_mode: str = "auto",
           calib_images: int = 256, parity_images: int = 0, runs_root: str | Path = "runs", console=None,
           teachers: bool = True, qad: Optional[QADSettings] = None, **formats: bool) -> dict:
    """Export a run's student (folded) in fp32 and in each format asked for (``fp16=True``, ``int8=True``,
    ``trt=True``: ``ekdc.formats.export_formats()``) and, with ``teachers``, its teacher ensemble; returns
    the manifest (also written). ``teachers=False`` exports a student whose teachers are not here.
    ``qad`` makes the int8 file by quantization-aware distillation (``ekdc.deploy.qad``)."""
    say = console.print if console is not None else (lambda *a, **k: None)
    names = _requested(formats)
    _check_args(fold_mode, calib_images, parity_images, names)
    _check_qad(qad, names)
    run = open_finished_run(run_dir, runs_root)
    out = _io.ensure_writable_dir(out)
    recipe = run.recipe()
    student, ck = checkpoint.load_student(run.student_path)
    classes = list(ck["classes"])
    if teachers:
        teacher_models = _load_teachers(run, recipe, ck, "teachers.onnx needs the teachers; --no-teachers exports "
                                                         "the student alone")
    elif qad is not None and qad.teachers:
        teacher_models = _load_teachers(run, recipe, ck, "QAD fine-tunes against the teachers; --qad-labels "
                                                         "fine-tunes on the labels alone")
    else:
        teacher_models = []
    say(f"[bold]ekdc export[/bold] {run.path} -> {out}")
    val_x, val_y, calib_x = _images(recipe, classes, parity_images, calib_images, run.path, say)
    with tempfile.TemporaryDirectory(dir=out, prefix=".ekdc-export-") as tmpdir, _io.writes_into(out):
        job = ExportContext(run, recipe.name, student, classes, int(ck["input_size"]), ck["mean"], ck["std"], out,
                            Path(tmpdir), val_x, val_y, calib_x, say, eval_preprocess(recipe.data), fold_mode,
                            recipe=recipe, teachers=teacher_models, qad=qad)
        built = run_steps(job, names, teachers)
        files = [b.entry for b in built.values()]
        fold_info = {**built["fp32"].fold, **(built["int8"].fold if "int8" in built else {})}
        manifest = {
            "out": str(out), "run_dir": str(run.path.resolve()), "recipe": recipe.name, "classes": classes,
            "input_size": job.size, "mean": job.mean, "std": job.std, "fold": fold_info,
            "parity_images": int(len(val_x)), "calibration_images": int(len(calib_x)), "files": files,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        _publish(job, manifest)
    log_export(run.path, [out / f["file"] for f in files] + [out / "manifest.json"], say)
    return manifest


def run_steps(job: ExportContext, names: list[str], teachers: bool) -> dict[str, Built]:
    """Each format's step, in table order, given what the format it builds from made; the teacher ensemble
    right after the fp32 student it is the reference of. Keyed by format (and "teachers")."""
    built: dict[str, Built] = {}
    for name in names:
        fmt = get_format(name)
        b = EXPORTERS[name](job, built[fmt.builds_from] if fmt.builds_from else None)
        built[name] = dataclasses.replace(b, entry={**b.entry, "format": name, "checked": fmt.checked})
        for i, extra in enumerate(b.also):
            built[f"{name}.{i}"] = extra
        if name == "fp32" and teachers:
            built["teachers"] = export_teachers(job)
    return built


def _publish(job: ExportContext, manifest: dict) -> None:
    """Move the finished, checked files into the output folder, then the manifest; remove the files an
    earlier export into the same folder wrote that this one did not (its manifest names them), so the
    folder never mixes two runs. An export that fails before this point changes nothing there."""
    previous = set()
    try:
        previous = {f["file"] for f in json.loads((job.out / "manifest.json").read_text())["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    names = [f["file"] for f in manifest["files"]]
    for name in names:
        _io.replace_into(job.staged(name), job.out / name)
    _io.write_json(job.out / "manifest.json", manifest)
    # ekdc's own outputs only: what the earlier manifest lists. A teachers.onnx no manifest names was put
    # there by the user (the usual way to give a --no-teachers student its bench reference): it stays.
    stale = {f for f in previous - set(names) if "/" not in f and (f.startswith("student") or f == "teachers.onnx")}
    if "teachers.onnx" not in names and "teachers.onnx" not in previous and (job.out / "teachers.onnx").exists():
        job.say(f"kept {job.out / 'teachers.onnx'}: no earlier ekdc export wrote it; ekdc bench takes it as "
                "this student's reference")
    for name in stale:
        (job.out / name).unlink(missing_ok=True)
