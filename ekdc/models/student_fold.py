"""The EKD student's deploy-time form (``EKDStudent.fold``): one module computing the same function.

- BatchNorm is folded into the preceding convolution (eval statistics).
- The branches' first convolutions all read the trunk's output: dense ones become one convolution with
  N times the output channels (and so do first-block projection shortcuts); a grouped or depthwise one
  (an inverted-residual block with expansion 1) runs as one grouped convolution over N copies of the
  input, since stacking its filters would make each group read the wrong channels.
- Any block that describes itself with a ``FoldSpec`` (the basic residual block, the inverted
  residual) folds; the stem's convolutions fold in place.
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

import torch
import torch.nn as nn
import torch.nn.functional as F

from .folding import _stack_shared, fuse_conv_bn, merge_convs

_ACTS = {None: lambda x: x, "relu": F.relu, "relu6": F.relu6}


class _MultiBlock(nn.Module):
    """Block j of all N branches at once, BatchNorm folded, for any block with a ``fold_spec``.

    ``shared``: every branch reads the same input (the trunk's output). str ``grouped`` carries the N
    branches as one channel-stacked tensor; ``separate`` carries a list of N tensors.
    """

    def __init__(self, blocks: list[nn.Module], layout: str, shared: bool):
        super().__init__()
        specs = [b.fold_spec() for b in blocks]
        self.n, self.layout, self.shared = len(blocks), layout, shared
        self.acts = specs[0].acts
        self.post_act = specs[0].post_act
        self.residual = specs[0].shortcut if isinstance(specs[0].shortcut, str) or specs[0].shortcut is None else "conv"
        per_conv = [[fuse_conv_bn(s.convs[j]) for s in specs] for j in range(len(self.acts))]
        short = [fuse_conv_bn(s.shortcut) for s in specs] if self.residual == "conv" else None
        self.repeat_input = False
        if layout == "grouped" or shared:
            # a shared input makes the first convolutions (and a projection shortcut) one in both layouts
            first, self.repeat_input = _stack_shared(per_conv[0]) if shared else (merge_convs(per_conv[0], False), False)
            self.first = first
            self.shortcut = None
            if short is not None:
                self.shortcut, self.repeat_short = _stack_shared(short) if shared else (merge_convs(short, False), False)
        else:
            self.first = nn.ModuleList(per_conv[0])
            self.shortcut = nn.ModuleList(short) if short else None
        rest = per_conv[1:]
        if layout == "grouped":
            self.rest = nn.ModuleList(merge_convs(c, False) for c in rest)
        else:
            self.rest = nn.ModuleList(nn.ModuleList(c) for c in rest)
        self.out_channels = per_conv[-1][0].out_channels

    def _first_grouped(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x.repeat(1, self.n, 1, 1) if self.repeat_input else x)

    def forward(self, x):
        if self.layout == "grouped":
            h = _ACTS[self.acts[0]](self._first_grouped(x))
            for conv, act in zip(self.rest, self.acts[1:]):
                h = _ACTS[act](conv(h))
            return _ACTS[self.post_act](h + self._shortcut_grouped(x)) if self.residual else h
        # separate: a list of N tensors out
        if self.shared:
            hs = list(torch.split(_ACTS[self.acts[0]](self._first_grouped(x)), self.first.out_channels // self.n, dim=1))
        else:
            hs = [_ACTS[self.acts[0]](c(xi)) for c, xi in zip(self.first, x)]
        for convs, act in zip(self.rest, self.acts[1:]):
            hs = [_ACTS[act](c(h)) for c, h in zip(convs, hs)]
        if not self.residual:
            return hs
        return [_ACTS[self.post_act](h + s) for h, s in zip(hs, self._shortcut_separate(x))]

    def _shortcut_grouped(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual == "conv":
            return self.shortcut(x.repeat(1, self.n, 1, 1) if self.shared and self.repeat_short else x)
        return x.repeat(1, self.n, 1, 1) if (self.shared and self.n > 1) else x

    def _shortcut_separate(self, x) -> list[torch.Tensor]:
        if self.residual == "conv":
            if self.shared:
                s = self.shortcut(x.repeat(1, self.n, 1, 1) if self.repeat_short else x)
                return list(torch.split(s, self.out_channels, dim=1))
            return [c(xi) for c, xi in zip(self.shortcut, x)]
        return [x] * self.n if self.shared else list(x)


class FoldedStudent(nn.Module):
    """The deploy-time student: trunk, all branches as one graph, one Linear computing the mean logits."""

    def __init__(self, student: nn.Module, layout: str):  # an EKDStudent (student.py imports this module)
        super().__init__()
        if layout not in ("grouped", "separate"):
            raise ValueError(f"layout must be grouped or separate, got {layout!r}")
        self.layout = layout
        self.num_branches = student.num_branches
        self.stem = nn.Sequential(*[m for c in student.stem_convs() for m in (fuse_conv_bn(c), nn.ReLU())])
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
        h = self.trunk(self.stem(x))
        for blk in self.branches:
            h = blk(h)
        if self.layout == "grouped":
            f = F.adaptive_avg_pool2d(h, 1).flatten(1)  # channel order = branch order: [f_1 .. f_N]
        else:
            f = torch.cat([F.adaptive_avg_pool2d(hi, 1).flatten(1) for hi in h], 1)
        return self.head(f)
