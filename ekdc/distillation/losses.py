"""The EKD objective, term by term. Each term says what it matches:

    L = w_ce  * sum_i CE(z_i, y)                                 branch i vs the ground truth
      + w_ens * CE(mean_i z_i, y)                                the averaged ensemble vs the ground truth
      + w_kd  * sum_i T^2 KL(softmax(t_i/T) || softmax(z_i/T))   branch i vs its teacher's soft labels
      + w_feat* sum_i MSE(A_i f_i, u_i)                          branch i's adapted features vs its teacher's

``mode`` picks the teacher each branch matches: ``ekd`` teacher i (the paper), ``avg_kd`` the mean of
the teachers' logits for every branch (classic ensemble KD), ``ce`` none (the student alone). Feature
matching pairs branch i with teacher i, so it applies in ``ekd`` mode only.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import BranchOutputs
from ..recipe import MODE_TERMS

LOSS_TERMS: dict[str, Callable] = {}


def register_loss(name: str):
    def deco(fn):
        LOSS_TERMS[name] = fn
        return fn

    return deco


@register_loss("ce")
def branch_ce(out: BranchOutputs, y: torch.Tensor, label_smoothing: float = 0.0, **_) -> torch.Tensor:
    """Sum over branches of each branch's cross-entropy with the labels."""
    n, b, c = out.logits.shape
    per = F.cross_entropy(out.logits.reshape(n * b, c).float(), y.repeat(n), label_smoothing=label_smoothing)
    return per * n


@register_loss("ens")
def ensemble_ce(out: BranchOutputs, y: torch.Tensor, label_smoothing: float = 0.0, **_) -> torch.Tensor:
    """Cross-entropy of the averaged branch logits (the deployed output) with the labels."""
    return F.cross_entropy(out.logits.float().mean(0), y, label_smoothing=label_smoothing)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(z/T)), averaged over the batch; last dim is classes."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean() * (t * t)


@register_loss("kd")
def branch_kd(out: BranchOutputs, y, *, teacher_logits: torch.Tensor, temperature: float, **_) -> torch.Tensor:
    """Sum over branches of KD(branch i, target i); ``teacher_logits`` is ``[N,B,C]`` already paired."""
    return sum(kd_kl(out.logits[i], teacher_logits[i], temperature) for i in range(out.logits.shape[0]))


@register_loss("feat")
def branch_feat(out: BranchOutputs, y, *, teacher_features: list[torch.Tensor], **_) -> torch.Tensor:
    """Sum over branches of MSE(A_i f_i, u_i): branch i's adapted features vs teacher i's features."""
    if out.adapted is None:
        raise ValueError("feature matching needs the student's adapters (EKDStudent.set_adapters)")
    return sum(F.mse_loss(a.float(), u.float()) for a, u in zip(out.adapted, teacher_features))


class EKDLoss(nn.Module):
    def __init__(self, mode: str, weights: dict[str, float], temperature: float, label_smoothing: float = 0.0):
        super().__init__()
        self.mode = mode
        self.temperature = temperature
        self.label_smoothing = label_smoothing
        self.weights = {k: float(w) for k, w in weights.items() if k in MODE_TERMS[mode] and w > 0}

    @property
    def needs_teachers(self) -> bool:
        return "kd" in self.weights or "feat" in self.weights

    @property
    def needs_features(self) -> bool:
        return "feat" in self.weights

    def targets(self, teacher_logits: torch.Tensor, num_branches: int) -> torch.Tensor:
        """Pair teachers with branches: ``[M,B,C]`` teacher logits to ``[N,B,C]`` per-branch targets."""
        if self.mode == "avg_kd":
            return teacher_logits.mean(0, keepdim=True).expand(num_branches, -1, -1)
        if teacher_logits.shape[0] != num_branches:
            raise ValueError(f"ekd pairs branch i with teacher i: {num_branches} branches, {teacher_logits.shape[0]} teachers")
        return teacher_logits

    def forward(
        self,
        out: BranchOutputs,
        y: torch.Tensor,
        teacher_logits: Optional[torch.Tensor] = None,
        teacher_features: Optional[list[torch.Tensor]] = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        kw = dict(label_smoothing=self.label_smoothing, temperature=self.temperature, teacher_features=teacher_features)
        if "kd" in self.weights:
            kw["teacher_logits"] = self.targets(teacher_logits, out.logits.shape[0])
        terms = {name: LOSS_TERMS[name](out, y, **kw) for name in self.weights}
        total = sum(self.weights[k] * v for k, v in terms.items())
        return total, terms
