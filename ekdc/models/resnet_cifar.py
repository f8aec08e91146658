"""CIFAR ResNets (He et al. 2016, section 4.2): 6n+2 layers, stages of 16/32/64 channels."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._registry import register_model
from .layers import BasicBlock, FeatureClassifier, conv_bn, init_weights


class ResNetCifar(FeatureClassifier):
    def __init__(self, depth: int, num_classes: int, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n+2")
        n = (depth - 2) // 6
        self.stem = conv_bn(3, widths[0], 3, 1)
        layers, c_in = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(n):
                layers.append(BasicBlock(c_in, w, 2 if (i > 0 and j == 0) else 1))
                c_in = w
        self.layers = nn.Sequential(*layers)
        self.num_features = c_in
        self.fc = nn.Linear(c_in, num_classes)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.stem(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


@register_model
def resnet20(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(20, num_classes)


@register_model
def resnet32(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(32, num_classes)


@register_model
def resnet56(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(56, num_classes)


@register_model
def resnet110(num_classes: int = 10) -> ResNetCifar:
    return ResNetCifar(110, num_classes)


@register_model
def resnet8(num_classes: int = 10) -> ResNetCifar:
    """Tiny: for quick recipes and tests."""
    return ResNetCifar(8, num_classes)
