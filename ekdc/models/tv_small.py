"""torchvision ResNets adapted to small (32x32) inputs: a 3x3 stride-1 stem and no max-pool."""
from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from ._registry import register_model
from .layers import FeatureClassifier


class SmallInputResNet(FeatureClassifier):
    def __init__(self, name: str, num_classes: int):
        super().__init__()
        net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
        self.fc = net.fc
        net.fc = nn.Identity()
        self.body = net  # torchvision's forward: stem, layers, avgpool, flatten (fc is now Identity)
        self.num_features = self.fc.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@register_model
def resnet18(num_classes: int = 10) -> SmallInputResNet:
    return SmallInputResNet("resnet18", num_classes)


@register_model
def resnet34(num_classes: int = 10) -> SmallInputResNet:
    return SmallInputResNet("resnet34", num_classes)
