"""A FastNet student (``student.arch: fastnet_student``): FastNet's whitening and first stages as the
shared trunk, its later stages as N parallel branches, one head each, logits averaged.

``num_branches: 1, widths: [64, 128, 128]`` is FastNet-S itself (airbench93's net). Its deploy-time form
(``fold``) is one graph: every BatchNorm folded into the convolution before it (across the max-pool,
which commutes with a positive per-channel scale, and FastNet's BatchNorm scales are fixed at 1), the
branches' first convolutions stacked into one (they read the same tensor), their later ones grouped
(``groups = N``), and the N heads with the mean and the logit scale collapsed into one Linear. Layout
``padded`` also widens every stage with zero channels to a multiple of 16 (``folding.PAD_CHANNELS``), which
keeps ONNX Runtime's grouped convolutions on their fast path; ``ekdc export`` times both and keeps the faster.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, field_validator

from ..settings import StrictSettings
from ._registry import PlanSpace, register_student, widths_between
from .fastnet import LOGIT_SCALE, Whitening, _Stage, fast_param_groups, make_stages
from .folding import PAD_CHANNELS, fuse_conv_bn, merge_convs, pad_conv, padded
from .student import BranchOutputs


class FastNetStudentSettings(StrictSettings):
    """``student:`` keys of ``arch: fastnet_student`` (beside ``num_branches``)."""

    widths: list[int] = Field(default_factory=lambda: [64, 128, 128], min_length=1, max_length=5,
                              description="each stage's channels (each stage halves the resolution)")
    trunk_stages: int = Field(1, ge=0, description="how many of the stages the branches share")

    @field_validator("widths")
    @classmethod
    def _positive(cls, v):
        if any(w < 1 for w in v):
            raise ValueError("every width must be >= 1")
        return v


class FastNetStudent(nn.Module):
    accepted_layouts = ("grouped", "padded")  # --fold takes both; padded is grouped's graph for whole blocks

    @property
    def fold_layouts(self) -> tuple[str, ...]:
        """``padded`` where it is another graph: where some width is not a multiple of 16."""
        widths = self.config["widths"]
        return ("grouped", "padded") if any(w != padded(w) for w in widths) else ("grouped",)

    def __init__(self, num_classes: int, num_branches: int = 1, widths=(64, 128, 128), trunk_stages: int = 1):
        super().__init__()
        widths = list(widths)
        if not 0 <= trunk_stages <= len(widths) or (trunk_stages == len(widths) and num_branches > 1):
            raise ValueError(f"trunk_stages must leave each of {num_branches} branches a stage of the {len(widths)}")
        self.config = dict(num_branches=num_branches, widths=widths, trunk_stages=trunk_stages)
        self.num_branches, self.num_classes = num_branches, num_classes
        self.register_buffer("whitened", torch.zeros((), dtype=torch.bool))
        self.whiten = Whitening(2)
        self.trunk = make_stages(self.whiten.out_channels, widths[:trunk_stages])
        c_trunk = widths[trunk_stages - 1] if trunk_stages else self.whiten.out_channels
        self.branches = nn.ModuleList(make_stages(c_trunk, widths[trunk_stages:]) for _ in range(num_branches))
        self.num_features = widths[-1]
        self.heads = nn.ModuleList(nn.Linear(widths[-1], num_classes, bias=False) for _ in range(num_branches))
        self.adapters: Optional[nn.ModuleList] = None

    def param_groups(self) -> list[dict]:
        return fast_param_groups(self)

    def init_from_data(self, images: torch.Tensor) -> None:
        self.whiten.init_from_data(images)
        self.whitened.fill_(True)

    def set_adapters(self, teacher_dims: list[int]) -> None:
        """Training-only linear adapters A_i mapping branch i's features to teacher i's feature size."""
        if len(teacher_dims) != self.num_branches:
            raise ValueError(f"need {self.num_branches} teacher feature sizes, got {len(teacher_dims)}")
        self.adapters = nn.ModuleList(nn.Linear(self.num_features, d) for d in teacher_dims)

    def forward(self, x: torch.Tensor, return_branches: bool = False):
        h = self.trunk(F.gelu(self.whiten(x)))
        feats = [torch.amax(b(h), dim=(2, 3)) for b in self.branches]
        logits = torch.stack([head(f) * LOGIT_SCALE for head, f in zip(self.heads, feats)])
        if not return_branches:
            return logits.mean(0)
        adapted = [a(f) for a, f in zip(self.adapters, feats)] if self.adapters is not None else None
        return BranchOutputs(logits, torch.stack(feats), adapted)

    def fold(self, layout: str = "grouped") -> nn.Module:
        return FoldedFastNetStudent(self, pad_to=PAD_CHANNELS if layout == "padded" else 1)


def _fused_stage(stages: list[_Stage], shared: bool, c_in: int, pad_to: int) -> nn.Sequential:
    """Stage j of every branch as one: conv+BN fused (before the pool: exact, as the scale is positive),
    each branch's channels padded with zeros to a multiple of ``pad_to`` (its input: ``c_in``, the padded
    width before it), then the first convolutions stacked when the branches share their input, grouped
    otherwise."""
    convs = []
    for ci, bi in ((0, 2), (4, 5)):
        fused = []
        for st in stages:
            bn = st[bi]
            if (bn.weight <= 0).any():  # max-pool commutes with a positive scale only
                raise ValueError("a FastNet BatchNorm scale is not positive: it cannot fold across the max-pool")
            conv = fuse_conv_bn(nn.Sequential(st[ci], bn))
            wide = padded(conv.out_channels, pad_to)
            fused.append(pad_conv(conv, wide, c_in if ci == 0 else wide))
        convs.append(merge_convs(fused, shared_input=shared and ci == 0))
    return nn.Sequential(convs[0], nn.MaxPool2d(2), nn.GELU(), convs[1], nn.GELU())


class FoldedFastNetStudent(nn.Module):
    def __init__(self, student: FastNetStudent, pad_to: int = 1):
        super().__init__()
        w = student.whiten
        self.whiten = nn.Conv2d(3, w.out_channels, w.kernel_size, padding=0, bias=True)
        with torch.no_grad():
            self.whiten.weight.copy_(w.weight)
            self.whiten.bias.copy_(w.bias)
        c_in, trunk = w.out_channels, []  # the whitening's 24 channels are the input: never padded
        for st in student.trunk:
            trunk.append(_fused_stage([st], shared=False, c_in=c_in, pad_to=pad_to))
            c_in = padded(st[0].out_channels, pad_to)
        self.trunk = nn.Sequential(*trunk)
        branches = []
        for j in range(len(student.branches[0])):
            branches.append(_fused_stage([br[j] for br in student.branches], shared=(j == 0), c_in=c_in, pad_to=pad_to))
            c_in = padded(student.branches[0][j][0].out_channels, pad_to)
        self.branches = nn.Sequential(*branches)
        n, f = student.num_branches, student.num_features
        self.head = nn.Linear(c_in * n, student.num_classes, bias=False)
        with torch.no_grad():  # channel order after the grouped stages is branch order: [f_1 .. f_N], each
            # padded with zero weights for its padded (zero) features
            weight = self.head.weight.zero_().view(student.num_classes, n, c_in)
            for i, h in enumerate(student.heads):
                weight[:, i, :f] = h.weight * (LOGIT_SCALE / n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.branches(self.trunk(F.gelu(self.whiten(x))))
        return self.head(torch.amax(h, dim=(2, 3)))


PLAN_WIDTH_STEP = 8  # every planned or widened width is a multiple of this


def scaled_widths(widths: list[int], m: float) -> list[int]:
    """Every width scaled by ``m`` and kept a multiple of 8 (odd widths run slowly on SIMD units, which would
    bias a latency comparison)."""
    return [max(PLAN_WIDTH_STEP, PLAN_WIDTH_STEP * round(w * m / PLAN_WIDTH_STEP)) for w in widths]


def one_branch_widened(config: dict, m: float) -> dict:
    """One branch of ``config``'s layout, every width scaled by ``m`` (``scaled_widths``)."""
    return {**config, "num_branches": 1, "widths": scaled_widths(config["widths"], m)}


# ``ekdc plan``'s grid for a FastNet student: the recipe's own stages, every width scaled by one factor
# (``scaled_widths``), from half to three times the given widths
PLAN_WIDTH_MULTIPLIERS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0)


def plan_grid(config: dict) -> list[dict]:
    """The recipe student's layout at each width factor (duplicates after rounding dropped)."""
    grid: list[dict] = []
    for m in PLAN_WIDTH_MULTIPLIERS:
        cand = {"widths": scaled_widths(config["widths"], m)}
        if cand not in grid:
            grid.append(cand)
    return grid


@register_student(settings=FastNetStudentSettings, one_branch_widened=one_branch_widened,
                  plan=PlanSpace(grid=plan_grid, stages=lambda c: len(c["widths"]), kept=("trunk_stages",),
                                between=lambda a, b: widths_between(a, b, PLAN_WIDTH_STEP, ("widths",))))
def fastnet_student(num_classes: int = 10, **kwargs) -> FastNetStudent:
    return FastNetStudent(num_classes, **kwargs)
