"""``ekdc export``: a run folder in, deployable files out.

    student.onnx        the folded student (fp32), the averaging ensemble inside
    student.fp16.onnx   --fp16: fp16 weights and compute, float32 I/O
    student.int8.onnx   --int8: static QDQ int8, per-channel, QUInt8 activations
    student.plan        --trt: a TensorRT engine built from the fp16 file
    teachers.onnx       the teacher ensemble as one graph (the reference bench compares against)
    manifest.json       files, sizes, parity figures, fold choice with its timings
"""
from __future__ import annotations

import datetime as _dt
import tempfile
from pathlib import Path

import numpy as np
import torch

from .. import _io
from ..data import load_data
from ..distillation.trainer import load_teacher
from ..errors import UserError
from ..models import EKDStudent, create_model
from ..run import RunDir, find_latest_run
from .fold import LAYOUTS, fold
from .onnx import (DeployModel, TeacherEnsemble, contract_metadata, export_onnx, parity, pick_fastest, run_session,
                   session, time_sessions)

FOLD_MODES = ("auto", *LAYOUTS)


def _resolve_run(run_dir, runs_root) -> RunDir:
    if run_dir is None:
        return find_latest_run(runs_root)
    run = RunDir(run_dir)
    if not run.path.is_dir():
        raise UserError(f"run folder not found: {run.path}")
    if not run.recipe_path.is_file():
        raise UserError(f"{run.path} is not an ekdc run folder (no recipe.yaml in it)")
    if not run.student_path.is_file():
        raise UserError(f"run {run.path} has no trained student (student.pt missing); finish it with 'ekdc distill RECIPE --resume'")
    return run


def load_student(path: Path) -> tuple[EKDStudent, dict]:
    ck = _io.load_checkpoint(path, "student checkpoint")
    if ck.get("arch") != "ekd_student" or "config" not in ck:
        raise UserError(f"{path} is not an ekdc student checkpoint")
    student = create_model("ekd_student", num_classes=int(ck["num_classes"]), **ck["config"])
    try:
        student.load_state_dict(ck["state_dict"])
    except RuntimeError as err:
        raise UserError(f"{path} does not match its own student config ({str(err).splitlines()[0][:160]})") from None
    return student.eval(), ck


def _images(x_uint8: torch.Tensor) -> np.ndarray:
    return (x_uint8.float() / 255).numpy()


def _torch_logits(model: torch.nn.Module, images: np.ndarray, batch: int = 256) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([model(torch.from_numpy(images[i : i + batch])) for i in range(0, len(images), batch)]).numpy()


def _size_mb(p: Path) -> float:
    return round(p.stat().st_size / 1e6, 4)


def _accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


FP32_PARITY_TOLERANCE = 1e-3  # relative to the logits' scale; observed about 1e-6 on ONNX Runtime CPU


def export(
    run_dir: str | Path | None = None,
    out: str | Path = "export",
    *,
    fp16: bool = False,
    int8: bool = False,
    trt: bool = False,
    fold_mode: str = "auto",
    calib_images: int = 256,
    parity_images: int = 0,
    runs_root: str | Path = "runs",
    console=None,
) -> dict:
    """Export a run's student (folded) and teacher ensemble; returns the manifest (also written)."""
    say = console.print if console is not None else (lambda *a, **k: None)
    if fold_mode not in FOLD_MODES:
        raise UserError(f"--fold {fold_mode!r}: choose one of {', '.join(FOLD_MODES)}")
    if calib_images < 1:
        raise UserError("--calib must be >= 1")
    if parity_images < 0:
        raise UserError("--parity-images must be >= 0 (0: every validation image)")
    if trt:
        from .tensorrt import check_tensorrt_available

        check_tensorrt_available()
    run = _resolve_run(run_dir, runs_root)
    out = _io.ensure_writable_dir(out)
    recipe = run.recipe()
    student, ck = load_student(run.student_path)
    classes, size, mean, std = list(ck["classes"]), int(ck["input_size"]), ck["mean"], ck["std"]
    teachers = []
    for t in recipe.teachers:
        path = Path(t.checkpoint) if t.checkpoint else run.teacher_path(t.name)
        teachers.append(load_teacher(path, t.arch, len(classes)).eval())
    say(f"[bold]ekdc export[/bold] {run.path} -> {out}")
    data = load_data(recipe.data)
    if data.classes != classes:
        raise UserError(f"the data of {run.recipe_path} has classes {data.classes[:5]}..., the student {classes[:5]}...")
    val = data.val_x
    if parity_images and parity_images < len(val):
        pick = torch.from_numpy(np.random.default_rng(0).choice(len(val), parity_images, replace=False))
        val, val_y = val[pick], data.val_y[pick].numpy()
    else:
        val_y = data.val_y.numpy()
    val_images = _images(val)
    calib_idx = np.random.default_rng(1).choice(len(data.train_x), min(calib_images, len(data.train_x)), replace=False)
    calib = _images(data.train_x[torch.from_numpy(calib_idx)])

    def meta(kind: str, precision: str, **extra) -> dict[str, str]:
        return contract_metadata(classes=classes, input_size=size, kind=kind, precision=precision, recipe=recipe.name,
                                 run_dir=run.path, extra=extra)

    reference = _torch_logits(DeployModel(student, mean, std).eval(), val_images)  # the trained, unfolded student
    files: list[dict] = []
    fold_info: dict = {"mode": fold_mode}
    candidates = ["grouped", "separate"] if fold_mode == "auto" else [fold_mode]
    with tempfile.TemporaryDirectory(dir=out, prefix=".ekdc-export-") as tmpdir:
        tmp = Path(tmpdir)
        fp32_paths = {}
        for layout in candidates:
            say(f"  folding ({layout}) and exporting fp32 ...")
            fp32_paths[layout] = export_onnx(DeployModel(fold(student, layout), mean, std), tmp / f"{layout}.onnx", size,
                                             meta("student", "fp32", fold=layout))
        if len(candidates) > 1:
            say("  timing fold candidates on ONNX Runtime (batch 1 and 64) ...")
            fold_info["timings_ms"] = time_sessions(fp32_paths, size)
            choice = pick_fastest(fold_info["timings_ms"])
        else:
            choice = candidates[0]
        fold_info["choice"] = choice
        fp32_logits = run_session(session(fp32_paths[choice]), val_images)
        p = parity(reference, fp32_logits)
        if p["max_rel_diff"] > FP32_PARITY_TOLERANCE:  # the fold is exact: a gap this size is a bug, not rounding
            raise RuntimeError(f"the folded student ({choice}) does not match the trained student: max relative "
                               f"|Δlogit| {p['max_rel_diff']:.1e} > {FP32_PARITY_TOLERANCE:.0e}; nothing was written "
                               f"to {out / 'student.onnx'}. This is a bug in ekdc: please report it with the run folder")
        student_onnx = out / "student.onnx"
        _replace(fp32_paths[choice], student_onnx)
        files.append(_entry(student_onnx, "student", "fp32", p, _accuracy(fp32_logits, val_y),
                            f"max|Δ| {p['max_abs_diff']:.1e}, argmax {p['argmax_agreement']:.2%} vs PyTorch"))
        fp32_acc = files[-1]["accuracy"]

        say("  exporting the teacher ensemble ...")
        ens = DeployModel(TeacherEnsemble(teachers), mean, std).eval()
        teachers_onnx = export_onnx(ens, out / "teachers.onnx", size,
                                    meta("teachers", "fp32", teachers=",".join(t.name for t in recipe.teachers)))
        t_logits = run_session(session(teachers_onnx), val_images)
        tp = parity(_torch_logits(ens, val_images), t_logits)
        files.append(_entry(teachers_onnx, "teachers", "fp32", tp, _accuracy(t_logits, val_y),
                            f"max|Δ| {tp['max_abs_diff']:.1e}, argmax {tp['argmax_agreement']:.2%} vs PyTorch"))

        if fp16 or trt:
            say("  exporting fp16 ...")
            fp16_onnx = export_onnx(DeployModel(fold(student, choice), mean, std, half=True), out / "student.fp16.onnx",
                                    size, meta("student", "fp16", fold=choice))
            h_logits = run_session(session(fp16_onnx), val_images)
            hp = parity(fp32_logits, h_logits)
            files.append(_entry(fp16_onnx, "student", "fp16", hp, _accuracy(h_logits, val_y),
                                f"argmax {hp['argmax_agreement']:.2%} vs fp32", fp32_acc))
            if hp["argmax_agreement"] < 0.995:
                say(f"[yellow]  warning: fp16 agrees with fp32 on only {hp['argmax_agreement']:.2%} of images[/yellow]")

        if int8:
            from .quantize import quantize_int8

            say(f"  quantising int8 (static QDQ, per-channel, QUInt8 activations, {len(calib)} calibration images) ...")
            q_paths = {layout: quantize_int8(path, tmp / f"{layout}.int8.onnx", calib, meta("student", "int8", fold=layout))
                       for layout, path in fp32_paths.items()}
            if len(q_paths) > 1:
                say("  timing int8 fold candidates (batch 1 and 64) ...")
                fold_info["int8_timings_ms"] = time_sessions(q_paths, size)
                fold_info["int8_choice"] = pick_fastest(fold_info["int8_timings_ms"])
            else:
                fold_info["int8_choice"] = candidates[0]
            int8_onnx = out / "student.int8.onnx"
            _replace(q_paths[fold_info["int8_choice"]], int8_onnx)
            q_logits = run_session(session(int8_onnx), val_images)
            qp = parity(fp32_logits, q_logits)
            files.append(_entry(int8_onnx, "student", "int8", qp, _accuracy(q_logits, val_y),
                                f"argmax {qp['argmax_agreement']:.2%} vs fp32", fp32_acc))

        if trt:
            from .tensorrt import build_engine

            say("  building the TensorRT engine from the fp16 file ...")
            plan = build_engine(out / "student.fp16.onnx", out / "student.plan", size)
            files.append({"file": plan.name, "kind": "student", "precision": "fp16", "size_mb": _size_mb(plan),
                          "parity": None, "parity_summary": "engine (bench it with --provider tensorrt)", "accuracy": None})

    manifest = {
        "out": str(out), "run_dir": str(run.path.resolve()), "recipe": recipe.name, "classes": classes,
        "input_size": size, "mean": mean, "std": std, "fold": fold_info, "parity_images": int(len(val_images)),
        "calibration_images": int(len(calib)), "files": files,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _io.write_json(out / "manifest.json", manifest)
    return manifest


def _entry(path: Path, kind: str, precision: str, par: dict, acc: float, summary: str, fp32_acc: float | None = None) -> dict:
    e = {"file": path.name, "kind": kind, "precision": precision, "size_mb": _size_mb(path), "parity": par,
         "parity_summary": summary, "accuracy": acc}
    if fp32_acc is not None:
        e["accuracy_change"] = acc - fp32_acc
    return e


def _replace(src: Path, dst: Path) -> None:
    """Copy a finished file into place atomically. A copy, not a move: the int8 step still quantises
    every fp32 candidate after the fp32 choice is made."""
    with _io.atomic_path(dst) as tmp:
        tmp.write_bytes(src.read_bytes())
