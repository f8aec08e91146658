"""Quantization-aware distillation as a stage of the one training loop (``train_stage``): the fake-quantised
folded student, trained with the run's objective where it applies, its schedule, its per-epoch checkpoint
(an export killed mid-QAD resumes where it stopped) and its log.

The folded graph has one output, the mean of the branch logits ``z``, so each term of the run becomes:

- ``ce`` and ``ens``: cross-entropy of ``z`` with the labels (one output: the branch and the ensemble are
  the same logits), with the run's label smoothing;
- ``kd``: the run's divergence (KL, or DKD with its alpha, beta and warm-up; confidence-weighted teachers
  too) between ``z`` and the teachers, as ``avg_kd`` does: ``ekd``'s branch-i-from-teacher-i pairing has
  no branches left to pair;
- ``feat``: left out (the fold has no adapters).

``teachers=False`` (``--qad-labels``) trains on the labels alone (quantization-aware training).
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Optional

import torch
import torch.nn as nn

from ..data import load_data
from ..losses import Objective
from ..models import BranchOutputs
from ..run import RunDir
from .runtime import Runtime
from .trainer import Batch, Losses, Reporter, Stage, param_groups, train_stage


def folded_objective(recipe, epochs: int, teachers: bool) -> Objective:
    """The run's objective as the one-output folded graph can take it (this module's docstring)."""
    d = recipe.distill
    settings = d.term_settings()
    if not teachers or recipe.mode == "ce":
        return Objective("ce", {"ens": 1.0}, settings, label_smoothing=d.label_smoothing, epochs=epochs)
    weights = {**d.weights, "feat": 0.0}
    return Objective("avg_kd", weights, settings, temperature=d.temperature, label_smoothing=d.label_smoothing,
                     epochs=epochs)


class _Say:
    """A console for the Reporter that prints through export's ``say``."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say

    def print(self, text: str) -> None:
        self.say(text)


def stage_name(settings: dict) -> str:
    """The stage's checkpoint key: a QAD of other settings never resumes this one's checkpoint."""
    return "qad-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def qad_stage(model: nn.Module, recipe, teachers: Optional[list[nn.Module]], run: RunDir, *, epochs: int,
              lr: float, batch_size: int, seed: int, key: dict, say: Callable[[str], None],
              device: torch.device) -> dict:
    """Train the fake-quantised ``model`` (pixels in, logits out) in the run folder ``run`` as stage
    ``qad-<key digest>`` on ``device`` (export's choice: the run's GPU where this machine has it, else the
    CPU, whatever device the run trained on); returns what the manifest records of the training."""
    rt = Runtime(device, None, False)  # one process; fake quantisation in float32: no autocast
    model.to(rt.device)
    data = load_data(recipe.data)
    objective = folded_objective(recipe, epochs, teachers is not None)
    members = [t.eval().to(rt.device) for t in teachers] if teachers else []
    schedule = recipe.distill.model_copy(update={"epochs": epochs, "lr": lr, "batch_size": batch_size,
                                                 "warmup_epochs": 0, "schedule": "cosine", "ema_decay": 0.0})

    def forward_train(net: nn.Module, batch: Batch) -> tuple[torch.Tensor, Losses]:
        logits = net(batch.pixels)
        t_logits = None
        if objective.needs_teachers:
            with torch.inference_mode():
                t_logits = torch.stack([t(batch.pixels).float() for t in members])
            t_logits = t_logits.clone()  # out of inference mode: a tensor autograd may save for backward
        total, terms = objective(BranchOutputs(logits[None], logits.new_zeros(1, len(logits), 1), None),
                                 batch.labels, batch.epoch, t_logits)
        return logits, Losses(total, terms)

    name = stage_name(key)
    stage = Stage(name, model, forward_train, param_groups(model), schedule, seed + 7_777)
    run.ckpt_dir.mkdir(exist_ok=True)
    with Reporter(run, rt, _Say(say), show=False) as rep:
        seconds = train_stage(stage, data, recipe.data.augment_config, rt, run, rep)
    run.stage_ckpt(name).unlink(missing_ok=True)
    if run.ckpt_dir.is_dir() and not any(run.ckpt_dir.iterdir()):
        run.ckpt_dir.rmdir()  # a finished run keeps no in-progress folder
    model.eval().cpu()
    losses = [r["loss"] for r in map(json.loads, run.log_path.read_text().splitlines()) if r.get("stage") == name]
    kd = next((st for t, _, st in objective.active if t.name == "kd"), None)
    return {"epochs": epochs, "lr": lr, "batch_size": min(batch_size, len(data.train)), "device": str(rt.device),
            "objective": {"mode": objective.mode, "weights": objective.weights}, "loss_per_epoch": losses[-epochs:],
            "kd_loss": (kd.label if kd is not None else None),
            "temperature": recipe.distill.temperature if objective.needs_teachers else None,
            "stage": name, "seconds": round(seconds, 2)}
