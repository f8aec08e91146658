"""Fold a trained EKD student into one deploy-time module that computes the same function.

- BatchNorm is folded into the preceding convolution (eval statistics).
- The branches' first convolutions all read the trunk's output: they become one convolution with
  N times the output channels (and so do first-block projection shortcuts).
- Later convolutions are either merged into grouped convolutions (``groups x N``, layout
  ``grouped``) or kept as N separate convolutions (layout ``separate``). Which is faster depends on
  backend, batch and precision, so ``ekdc export --fold auto`` measures it.
- The N linear heads and the mean collapse into one Linear: weights ``[W_1 .. W_N] / N``, bias the
  mean of the biases. (This is why the student averages logits: probabilities would not fold.)
- Training-only parts (feature adapters) are dropped.

The tests check equivalence the RepVGG way (random BatchNorm statistics, ``eval()``, compare), and
``ekdc export`` compares every folded file with the trained student before writing it.
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import EKDStudent
from ..models.layers import BasicBlock

Layout = Literal["grouped", "separate", "none"]
LAYOUTS = ("grouped", "separate", "none")


@torch.no_grad()
def fuse_conv_bn(conv_bn: nn.Sequential) -> nn.Conv2d:
    """``Conv2d`` (no bias) + ``BatchNorm2d`` in eval mode -> one ``Conv2d`` with a bias."""
    conv, bn = conv_bn[0], conv_bn[1]
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      groups=conv.groups, bias=True)
    fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    fused.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
    return fused


@torch.no_grad()
def merge_convs(convs: list[nn.Conv2d], shared_input: bool) -> nn.Conv2d:
    """N convolutions of the same shape as one. ``shared_input``: they all read the same tensor, so
    their filters are stacked (N x out channels). Otherwise branch i reads channel slice i of a
    stacked tensor: a grouped convolution with N times the groups."""
    c = convs[0]
    if len(convs) == 1:
        return c
    n = len(convs)
    groups = c.groups if shared_input else c.groups * n
    in_ch = c.in_channels if shared_input else c.in_channels * n
    merged = nn.Conv2d(in_ch, c.out_channels * n, c.kernel_size, c.stride, c.padding, groups=groups, bias=True)
    merged.weight.copy_(torch.cat([k.weight for k in convs], 0))
    merged.bias.copy_(torch.cat([k.bias for k in convs], 0))
    return merged


class _MultiBlock(nn.Module):
    """Residual block j of all N branches at once (BN folded).

    ``shared``: every branch reads the same input (the trunk's output). Layout ``grouped`` carries the
    N branches as one channel-stacked tensor; ``separate`` carries a list of N tensors.
    """

    def __init__(self, blocks: list[BasicBlock], layout: Layout, shared: bool):
        super().__init__()
        self.n, self.layout, self.shared = len(blocks), layout, shared
        conv1 = [fuse_conv_bn(b.conv1) for b in blocks]
        conv2 = [fuse_conv_bn(b.conv2) for b in blocks]
        short = [fuse_conv_bn(b.shortcut) for b in blocks] if blocks[0].shortcut is not None else None
        self.out_channels = conv2[0].out_channels
        if layout == "grouped" or shared:
            # a shared input makes the first convolutions one convolution in both layouts
            self.conv1 = merge_convs(conv1, shared)
            self.shortcut = merge_convs(short, shared) if short else None
        else:
            self.conv1 = nn.ModuleList(conv1)
            self.shortcut = nn.ModuleList(short) if short else None
        self.conv2 = merge_convs(conv2, False) if layout == "grouped" else nn.ModuleList(conv2)

    def forward(self, x):
        if self.layout == "grouped":
            out = self.conv2(F.relu(self.conv1(x)))
            if self.shortcut is not None:
                s = self.shortcut(x)
            else:
                s = x.repeat(1, self.n, 1, 1) if (self.shared and self.n > 1) else x
            return F.relu(out + s)
        # separate: a list of N tensors out
        if self.shared:
            mids = torch.split(F.relu(self.conv1(x)), self.out_channels, dim=1)
            shorts = torch.split(self.shortcut(x), self.out_channels, dim=1) if self.shortcut is not None else [x] * self.n
        else:
            mids = [F.relu(c(xi)) for c, xi in zip(self.conv1, x)]
            shorts = [c(xi) for c, xi in zip(self.shortcut, x)] if self.shortcut is not None else list(x)
        return [F.relu(c(m) + s) for c, m, s in zip(self.conv2, mids, shorts)]


class FoldedStudent(nn.Module):
    """The deploy-time student: trunk, all branches as one graph, one Linear computing the mean logits."""

    def __init__(self, student: EKDStudent, layout: Layout):
        super().__init__()
        if layout not in ("grouped", "separate"):
            raise ValueError(f"layout must be grouped or separate, got {layout!r}")
        self.layout = layout
        self.num_branches = student.num_branches
        self.stem = fuse_conv_bn(student.stem)
        self.trunk = nn.Sequential(*[_MultiBlock([b], "grouped", shared=False) for b in student.trunk])
        depth = len(student.branches[0])
        self.branches = nn.ModuleList(
            _MultiBlock([br[j] for br in student.branches], layout, shared=(j == 0)) for j in range(depth)
        )
        n = student.num_branches
        head = nn.Linear(student.num_features * n, student.num_classes)
        with torch.no_grad():
            head.weight.copy_(torch.cat([h.weight for h in student.heads], 1) / n)
            head.bias.copy_(torch.stack([h.bias for h in student.heads]).mean(0))
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(F.relu(self.stem(x)))
        for blk in self.branches:
            h = blk(h)
        if self.layout == "grouped":
            f = F.adaptive_avg_pool2d(h, 1).flatten(1)  # channel order = branch order: [f_1 .. f_N]
        else:
            f = torch.cat([F.adaptive_avg_pool2d(hi, 1).flatten(1) for hi in h], 1)
        return self.head(f)


def _plain_student(student: EKDStudent) -> EKDStudent:
    """The trained student as is (eval mode), training-only adapters dropped: layout ``none``."""
    s = copy.deepcopy(student)
    s.adapters = None
    return s.eval()


def fold(student: EKDStudent, layout: Layout = "grouped") -> nn.Module:
    """A module computing ``student(x)`` (the mean of branch logits) in eval mode, in one graph.

    ``grouped`` and ``separate`` fold BatchNorm, the first branch convolutions and the heads;
    ``none`` returns the student unchanged but for dropped adapters.
    """
    if layout == "none":
        return _plain_student(student)
    was = student.training
    student.eval()
    try:
        return FoldedStudent(student, layout).eval()
    finally:
        student.train(was)
