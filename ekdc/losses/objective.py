"""The distillation objective: the weighted sum of the terms that apply in the run's mode.

    L = Σ_term w_term · term(inputs, settings)     over the registered terms whose mode list holds the
                                                    run's mode and whose weight is above 0
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from pydantic import BaseModel

from ..models import BranchOutputs
from .registry import LossTerm, TermInputs, get_term, terms_of_mode


class Objective(nn.Module):
    """What a student stage minimises. ``forward`` returns the total and each term unweighted (logged as
    ``loss_<term>``)."""

    def __init__(self, mode: str, weights: dict[str, float], settings: Optional[dict[str, BaseModel]] = None, *,
                 temperature: float = 4.0, label_smoothing: float = 0.0, epochs: int = 1):
        super().__init__()
        self.mode, self.temperature, self.label_smoothing, self.epochs = mode, temperature, label_smoothing, epochs
        settings = settings or {}
        self.active: list[tuple[LossTerm, float, Optional[BaseModel]]] = []
        for name in terms_of_mode(mode):
            term = get_term(name)
            if float(weights.get(name, 0.0)) > 0:  # a term's settings default to its model's defaults
                s = settings.get(name) or (term.settings() if term.settings is not None else None)
                self.active.append((term, float(weights[name]), s))

    @classmethod
    def from_recipe(cls, recipe) -> "Objective":
        d = recipe.distill
        return cls(recipe.mode, d.weights, d.term_settings(), temperature=d.temperature,
                   label_smoothing=d.label_smoothing, epochs=d.epochs)

    @property
    def weights(self) -> dict[str, float]:
        return {t.name: w for t, w, _ in self.active}

    @property
    def needs_teachers(self) -> bool:
        return any(t.needs_teachers for t, _, _ in self.active)

    @property
    def needs_features(self) -> bool:
        return any("teacher_features" in t.needs for t, _, _ in self.active)

    def forward(self, out: BranchOutputs, labels: torch.Tensor, epoch: int = 0,
                teacher_logits: Optional[torch.Tensor] = None,
                teacher_features: Optional[list[torch.Tensor]] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = TermInputs(out, labels, self.mode, epoch, self.epochs, self.temperature, self.label_smoothing,
                       teacher_logits, teacher_features)
        terms = {t.name: t.compute(x, s) for t, _, s in self.active}
        total = sum(w * terms[t.name] for t, w, _ in self.active)
        return total, terms
