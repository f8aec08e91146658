"""The teacher interface: whatever a teacher is made from, distillation sees a frozen function from an
image batch to logits over the data's classes, with pooled features where the model has them.

Today every teacher comes from ekdc's model registry (``source: registry``); other sources (torchvision,
timm, ONNX files) plug in here by producing a ``Teacher``, and the distiller, the export of
``teachers.onnx`` and the metrics never ask which source a teacher came from.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .models import FeatureClassifier


class Teacher(nn.Module):
    """A frozen teacher. Input: images normalised with the data's mean and std at the data's size.
    ``forward`` gives logits ``[B,C]`` in the data's class order; ``forward_with_features`` also gives
    the pooled penultimate features ``[B,num_features]`` (feature matching needs them)."""

    def __init__(self, model: FeatureClassifier, *, name: str, arch: str, source: str = "registry"):
        super().__init__()
        self.model = model.eval()
        self.name, self.arch, self.source = name, arch, source
        self.num_features = int(model.num_features)
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "Teacher":
        # frozen means eval-mode BatchNorm too, whatever mode a containing module is put in
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.model.forward_features(x)
        return self.model.forward_head(f), f
