"""The EKD student: a shared trunk, then N parallel branches of identical layout, each with its own
linear head. Its output is the mean of the branch logits (averaging logits, not probabilities, is what
lets ``ekdc.deploy.fold`` collapse the heads and the mean into one Linear)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._registry import PlanSpace, register_student, widths_between
from .layers import BasicBlock, InvertedResidual, conv_bn, init_weights
from .student_fold import FoldedStudent

STEMS = ("cifar", "imagenet")
BLOCKS = ("basic", "inverted_residual")


class BranchOutputs(NamedTuple):
    logits: torch.Tensor  # [N, B, C] per-branch logits
    features: torch.Tensor  # [N, B, D] pooled per-branch features
    adapted: Optional[list[torch.Tensor]]  # per-branch features through the training-only adapters


class EKDStudent(nn.Module):
    fold_layouts = ("grouped", "separate")

    def __init__(
        self,
        num_classes: int,
        num_branches: int = 3,
        trunk_width: int = 16,
        trunk_blocks: int = 1,
        branch_widths: tuple[int, ...] | list[int] = (32, 64),
        branch_blocks: int = 1,
        stem: str = "cifar",
        block: str = "basic",
        expand_ratio: int = 6,
    ):
        super().__init__()
        if stem not in STEMS or block not in BLOCKS:
            raise ValueError(f"stem must be one of {STEMS} and block one of {BLOCKS}")
        self.config = dict(
            num_branches=num_branches,
            trunk_width=trunk_width,
            trunk_blocks=trunk_blocks,
            branch_widths=list(branch_widths),
            branch_blocks=branch_blocks,
            stem=stem,
            block=block,
            expand_ratio=expand_ratio,
        )
        self.num_branches = num_branches
        self.num_classes = num_classes
        # cifar: 3x3 stride 1 (32 px images); imagenet: two 3x3 stride-2 convolutions, a quarter of the
        # resolution before the trunk (photos at 128-224 px)
        self.stem = conv_bn(3, trunk_width, 3, 1) if stem == "cifar" else \
            nn.Sequential(conv_bn(3, trunk_width, 3, 2), nn.ReLU(), conv_bn(trunk_width, trunk_width, 3, 2))
        self.trunk = nn.Sequential(*[self._make_block(trunk_width, trunk_width, 1) for _ in range(trunk_blocks)])
        self.branches = nn.ModuleList(self._branch(trunk_width, branch_widths, branch_blocks) for _ in range(num_branches))
        self.num_features = branch_widths[-1]
        self.heads = nn.ModuleList(nn.Linear(self.num_features, num_classes) for _ in range(num_branches))
        self.adapters: Optional[nn.ModuleList] = None
        init_weights(self)

    def _branch(self, c_in: int, widths, blocks: int) -> nn.Sequential:
        layers = []
        for i, w in enumerate(widths):
            for j in range(blocks):
                # the first stage keeps the resolution; each later stage halves it
                layers.append(self._make_block(c_in, w, 2 if (i > 0 and j == 0) else 1))
                c_in = w
        return nn.Sequential(*layers)

    def _make_block(self, c_in: int, c_out: int, stride: int) -> nn.Module:
        if self.config["block"] == "basic":
            return BasicBlock(c_in, c_out, stride)
        return InvertedResidual(c_in, c_out, stride, self.config["expand_ratio"])

    def stem_convs(self) -> list[nn.Sequential]:
        """The stem's conv+BN pairs, each followed by a ReLU."""
        return [self.stem] if self.config["stem"] == "cifar" else [self.stem[0], self.stem[2]]

    def set_adapters(self, teacher_dims: list[int]) -> None:
        """Training-only linear adapters A_i mapping branch i's features to teacher i's feature size."""
        if len(teacher_dims) != self.num_branches:
            raise ValueError(f"need {self.num_branches} teacher feature sizes, got {len(teacher_dims)}")
        self.adapters = nn.ModuleList(nn.Linear(self.num_features, d) for d in teacher_dims)

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(F.relu(self.stem(x)))

    def fold(self, layout: str = "grouped") -> nn.Module:
        """The deploy-time form: one graph, BatchNorm folded, the branches merged (``student_fold``)."""
        return FoldedStudent(self, layout)

    def forward(self, x: torch.Tensor, return_branches: bool = False):
        h = self.forward_trunk(x)
        feats = [F.adaptive_avg_pool2d(b(h), 1).flatten(1) for b in self.branches]
        logits = torch.stack([head(f) for head, f in zip(self.heads, feats)])
        if not return_branches:
            return logits.mean(0)
        adapted = [a(f) for a, f in zip(self.adapters, feats)] if self.adapters is not None else None
        return BranchOutputs(logits, torch.stack(feats), adapted)


def one_branch_widened(config: dict, m: float) -> dict:
    """One branch of ``config``'s layout, the trunk and every branch width scaled by ``m``."""
    w = lambda x: max(1, int(round(x * m)))  # noqa: E731
    return {**config, "num_branches": 1, "trunk_width": w(config["trunk_width"]),
            "branch_widths": [w(x) for x in config["branch_widths"]]}


# ``ekdc plan``'s default grid: widths as multiples of a base (trunk 16, stage i 16 * 2**i), 2 or 3 branch
# stages, 1 or 2 blocks per stage (trunk included); basic blocks over the whole grid, inverted residuals at
# two widths. The grid does not depend on the recipe's student: a budget may call for another depth.
PLAN_WIDTH_MULTIPLIERS = (0.5, 0.75, 1.0, 1.5, 2.0)
PLAN_BASE_WIDTH = 16
PLAN_STAGE_COUNTS = (2, 3)
PLAN_DEPTHS = (1, 2)
PLAN_INVERTED_RESIDUAL_MULTIPLIERS = (1.0, 2.0)
PLAN_WIDTH_KEYS = ("trunk_width", "branch_widths")  # what plan's finer pass moves between two grid students
PLAN_WIDTH_STEP = 4  # widths are rounded to a multiple of this: kernels like channel counts in 4s and 8s


def _plan_width(base: int, multiplier: float) -> int:
    return max(PLAN_WIDTH_STEP, int(round(base * multiplier / PLAN_WIDTH_STEP)) * PLAN_WIDTH_STEP)


def _plan_config(multiplier: float, stages: int, depth: int, block: str) -> dict:
    return {"trunk_width": _plan_width(PLAN_BASE_WIDTH, multiplier), "trunk_blocks": depth,
            "branch_widths": [_plan_width(PLAN_BASE_WIDTH * 2**i, multiplier) for i in range(stages)],
            "branch_blocks": depth, "block": block}


def plan_grid(config: Optional[dict] = None) -> list[dict]:
    """The default grid (24 students): the planned keys of each; the stem and branch count are the recipe's."""
    grid = [_plan_config(m, s, d, "basic") for s in PLAN_STAGE_COUNTS for d in PLAN_DEPTHS
            for m in PLAN_WIDTH_MULTIPLIERS]
    grid += [_plan_config(m, s, 1, "inverted_residual") for s in PLAN_STAGE_COUNTS
             for m in PLAN_INVERTED_RESIDUAL_MULTIPLIERS]
    return grid


@register_student(one_branch_widened=one_branch_widened,
                  plan=PlanSpace(grid=plan_grid, stages=lambda c: len(c["branch_widths"]), kept=("stem",),
                                between=lambda a, b: widths_between(a, b, PLAN_WIDTH_STEP, PLAN_WIDTH_KEYS)))
def ekd_student(num_classes: int = 10, **kwargs) -> EKDStudent:
    return EKDStudent(num_classes, **kwargs)
