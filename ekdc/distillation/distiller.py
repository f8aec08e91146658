"""What a training step computes, for each kind of stage (mdistiller's shape: one module owns the
frozen teachers, the student and the loss; ``forward_train`` returns ``(logits, losses)``)."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..losses import Objective
from ..models import EKDStudent
from ..teachers import Teacher
from ..teachers.ort_runner import OrtTeacher, runs_in_ort
from ..training.trainer import Batch, Losses, param_groups
from .teacher_cache import TeacherCache


class Distiller(nn.Module):
    """The EKD student stage: frozen teachers, the multi-branch student and the objective."""

    def __init__(self, student: EKDStudent, teachers: list[Teacher], loss: Objective, teacher_runtime: str = "auto",
                 say: Optional[Callable[[str], None]] = None):
        super().__init__()
        self.student = student
        self.teachers = nn.ModuleList(teachers)
        self.loss = loss
        # "auto": PyTorch teachers on the CPU in fp32 run in ONNX Runtime (ort_runner.py says why); "torch": never
        self.teacher_runtime = teacher_runtime
        self._say = say  # where a teacher that falls back to PyTorch is reported (the run's console)
        self._ort: dict[int, OrtTeacher] = {}  # by teacher index, made on first use
        self.cache: Optional[TeacherCache] = None  # set: the teachers' outputs are read from it, not computed
        self._teachers_checked = False
        if loss.needs_features:
            student.set_adapters([t.num_features for t in teachers])

    def param_groups(self) -> list[dict]:
        """The student's parameters, the training-only adapters included; teachers never train. A student
        that knows its own rates (``param_groups()``: FastNet's shifts) gives its groups, adapters added."""
        if hasattr(self.student, "param_groups"):
            own = self.student.param_groups()
            seen = {id(p) for g in own for p in g["params"]}
            return own + [{"params": [p for p in self.student.parameters() if p.requires_grad and id(p) not in seen]}]
        return param_groups(self.student)

    def teacher_targets(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Optional[list[torch.Tensor]]]:
        """Teacher logits ``[M,B,C]`` and, where the loss matches features, their pooled features."""
        outs = [self._run_teacher(i, t, pixels) for i, t in enumerate(self.teachers)]
        if not self._teachers_checked:  # once: a broken teacher would otherwise read as a diverging student
            bad = next((t.name for t, o in zip(self.teachers, outs) if not torch.isfinite(o[0]).all()), None)
            if bad is not None:
                raise UserError(f"teacher {bad} gives non-finite outputs (NaN or inf) on training images: check its "
                                "weights, mean and std")
            self._teachers_checked = True
        # inference tensors cannot be saved for backward: plain copies can
        logits = torch.stack([o[0].float() for o in outs]).clone()
        feats = [o[1].clone() for o in outs] if self.loss.needs_features else None
        return logits, feats

    def _run_teacher(self, i: int, teacher: Teacher, pixels: torch.Tensor):
        if self.teacher_runtime == "auto" and runs_in_ort(teacher, pixels):
            if i not in self._ort:
                self._ort[i] = OrtTeacher(teacher, self.loss.needs_features, say=self._say)
            return self._ort[i](pixels)
        with torch.inference_mode():
            return teacher.forward_with_features(pixels) if self.loss.needs_features else (teacher(pixels), None)

    def forward_train(self, student: nn.Module, batch: Batch) -> tuple[torch.Tensor, Losses]:
        """``student`` is ``self.student``, or the DistributedDataParallel wrapper around it."""
        t_logits = t_feats = None
        if self.loss.needs_teachers:
            t_logits, t_feats = (self.teacher_targets(batch.pixels) if self.cache is None
                                 else self.cache.targets(batch.indices, batch.views, batch.pixels.device))
        out = student(batch.images, return_branches=True)
        total, terms = self.loss(out, batch.labels, batch.epoch, t_logits, t_feats)
        return out.logits.mean(0), Losses(total, terms)


class SupervisedClassifier:
    """A teacher's own training stage: cross-entropy with the labels, on the images as the teacher takes
    them (its own size and normalisation)."""

    def __init__(self, preprocess: nn.Module, label_smoothing: float = 0.0):
        self.preprocess = preprocess
        self.label_smoothing = label_smoothing

    def forward_train(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, Losses]:
        logits = model(self.preprocess(batch.pixels))
        return logits, Losses(F.cross_entropy(logits.float(), batch.labels, label_smoothing=self.label_smoothing), {})
