"""The run's validation metrics (``metrics.json``, ekdc/contract.py's run contract): the student, each branch,
each teacher and their ensemble, on the validation split, in fp32."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..contract import top1
from ..data import DataSplits, ImageSet
from ..models import EKDStudent, count_macs, count_params
from ..recipe import Recipe
from ..teachers import Teacher, teacher_stats
from ..training.runtime import Runtime


@torch.no_grad()
def predict(model: nn.Module, images: ImageSet, rt: Runtime, batch_size: int = 256) -> torch.Tensor:
    """Outputs of ``model(pixels)`` on a split's images (as [0,1] pixels), in eval mode and fp32: the
    reported accuracy is that of the function export deploys, not of a bf16 approximation."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(rt.to_pixels(x)).float().cpu() for x, _ in images.in_order(batch_size)])
    finally:
        model.train(was)


class _StudentBranches(nn.Module):
    """The student's per-branch logits ``[B,N,C]`` from [0,1] pixels, normalised as it was trained."""

    def __init__(self, student: EKDStudent, mean: list[float], std: list[float], rt: Runtime):
        super().__init__()
        self.student, self.rt = student, rt
        self.register_buffer("mean", torch.tensor(mean, device=rt.device), persistent=False)
        self.register_buffer("std", torch.tensor(std, device=rt.device), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.student(self.rt.normalize(pixels, self.mean, self.std), return_branches=True).logits.transpose(0, 1)


def val_accuracy(model: nn.Module, data: DataSplits, rt: Runtime) -> float:
    """Top-1 of ``model(pixels)`` on the validation split."""
    return top1(predict(model, data.val, rt), data.val_y)


def student_val_accuracy(student: EKDStudent, data: DataSplits, rt: Runtime) -> float:
    """Top-1 of the student's averaged branches (the deployed output) on the validation split."""
    return top1(predict(_StudentBranches(student, data.mean, data.std, rt), data.val, rt).mean(1), data.val_y)


def evaluate_teachers(data: DataSplits, teachers: list[Teacher], rt: Runtime) -> dict:
    """Each teacher's validation accuracy, size and cost, and their averaged logits' accuracy."""
    teacher_logits = [predict(t, data.val, rt) for t in teachers]
    y = data.val_y
    teachers_out = []
    for t, tl in zip(teachers, teacher_logits):
        params, macs = teacher_stats(t)
        teachers_out.append({"name": t.name, "arch": t.arch, "source": t.source, "input_size": t.input_size,
                             "acc": top1(tl, y), "params": params, "macs": macs})
    return {"teachers": teachers_out, "teacher_ensemble_acc": top1(torch.stack(teacher_logits).mean(0), y)}


def evaluate(recipe: Recipe, data: DataSplits, student: EKDStudent, teachers: list[Teacher], rt: Runtime) -> dict:
    """metrics.json (ekdc/contract.py's run contract), but for ``seconds``, which the caller adds."""
    branch_logits = predict(_StudentBranches(student, data.mean, data.std, rt), data.val, rt)  # [V,N,C]
    y = data.val_y
    return {
        "student": {
            "arch": getattr(student, "arch", "ekd_student"),
            "ensemble_acc": top1(branch_logits.mean(1), y),
            "branch_acc": [top1(branch_logits[:, i], y) for i in range(branch_logits.shape[1])],
            # the deployed student's parameters: training-only adapters excluded
            "params": count_params(student) - (count_params(student.adapters) if student.adapters is not None else 0),
            "macs": count_macs(student, data.image_size),
        },
        **evaluate_teachers(data, teachers, rt),
        "mode": recipe.mode,
        "train_images": len(data.train),
        "val_images": len(data.val),
        "loader": data.loader,
        "skipped_files": data.skipped_files,
        "device": str(rt.device),
        "precision": rt.precision_text,
        "world_size": rt.world,
    }
