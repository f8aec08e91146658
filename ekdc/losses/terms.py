"""ekdc's own loss terms, each registered with what it matches:

    ce    Σ_i CE(z_i, y)                     each branch vs the labels
    ens   CE(mean_i z_i, y)                  the averaged output (what is deployed) vs the labels
    kd    Σ_i D(z_i, target_i)               each branch vs the teachers' softened logits: in ekd branch i
                                             vs teacher i, in avg_kd vs the teachers' mean (or, with
                                             teachers: confidence, a per-sample weighted sum over them);
                                             D is KL or DKD (distill.kd.loss)
    feat  Σ_i MSE(A_i f_i, u_i)              branch i's features, through a training-only adapter, vs
                                             teacher i's (ekd only: it pairs branch i with teacher i)
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from .kd import confidence_weights, dkd_per_sample, kl_per_sample
from ..settings import StrictSettings
from .registry import TermInputs, register_term


@register_term("ce", matches="each branch's logits vs the labels", needs=("labels",), default_weight=1.0)
def branch_ce(x: TermInputs, _settings=None) -> torch.Tensor:
    n, b, c = x.out.logits.shape
    per = F.cross_entropy(x.out.logits.reshape(n * b, c).float(), x.labels.repeat(n), label_smoothing=x.label_smoothing)
    return per * n


@register_term("ens", matches="the averaged branch logits (the deployed output) vs the labels", needs=("labels",),
               default_weight=1.0)
def ensemble_ce(x: TermInputs, _settings=None) -> torch.Tensor:
    return F.cross_entropy(x.out.logits.float().mean(0), x.labels, label_smoothing=x.label_smoothing)


class KDSettings(StrictSettings):
    """``distill.kd``: how each branch's softened logits are matched to the teachers'."""

    loss: Literal["kl", "dkd"] = Field("kl", description="kl (Hinton) or dkd (decoupled KD: alpha * TCKD + beta * NCKD)")
    alpha: float = Field(1.0, ge=0, allow_inf_nan=False, description="dkd: weight of the target-class term (TCKD)")
    beta: float = Field(8.0, ge=0, allow_inf_nan=False, description="dkd: weight of the non-target term (NCKD)")
    warmup_epochs: int = Field(0, ge=0, description="the term's weight ramps up linearly over these epochs "
                                                     "(DKD's warm-up; 0: full weight from the start)")
    teachers: Literal["mean", "confidence"] = Field(
        "mean", description="avg_kd: match the teachers' mean logits, or (confidence, CA-MKD) each teacher, "
                            "weighted per sample by its cross-entropy with the label")

    @model_validator(mode="after")
    def _dkd_only(self):
        if self.loss == "kl" and (self.alpha != 1.0 or self.beta != 8.0):
            raise ValueError("alpha and beta weigh DKD's two parts, and do nothing with loss: kl; set loss: dkd "
                             "(the KD term's own weight is distill.weights.kd)")
        return self

    @property
    def label(self) -> str:
        """``kl``, ``dkd``, ``kl+confidence``: what the compare tables call the loss."""
        return self.loss + ("+confidence" if self.teachers == "confidence" else "")


def _kd_check(s: KDSettings, mode: str, num_teachers: int) -> Optional[str]:
    if s.teachers == "confidence" and mode == "ekd":
        return ("kd.teachers: confidence weighs all teachers for every branch, but mode ekd pairs branch i with "
                "teacher i; use mode: avg_kd, or teachers: mean")
    if s.teachers == "confidence" and num_teachers < 2:
        return "kd.teachers: confidence weighs teachers against each other: it needs at least 2 teachers"
    return None


def _divergence(s: KDSettings, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample divergence ``[B]`` of branch logits ``z`` from teacher logits ``t`` (before T²)."""
    if s.loss == "dkd":
        return dkd_per_sample(z, t, labels, temperature, s.alpha, s.beta)
    return kl_per_sample(z, t, temperature)


@register_term("kd", matches="each branch's softened logits vs its teacher's (ekd) or the teachers' (avg_kd)",
               modes=("avg_kd", "ekd"), needs=("teacher_logits", "labels", "epoch"), default_weight=1.0,
               settings=KDSettings, check=_kd_check)
def branch_kd(x: TermInputs, s: KDSettings) -> torch.Tensor:
    t_all, n, t2 = x.teacher_logits, x.num_branches, x.temperature * x.temperature
    if x.mode == "ekd":
        if t_all.shape[0] != n:
            raise ValueError(f"ekd pairs branch i with teacher i: {n} branches, {t_all.shape[0]} teachers")
        total = sum(_divergence(s, x.out.logits[i], t_all[i], x.labels, x.temperature).mean() * t2 for i in range(n))
    elif s.teachers == "confidence":
        w = confidence_weights(t_all, x.labels)  # [M,B]
        total = sum((w[m] * _divergence(s, x.out.logits[i], t_all[m], x.labels, x.temperature)).mean() * t2
                    for i in range(n) for m in range(t_all.shape[0]))
    else:
        mean = t_all.float().mean(0)
        total = sum(_divergence(s, x.out.logits[i], mean, x.labels, x.temperature).mean() * t2 for i in range(n))
    if s.warmup_epochs and x.epoch < s.warmup_epochs:
        total = total * ((x.epoch + 1) / s.warmup_epochs)
    return total


@register_term("feat", matches="each branch's pooled features, through a training-only adapter, vs its teacher's",
               modes=("ekd",), needs=("teacher_features",), default_weight=0.0)
def branch_feat(x: TermInputs, _settings=None) -> torch.Tensor:
    if x.out.adapted is None:
        raise ValueError("feature matching needs the student's adapters (EKDStudent.set_adapters)")
    return sum(F.mse_loss(a.float(), u.float()) for a, u in zip(x.out.adapted, x.teacher_features))
