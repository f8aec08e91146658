"""``ekdc export``: a run folder in, deployable files out.

    student.*           one file per format of ``ekdc.formats.export_formats()`` (student.onnx always)
    teachers.onnx       the teacher ensemble as one graph (the reference bench compares against)
    manifest.json       files, sizes, parity figures, fold choice with its timings

Export is explicit steps: one ``export_*`` function per format (``@exporter(name)``), called as
``step(ctx, source)`` with the read-only ``ExportContext`` and the ``Built`` result of the format it builds
from (``ekdc.formats``' ``builds_from``: fp16 and int8 from the fp32 fold, the TensorRT plan from the fp16
file), returning its own ``Built``: the file, its manifest entry (through ``_checked``, which opens the
written file, runs it on the validation images and compares it with what it must equal), its logits.
The teacher ensemble is a step of its own. No step changes what another reads.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
import torch

from .. import _io, checkpoint
from ..contract import (
    META_FOLD,
    META_QUANTIZATION,
    META_TEACHERS,
    contract_metadata,
    ort_session,
    top1,
)
from ..data import eval_preprocess, index_splits
from ..data.loading import streams
from ..data.splits import SplitImages
from ..errors import UserError
from ..formats import export_formats, get_format, with_prerequisites
from ..models import EKDStudent
from ..run import RunDir, open_finished_run
from ..teachers import DataInfo
from ..tracking import log_export
from .compose import compose_teachers
from .fold import LAYOUTS, fold, fold_layouts
from .onnx import (
    DeployModel,
    TeacherEnsemble,
    as_float_images,
    export_onnx,
    parity,
    pick_fastest,
    run_session,
    run_torch,
    save_checked,
    set_file_metadata,
    time_sessions,
)
from .qad import QADSettings, modelopt_quantization, quantization_aware_distill
from .quantize import quantize_int8
from .tensorrt import build_engine, check_tensorrt_available

FOLD_MODES = ("auto", *LAYOUTS)
# which QDQ form an int8 file holds (the manifest's quantization.form)
INT8_FORMS = {"ort": "onnxruntime-qdq: int8 per-channel weights, uint8 activations, Q after each op (QLinearConv on CPU)",
              "tensorrt": "tensorrt-qdq: ModelOpt's explicit quantization, int8 symmetric, Q/DQ on op inputs only "
                          "(build a TensorRT engine from it; ONNX Runtime runs its convolutions in float)"}
FP32_PARITY_TOLERANCE = 1e-3  # relative to the logits' scale; observed about 1e-6 on ONNX Runtime CPU
FP16_AGREEMENT_WARNING = 0.995


@dataclasses.dataclass(frozen=True)
class ExportContext:
    """What every export step reads, and none changes: the run, its student, the images to check
    against, where files are staged."""

    run: RunDir
    recipe_name: str
    student: EKDStudent
    classes: list[str]
    size: int
    mean: list[float]
    std: list[float]
    out: Path
    tmp: Path
    val_x: torch.Tensor  # uint8 validation images for parity and accuracy
    val_y: np.ndarray
    calib_x: torch.Tensor  # uint8 training images for int8 calibration
    say: Callable[[str], None]
    preprocess: dict  # how a raw photo becomes the input (the ONNX metadata says it)
    fold_mode: str = "auto"
    recipe: object = None  # the run's recipe (QAD fine-tunes on its training split)
    teachers: list = dataclasses.field(default_factory=list)  # the run's teachers (loaded when needed)
    qad: Optional[QADSettings] = None  # int8 by quantization-aware distillation instead of post-training

    def meta(self, kind: str, precision: str, **extra) -> dict[str, str]:
        return contract_metadata(classes=self.classes, input_size=self.size, kind=kind, precision=precision,
                                 recipe=self.recipe_name, run_dir=self.run.path, preprocess=self.preprocess, extra=extra)

    def staged(self, name: str) -> Path:
        """Where an output file is written until every file has been made and checked (see ``_publish``)."""
        return self.tmp / "staged" / name

    def deploy(self, layout: str, half: bool = False) -> DeployModel:
        return DeployModel(fold(self.student, layout), self.mean, self.std, half=half).eval()


def _checked(job: ExportContext, path: Path, kind: str, precision: str, reference: np.ndarray, vs: str,
             fp32_acc: Optional[float] = None) -> tuple[dict, np.ndarray]:
    """Open the written file, run it on the validation images, compare with ``reference``: the file's
    manifest entry, and its logits for the next comparison."""
    logits = run_session(ort_session(path), job.val_x)
    p = parity(reference, logits)
    summary = (f"max|Δ| {p['max_abs_diff']:.1e}, argmax {p['argmax_agreement']:.2%} vs {vs}" if vs == "PyTorch"
               else f"argmax {p['argmax_agreement']:.2%} vs {vs}")
    entry = {"file": path.name, "kind": kind, "precision": precision, "size_mb": _size_mb(path), "parity": p,
             "parity_summary": summary, "accuracy": top1(logits, job.val_y)}
    if fp32_acc is not None:
        entry["accuracy_change"] = entry["accuracy"] - fp32_acc
    return entry, logits


# --------------------------------------------------------------------------------------------------
# one function per format

@dataclasses.dataclass(frozen=True)
class Built:
    """What one step made: its staged file, its manifest entry, and what a step built from it reads."""

    path: Path
    entry: dict
    logits: Optional[np.ndarray] = None  # on the validation images: the next step's reference
    layout: Optional[str] = None  # the student's fold layout in the file
    candidates: dict = dataclasses.field(default_factory=dict)  # fp32: each layout's file (int8 quantises each)
    fold: dict = dataclasses.field(default_factory=dict)  # the fold choice and its timings (the manifest's "fold")
    also: tuple = ()  # further files the step made (QAD: ModelOpt's TensorRT-style QDQ), each a Built


EXPORTERS: dict[str, Callable[[ExportContext, Optional[Built]], Built]] = {}


def exporter(name: str):
    """Register ``fn(ctx, source) -> Built`` as the export of the format ``name`` (a row of the table);
    ``source`` is what the format it builds from made (None for fp32)."""
    get_format(name)

    def deco(fn):
        EXPORTERS[name] = fn
        return fn

    return deco


@exporter("fp32")
def export_student_fp32(job: ExportContext, source: None = None) -> Built:
    """Fold in each candidate layout, keep the fastest (``auto``), check it against the trained student."""
    fold_mode = job.fold_mode
    layouts = fold_layouts(job.student) if fold_mode == "auto" else [fold_mode]
    paths = {}
    for layout in layouts:
        job.say(f"  folding ({layout}) and exporting fp32 ...")
        paths[layout] = export_onnx(job.deploy(layout), job.tmp / f"{layout}.onnx", job.size,
                                    job.meta("student", "fp32", **{META_FOLD: layout}))
    info: dict = {"mode": fold_mode}
    if len(layouts) > 1:
        job.say("  timing fold candidates on ONNX Runtime (batch 1 and 64) ...")
        info["timings_ms"] = time_sessions(paths, job.size)
    info["choice"] = choice = pick_fastest(info["timings_ms"]) if len(layouts) > 1 else layouts[0]
    reference = run_torch(DeployModel(job.student, job.mean, job.std).eval(), job.val_x)  # trained, unfolded
    entry, logits = _checked(job, paths[choice], "student", "fp32", reference, "PyTorch")
    if entry["parity"]["max_rel_diff"] > FP32_PARITY_TOLERANCE:  # the fold is exact: a gap this size is a bug
        raise RuntimeError(f"the folded student ({choice}) does not match the trained student: max relative "
                           f"|Δlogit| {entry['parity']['max_rel_diff']:.1e} > {FP32_PARITY_TOLERANCE:.0e}; nothing was "
                           f"written to {job.out}. This is a bug in ekdc: please report it with the run folder")
    path = job.staged("student.onnx")
    _copy_into_place(paths[choice], path)
    entry["file"] = "student.onnx"
    return Built(path, entry, logits, choice, paths, info)


def export_teachers(job: ExportContext) -> Built:
    """The ensemble as one graph; ONNX teachers are composed into it (``compose.py``). Compared with the
    teachers run one by one (ONNX teachers through ONNX Runtime)."""
    teachers = job.teachers
    job.say("  exporting the teacher ensemble ...")
    path = job.staged("teachers.onnx")
    meta = job.meta("teachers", "fp32", **{META_TEACHERS: ",".join(t.name for t in teachers)})
    from_onnx = [t for t in teachers if t.source == "onnx"]
    if not from_onnx:
        export_onnx(TeacherEnsemble(teachers).eval(), path, job.size, meta)
    else:
        in_torch = [t for t in teachers if t.source != "onnx"]
        part = None
        if in_torch:

            part = onnx.load(str(export_onnx(TeacherEnsemble(in_torch, reduce="sum").eval(), job.tmp / "torch_teachers.onnx",
                                             job.size, {})))
        with _io.atomic_path(path) as tmp:
            save_checked(compose_teachers(part, from_onnx, len(teachers), job.size), tmp, meta)
    reference = run_torch(TeacherEnsemble(teachers).eval(), job.val_x)
    entry, logits = _checked(job, path, "teachers", "fp32", reference, "PyTorch")
    return Built(path, entry, logits)


@exporter("fp16")
def export_fp16(job: ExportContext, fp32: Built) -> Built:
    job.say("  exporting fp16 ...")
    path = export_onnx(job.deploy(fp32.layout, half=True), job.staged("student.fp16.onnx"), job.size,
                       job.meta("student", "fp16", **{META_FOLD: fp32.layout}))
    entry, logits = _checked(job, path, "student", "fp16", fp32.logits, "fp32", fp32.entry["accuracy"])
    if entry["parity"]["argmax_agreement"] < FP16_AGREEMENT_WARNING:
        job.say(f"[yellow]  warning: fp16 agrees with fp32 on only {entry['parity']['argmax_agreement']:.2%} of images[/yellow]")
    return Built(path, entry, logits, fp32.layout)


@exporter("int8")
def export_int8(job: ExportContext, fp32: Built) -> Built:
    """Post-training (ONNX Runtime, static QDQ) by default; with ``job.qad``, quantization-aware
    distillation (ModelOpt) of the layout fastest in int8."""
    calib = as_float_images(job.calib_x)
    job.say(f"  quantising int8 (static QDQ, per-channel, QUInt8 activations, {len(job.calib_x)} calibration images) ...")
    ptq = {"method": "ptq", "tool": "onnxruntime", "calibration_images": int(len(job.calib_x))}
    q_paths = {layout: quantize_int8(path, job.tmp / f"{layout}.int8.onnx", calib,
                                     job.meta("student", "int8", **{META_FOLD: layout, META_QUANTIZATION: json.dumps(ptq)}))
               for layout, path in fp32.candidates.items()}
    fold: dict = {}
    if len(q_paths) > 1:
        job.say("  timing int8 fold candidates (batch 1 and 64) ...")
        fold["int8_timings_ms"] = time_sessions(q_paths, job.size)
        fold["int8_choice"] = pick_fastest(fold["int8_timings_ms"])
    else:
        fold["int8_choice"] = next(iter(q_paths))
    path = job.staged("student.int8.onnx")
    layout = fold["int8_choice"]
    also: tuple = ()
    if job.qad is None:
        _copy_into_place(q_paths[layout], path)
        info = {**ptq, "form": INT8_FORMS["ort"]}
    else:
        job.say(f"  quantization-aware distillation ({layout} fold, NVIDIA ModelOpt, {job.qad.epochs} epochs"
                f"{' against the teachers' if job.qad.teachers else ', labels only'}) ...")
        meta = lambda i: job.meta("student", "int8", **{META_FOLD: layout, META_QUANTIZATION: json.dumps(i)})  # noqa: E731
        trt_path = job.staged("student.int8.tensorrt.onnx")
        _, learned, info = quantization_aware_distill(job.deploy(layout), job.recipe, job.teachers, job.calib_x,
                                                      job.qad, trt_path, job.size, meta({"method": "qad"}), job.say,
                                                      job.run)
        info["calibration_images"] = int(len(job.calib_x))
        trt_info = {**info, "form": INT8_FORMS["tensorrt"]}
        set_file_metadata(trt_path, meta(trt_info))
        # QAD's weights in ONNX Runtime's own form: re-quantised on the same per-channel int8 grid they were
        # fine-tuned for, activations calibrated as PTQ's are, a Q after every conv (QLinearConv on CPU)
        learned_fp32 = export_onnx(learned, job.tmp / "qad-learned.onnx", job.size, {})
        info = {**info, "form": INT8_FORMS["ort"], "weights": "QAD's, re-quantised by onnxruntime (static QDQ)"}
        quantize_int8(learned_fp32, path, calib, meta(info))
        trt_entry, _ = _checked(job, trt_path, "student", "int8", fp32.logits, "fp32", fp32.entry["accuracy"])
        trt_entry["quantization"] = trt_info
        also = (Built(trt_path, {**trt_entry, "format": "int8", "checked": get_format("int8").checked}),)
    entry, logits = _checked(job, path, "student", "int8", fp32.logits, "fp32", fp32.entry["accuracy"])
    entry["quantization"] = info
    return Built(path, entry, logits, layout, fold=fold, also=also)


@exporter("trt")
def export_tensorrt(job: ExportContext, fp16: Built) -> Built:
    job.say(f"  building the TensorRT engine from {fp16.path.name} ...")
    plan = build_engine(fp16.path, job.staged("student.plan"), job.size)
    return Built(plan, {"file": plan.name, "kind": "student", "precision": "fp16", "size_mb": _size_mb(plan),
                        "parity": None, "parity_summary": "engine (bench it with --provider tensorrt)", "accuracy": None},
                 layout=fp16.layout)


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


def _images(recipe, classes: list[str], parity_images: int, calib_images: int):
    """Only the images export uses are decoded: the validation images (or a seeded subset) and a seeded
    sample of training images for int8 calibration. Data the run streamed (``data.loader``) is streamed
    here too: the validation images are decoded a batch at a time, each time a model is run on them,
    never held whole (nor kept a second time in the decode memo)."""
    index = index_splits(recipe.data)
    if list(index.classes) != classes:
        raise UserError(f"the data of the run's recipe has classes {index.classes[:5]}..., the student {classes[:5]}...")
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
    val_x, val_y, calib_x = _images(recipe, classes, parity_images, calib_images)
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
    # ekdc's own outputs only; teachers.onnx too when this export has none, even if no manifest named it
    # (a bench beside this student would otherwise take another run's ensemble as its reference)
    stale = {f for f in previous - set(names) if "/" not in f and f.startswith("student")}
    if "teachers.onnx" not in names:
        stale.add("teachers.onnx")
    for name in stale:
        (job.out / name).unlink(missing_ok=True)


def _size_mb(p: Path) -> float:
    return round(p.stat().st_size / 1e6, 4)


def _copy_into_place(src: Path, dst: Path) -> None:
    """Copy a finished file into place atomically. A copy, not a move: the int8 step still quantises
    every fp32 candidate after the fp32 choice is made."""
    with _io.atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
