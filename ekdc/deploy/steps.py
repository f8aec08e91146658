"""The export steps, one per format (``@exporter(name)``), each ``step(ctx, source) -> Built``: given the
read-only ``ExportContext`` and what the format it builds from made (``ekdc.formats``' ``builds_from``), it
writes its file to the staging folder and checks it (``_checked``: the written file opened, run on the
validation images, compared with what it must equal). The teacher ensemble is a step of its own.
``export.py`` runs them in order and publishes what they made."""
from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import onnx
import torch

from .. import _io
from ..benchmark.runner import time_models
from ..contract import (
    META_FOLD,
    META_QUANTIZATION,
    META_TEACHERS,
    contract_metadata,
    ort_session,
    top1,
)
from ..errors import UserError
from ..formats import get_format
from ..models import EKDStudent
from ..plugins import origin
from ..run import RunDir
from .compose import compose_teachers
from .fold import fold, fold_layouts
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
)
from .qad import QADSettings, quantization_aware_distill
from .quantize import quantize_int8
from .tensorrt import build_engine

# which QDQ form an int8 file holds (the manifest's quantization.form)
INT8_FORMS = {"ort": "onnxruntime-qdq: int8 per-channel weights, uint8 activations, Q after each op (QLinearConv on CPU)",
              "tensorrt": "tensorrt-qdq: ModelOpt's explicit quantization, int8 symmetric, Q/DQ on op inputs only "
                          "(build a TensorRT engine from it; ONNX Runtime runs its convolutions in float)"}
FP32_PARITY_TOLERANCE = 1e-3  # relative to the logits' scale; observed about 1e-6 on ONNX Runtime CPU
FP16_AGREEMENT_WARNING = 0.995


LAYOUT_BATCHES = (1, 64)


def layout_timings(paths: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Each fold layout's file timed as ``ekdc plan`` times its candidates and ``ekdc bench`` its models
    (bench's worker: a fresh process a file, 3 interleaved rounds): the median over rounds of each round's
    p50 (ms), at batch 1 and 64. One timing path for export, plan and bench."""
    report = time_models(list(paths.values()), batches=LAYOUT_BATCHES, repeats=3, warmup=3, runs=10)
    return {layout: {str(b): round(statistics.median(m["round_p50_ms"][str(b)]), 4) for b in LAYOUT_BATCHES}
            for layout, m in zip(paths, report["models"])}


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
        info["timings_ms"] = layout_timings(paths)
    info["choice"] = choice = pick_fastest(info["timings_ms"]) if len(layouts) > 1 else layouts[0]
    reference = run_torch(DeployModel(job.student, job.mean, job.std).eval(), job.val_x)  # trained, unfolded
    entry, logits = _checked(job, paths[choice], "student", "fp32", reference, "PyTorch")
    if entry["parity"]["max_rel_diff"] > FP32_PARITY_TOLERANCE:  # the fold is exact: a gap this size is a bug
        arch = getattr(job.student, "arch", "")
        gap = (f"the folded student ({choice}) does not match the trained student: max relative |Δlogit| "
               f"{entry['parity']['max_rel_diff']:.1e} > {FP32_PARITY_TOLERANCE:.0e}; nothing was written to {job.out}")
        plugin = origin("students", arch)
        if plugin:  # a plugin's fold(): its package's to fix, and the user's input, not ekdc's failure
            raise UserError(f"student '{arch}'{plugin}: {gap}. Its fold('{choice}') must compute the trained "
                            "student's mean logits")
        raise RuntimeError(f"{gap}. This is a bug in ekdc: please report it with the run folder")
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
    ptq = {"method": "ptq", "tool": "onnxruntime", "calibration_images": int(len(job.calib_x)), "form": INT8_FORMS["ort"]}
    q_paths = {layout: quantize_int8(path, job.tmp / f"{layout}.int8.onnx", calib,
                                     job.meta("student", "int8", **{META_FOLD: layout, META_QUANTIZATION: json.dumps(ptq)}))
               for layout, path in fp32.candidates.items()}
    fold: dict = {}
    if len(q_paths) > 1:
        job.say("  timing int8 fold candidates (batch 1 and 64) ...")
        fold["int8_timings_ms"] = layout_timings(q_paths)
        fold["int8_choice"] = pick_fastest(fold["int8_timings_ms"])
    else:
        fold["int8_choice"] = next(iter(q_paths))
    path = job.staged("student.int8.onnx")
    layout = fold["int8_choice"]
    also: tuple = ()
    if job.qad is None:
        _copy_into_place(q_paths[layout], path)
        info = dict(ptq)
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
        _record_quantization(trt_path, trt_entry, trt_info)
        also = (Built(trt_path, {**trt_entry, "format": "int8", "checked": get_format("int8").checked}),)
    entry, logits = _checked(job, path, "student", "int8", fp32.logits, "fp32", fp32.entry["accuracy"])
    _record_quantization(path, entry, info)
    return Built(path, entry, logits, layout, fold=fold, also=also)


def _record_quantization(path: Path, entry: dict, info: dict) -> None:
    """How the int8 file was made and what the check measured, in the manifest and in the file's own
    metadata alike: a client holding only the file can tell its form and what it costs in accuracy."""
    info.update(argmax_agreement_vs_fp32=entry["parity"]["argmax_agreement"], accuracy=entry["accuracy"],
                accuracy_change=entry["accuracy_change"])
    set_file_metadata(path, {META_QUANTIZATION: json.dumps(info)})
    entry["quantization"], entry["size_mb"] = info, _size_mb(path)


@exporter("trt")
def export_tensorrt(job: ExportContext, fp16: Built) -> Built:
    job.say(f"  building the TensorRT engine from {fp16.path.name} ...")
    plan = build_engine(fp16.path, job.staged("student.plan"), job.size)
    return Built(plan, {"file": plan.name, "kind": "student", "precision": "fp16", "size_mb": _size_mb(plan),
                        "parity": None, "parity_summary": "engine (bench it with --provider tensorrt)", "accuracy": None},
                 layout=fp16.layout)


def _size_mb(p: Path) -> float:
    return round(p.stat().st_size / 1e6, 4)


def _copy_into_place(src: Path, dst: Path) -> None:
    """Copy a finished file into place atomically. A copy, not a move: the int8 step still quantises
    every fp32 candidate after the fp32 choice is made."""
    with _io.atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
