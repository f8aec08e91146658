"""The checkpoint files of a run folder: what training writes and export reads, in one place.

    teachers/<name>.pt   {state_dict, arch, source, num_classes, classes, input_size, mean, std, seconds}
                         (classes: the model's outputs; input_size, mean, std: what the teacher takes)
    student.pt           {state_dict, arch: ekd_student, config, stem, block, num_classes, classes,
                          input_size, mean, std, recipe, mode, teachers, seconds}
    ckpt/<stage>.pt      {state_dict, optimizer, scheduler, scaler, rng_cpu, epoch, seconds, stage}

Every file is written atomically and read with ``torch.load(weights_only=True)`` (see ``_io``).
``source`` says where a teacher came from (registry, torchvision, timm); ``stem`` and ``block`` name the
student's stem and block kinds (see ``ekdc.models.student``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from . import _io
from .errors import UserError
from .models import EKDStudent, create_model, list_students
from .models.student import BLOCKS as STUDENT_BLOCKS
from .models.student import STEMS as STUDENT_STEMS
from .teachers import DataInfo, Teacher, frozen_teacher, teacher_from_checkpoint
from .teachers.torch_models import build


def _data_fields(classes: list[str], input_size: int, mean: list[float], std: list[float]) -> dict[str, Any]:
    return {"num_classes": len(classes), "classes": list(classes), "input_size": int(input_size),
            "mean": list(mean), "std": list(std)}


# --------------------------------------------------------------------------------------------------
# teachers


def save_teacher(path: str | os.PathLike, model: nn.Module, *, arch: str, source: str, classes: list[str],
                 input_size: int, mean: list[float], std: list[float], seconds: float) -> None:
    """``classes`` are the model's outputs in order; ``input_size``, ``mean`` and ``std`` what it takes."""
    _io.save_checkpoint({"state_dict": model.state_dict(), "arch": arch, "source": source,
                         **_data_fields(classes, input_size, mean, std), "seconds": float(seconds)}, path)


def load_teacher(path: str | os.PathLike, arch: str, what: str = "teacher checkpoint") -> tuple[nn.Module, dict]:
    """A teacher this run (or an earlier one) saved, and the checkpoint's fields; checked against the
    architecture the recipe names."""
    ck = _io.load_checkpoint(path, what)
    if ck.get("arch") not in (None, arch):
        raise UserError(f"{what} {path} holds a '{ck['arch']}', not the '{arch}' the recipe names")
    model = build(arch, int(ck.get("num_classes") or len(ck["classes"])), False, what)
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as err:
        detail = str(err).splitlines()[0][:160]
        raise UserError(f"{what} {path} does not fit architecture '{arch}' ({detail})") from None
    return model, ck


def teacher_for_run(tcfg, i: int, data: DataInfo, run) -> Teacher:
    """The teacher a run uses: the one it trained (or saved) in ``teachers/<name>.pt``, else its source."""
    path = run.teacher_path(tcfg.name)
    if path.exists():
        model, ck = load_teacher(path, tcfg.arch or "")
        return teacher_from_checkpoint(ck, model, tcfg, data, i)
    if tcfg.train is not None:  # trained (or fine-tuned) in the run: its weights exist only there, never guess them
        raise UserError(f"teacher {tcfg.name} was trained in run {run.path}, but its checkpoint {path} is missing")
    return frozen_teacher(tcfg, i, data)


# --------------------------------------------------------------------------------------------------
# the student


def save_student(path: str | os.PathLike, student: EKDStudent, *, classes: list[str], input_size: int,
                 mean: list[float], std: list[float], recipe: str, mode: str, teachers: list[str],
                 seconds: float, teacher_cache: Optional[dict] = None) -> None:
    """The trained student without its training-only feature adapters (``teacher_cache``: the cache its
    teachers' outputs were read from, if any)."""
    sd = {k: v for k, v in student.state_dict().items() if not k.startswith("adapters.")}
    arch = getattr(student, "arch", "ekd_student")
    _io.save_checkpoint({"state_dict": sd, "arch": arch, "config": student.config,
                         **({"stem": student.config["stem"], "block": student.config["block"]} if arch == "ekd_student" else {}),
                         **_data_fields(classes, input_size, mean, std), "recipe": recipe,
                         "mode": mode, "teachers": list(teachers), "seconds": float(seconds),
                         "teacher_cache": teacher_cache}, path)


def load_student(path: str | os.PathLike) -> tuple[EKDStudent, dict]:
    """The student (eval mode) and its checkpoint's fields."""
    ck = _io.load_checkpoint(path, "student checkpoint")
    if not isinstance(ck.get("arch"), str) or "config" not in ck:
        raise UserError(f"{path} is not an ekdc student checkpoint")
    if ck["arch"] not in list_students():
        raise UserError(f"{path}: a '{ck['arch']}' student, which this ekdc does not have (students: "
                        f"{', '.join(list_students())}; a plugin's student needs its package installed)")
    for key, known in (("stem", STUDENT_STEMS), ("block", STUDENT_BLOCKS)):
        if ck.get(key, known[0]) not in known:
            raise UserError(f"{path}: a student with {key} '{ck[key]}' needs a newer ekdc (this one builds "
                            f"{', '.join(known)})")
    student = create_model(ck["arch"], num_classes=int(ck["num_classes"]), **ck["config"])
    try:
        student.load_state_dict(ck["state_dict"])
    except RuntimeError as err:
        raise UserError(f"{path} does not match its own student config ({str(err).splitlines()[0][:160]})") from None
    return student.eval(), ck


# --------------------------------------------------------------------------------------------------
# a stage in progress


def save_stage(path: str | os.PathLike, *, stage: str, model: nn.Module, optimizer, scheduler, scaler,
               epoch: int, seconds: float, ema=None) -> None:
    _io.save_checkpoint({
        "state_dict": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler.is_enabled() else None, "rng_cpu": torch.get_rng_state(),
        "ema": ema.state_dict() if ema is not None else None,
        "epoch": int(epoch), "seconds": float(seconds), "stage": stage,
    }, path)


def load_stage(path: str | os.PathLike, *, model: nn.Module, optimizer, scheduler, scaler,
               ema=None) -> Optional[tuple[int, float]]:
    """Restore a stage in progress into the given objects (``ema``: the stage's weight average, where it
    keeps one); returns (epochs done, seconds so far), or None when there is no stage checkpoint."""
    if not Path(path).exists():
        return None
    ck = _io.load_checkpoint(path, "stage checkpoint")
    try:
        model.load_state_dict(ck["state_dict"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        if ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
        if ema is not None and ck.get("ema"):
            ema.load_state_dict(ck["ema"])
        torch.set_rng_state(ck["rng_cpu"])
        return int(ck["epoch"]), float(ck["seconds"])
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        # another network, or an optimiser of other parameter groups (an earlier ekdc's): the file is left as it is
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"stage checkpoint {path} does not fit this stage ({reason}): it was written for another "
                        "model or by another ekdc version; move it away to train the stage from its start") from None
