"""Divergences between a student's and a teacher's logits at temperature T, per sample ``[B]``. The
KD term averages them over the batch and multiplies by T² (so that gradients keep their scale as T
changes); the last dimension is classes.

    kl    Hinton et al.: KL(softmax(t/T) || softmax(z/T))
    dkd   decoupled KD (Zhao et al., CVPR 2022): alpha * TCKD + beta * NCKD. TCKD is the KL between
          the binary (target class, all others) distributions; NCKD the KL between the distributions
          over the non-target classes, renormalised. KL = TCKD + (1 - p_t) * NCKD, with p_t the
          teacher's probability of the target class, so DKD with alpha = beta = 1 is
          KL + mean(p_t * NCKD): it gives the non-target classes the weight that a confident teacher's
          KL takes away from them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-12
# the target's logit pushed this far down before the non-target softmax: exp underflows to 0, and the
# value stays finite, so no inf - inf reaches the gradient
_MASKED = -1e4


def kl_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(z/T)) for each sample."""
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


def kd_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² * KL(softmax(t/T) || softmax(z/T)), averaged over the batch."""
    return kl_per_sample(student_logits, teacher_logits, temperature).mean() * (temperature * temperature)


def dkd_parts(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(TCKD, NCKD, the teacher's target-class probability at T), each per sample."""
    t = temperature
    z, s = student_logits.float() / t, teacher_logits.float() / t
    target = F.one_hot(labels, z.shape[-1]).bool()
    p_s, p_t = F.softmax(z, -1), F.softmax(s, -1)
    bs = torch.stack([(p_s * target).sum(-1), (p_s * ~target).sum(-1)], -1).clamp_min(EPS)  # [B,2]
    bt = torch.stack([(p_t * target).sum(-1), (p_t * ~target).sum(-1)], -1).clamp_min(EPS)
    tckd = (bt * (bt.log() - bs.log())).sum(-1)
    log_q_s = F.log_softmax(z.masked_fill(target, _MASKED), -1)
    log_q_t = F.log_softmax(s.masked_fill(target, _MASKED), -1)
    nckd = (log_q_t.exp() * (log_q_t - log_q_s)).masked_fill(target, 0.0).sum(-1)
    return tckd, nckd, bt[:, 0]


def dkd_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                   temperature: float, alpha: float, beta: float) -> torch.Tensor:
    """alpha * TCKD + beta * NCKD for each sample."""
    tckd, nckd, _ = dkd_parts(student_logits, teacher_logits, labels, temperature)
    return alpha * tckd + beta * nckd


def confidence_weights(teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CA-MKD's per-sample teacher weights (Zhang et al., ICASSP 2022) ``[M,B]``: a teacher whose
    cross-entropy with the label is low weighs more, w_m = (1 - softmax_m(CE_m)) / (M - 1), which sums to
    1 over the M >= 2 teachers. Teachers are frozen: the weights carry no gradient."""
    m = teacher_logits.shape[0]
    ce = torch.stack([F.cross_entropy(t.float(), labels, reduction="none") for t in teacher_logits])  # [M,B]
    return ((1.0 - F.softmax(ce, dim=0)) / (m - 1)).detach()
