"""The EKD student: a shared trunk, then N parallel branches of identical layout, each with its own
linear head. Its output is the mean of the branch logits (averaging logits, not probabilities, is what
lets ``ekdc.deploy.fold`` collapse the heads and the mean into one Linear)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._registry import register_model
from .layers import BasicBlock, conv_bn, init_weights


class BranchOutputs(NamedTuple):
    logits: torch.Tensor  # [N, B, C] per-branch logits
    features: torch.Tensor  # [N, B, D] pooled per-branch features
    adapted: Optional[list[torch.Tensor]]  # per-branch features through the training-only adapters


class EKDStudent(nn.Module):
    def __init__(
        self,
        num_classes: int,
        num_branches: int = 3,
        trunk_width: int = 16,
        trunk_blocks: int = 1,
        branch_widths: tuple[int, ...] | list[int] = (32, 64),
        branch_blocks: int = 1,
    ):
        super().__init__()
        self.config = dict(
            num_branches=num_branches,
            trunk_width=trunk_width,
            trunk_blocks=trunk_blocks,
            branch_widths=list(branch_widths),
            branch_blocks=branch_blocks,
        )
        self.num_branches = num_branches
        self.num_classes = num_classes
        self.stem = conv_bn(3, trunk_width, 3, 1)
        self.trunk = nn.Sequential(*[BasicBlock(trunk_width, trunk_width) for _ in range(trunk_blocks)])
        self.branches = nn.ModuleList(self._branch(trunk_width, branch_widths, branch_blocks) for _ in range(num_branches))
        self.num_features = branch_widths[-1]
        self.heads = nn.ModuleList(nn.Linear(self.num_features, num_classes) for _ in range(num_branches))
        self.adapters: Optional[nn.ModuleList] = None
        init_weights(self)

    @staticmethod
    def _branch(c_in: int, widths, blocks: int) -> nn.Sequential:
        layers = []
        for i, w in enumerate(widths):
            for j in range(blocks):
                # the first stage keeps the resolution; each later stage halves it
                layers.append(BasicBlock(c_in, w, 2 if (i > 0 and j == 0) else 1))
                c_in = w
        return nn.Sequential(*layers)

    def set_adapters(self, teacher_dims: list[int]) -> None:
        """Training-only linear adapters A_i mapping branch i's features to teacher i's feature size."""
        if len(teacher_dims) != self.num_branches:
            raise ValueError(f"need {self.num_branches} teacher feature sizes, got {len(teacher_dims)}")
        self.adapters = nn.ModuleList(nn.Linear(self.num_features, d) for d in teacher_dims)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(F.relu(self.stem(x)))

    def forward(self, x: torch.Tensor, return_branches: bool = False):
        h = self.forward_trunk(x)
        feats = [F.adaptive_avg_pool2d(b(h), 1).flatten(1) for b in self.branches]
        logits = torch.stack([head(f) for head, f in zip(self.heads, feats)])
        if not return_branches:
            return logits.mean(0)
        adapted = [a(f) for a, f in zip(self.adapters, feats)] if self.adapters is not None else None
        return BranchOutputs(logits, torch.stack(feats), adapted)


@register_model
def ekd_student(num_classes: int = 10, **kwargs) -> EKDStudent:
    return EKDStudent(num_classes, **kwargs)
