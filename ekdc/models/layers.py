"""Layers shared by the model families."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_bn(c_in: int, c_out: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out))


class FoldSpec(NamedTuple):
    """A block as ``ekdc.deploy.fold`` sees it: conv+BN pairs applied in order, each followed by its
    activation; then the shortcut added (``"identity"``, a conv+BN, or None for no residual); then
    ``post_act``. Any block that describes itself so folds exactly."""

    convs: list[nn.Sequential]
    acts: list[Optional[str]]  # None, "relu" or "relu6"
    shortcut: Union[str, nn.Sequential, None]
    post_act: Optional[str]


class BasicBlock(nn.Module):
    """Post-activation residual block (He et al.): conv-BN-ReLU-conv-BN, plus shortcut, ReLU.

    The shortcut is the identity, or a 1x1 conv + BN when the shape changes (option B).
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn(c_in, c_out, 3, stride)
        self.conv2 = conv_bn(c_out, c_out, 3, 1)
        self.shortcut = conv_bn(c_in, c_out, 1, stride) if (stride != 1 or c_in != c_out) else None

    def fold_spec(self) -> FoldSpec:
        return FoldSpec([self.conv1, self.conv2], ["relu", None], "identity" if self.shortcut is None else self.shortcut, "relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = self.conv2(out)
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expand (skipped at expansion 1), 3x3 depthwise, 1x1 linear projection;
    the input is added back where the shape allows (stride 1, same width)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, expand_ratio: int = 6):
        super().__init__()
        hidden = c_in * expand_ratio
        self.expand = conv_bn(c_in, hidden, 1) if expand_ratio != 1 else None
        self.depthwise = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = conv_bn(hidden, c_out, 1)
        self.residual = stride == 1 and c_in == c_out

    def fold_spec(self) -> FoldSpec:
        convs = ([self.expand] if self.expand is not None else []) + [self.depthwise, self.project]
        acts = (["relu6"] if self.expand is not None else []) + ["relu6", None]
        return FoldSpec(convs, acts, "identity" if self.residual else None, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else F.relu6(self.expand(x))
        out = self.project(F.relu6(self.depthwise(out)))
        return out + x if self.residual else out


class FeatureClassifier(nn.Module):
    """The interface every model here shares: ``forward_features`` gives pooled penultimate features
    ``[B, num_features]``; ``forward_head`` maps them to logits; ``forward`` is both."""

    num_features: int

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)
