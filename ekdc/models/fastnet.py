"""A fast-training CIFAR net after airbench (Jordan 2024, arXiv 2404.00498): a frozen patch-whitening
first layer, then three stages of conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU, global max
pooling and one Linear. Few, wide layers at falling resolution make it cheap per image on SIMD CPUs and
GPUs alike; the whitening layer (set from the training images before the first step) removes the
pixels' correlations so that the first epochs are not spent learning to.

Why each part (from airbench's ablations, re-read here, not copied):
- whitening: a 2x2 convolution whose filters are the eigenvectors of the training patches' covariance,
  scaled by 1/sqrt(eigenvalue), and their negatives (so a GELU after it keeps both signs); frozen, since
  training it gains nothing and costs steps;
- max-pooling right after each stage's first conv: the BN and activation then run at a quarter of the
  pixels;
- GELU rather than ReLU, and a global max pool: both measured better by airbench at this size.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._registry import register_model
from .layers import FeatureClassifier


def _bn(c: int) -> nn.BatchNorm2d:
    # scale fixed at 1, shift trained: the convolution before it is then scale-invariant, and the shift
    # (in units of the channel's spread) can learn at a far higher rate than the filters (param_groups)
    bn = nn.BatchNorm2d(c, momentum=0.4)  # running statistics that keep up with a few hundred fast steps
    bn.weight.requires_grad_(False)
    return bn


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    # the first c_in filters start as the identity, the rest at random: the signal passes unchanged
    # through the untrained net, so the first steps already train every layer
    nn.init.dirac_(conv.weight[: min(c_in, c_out)])
    return conv


class _Stage(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(_conv(c_in, c_out), nn.MaxPool2d(2), _bn(c_out), nn.GELU(),
                         _conv(c_out, c_out), _bn(c_out), nn.GELU())


LOGIT_SCALE = 1 / 9  # small logits at the start, and a slower-learning head, at a high learning rate


class Whitening(nn.Conv2d):
    """The frozen kxk patch-whitening convolution: 2 x 3k^2 filters (each eigenvector and its negative)."""

    def __init__(self, k: int = 2):
        super().__init__(3, 2 * 3 * k * k, k, padding=0, bias=True)
        self.weight.requires_grad_(False)  # set by init_from_data; its bias still trains

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """The filters from training images (normalised as the model sees them, [N,3,H,W]): the
        eigenvectors of their kxk patches' covariance over sqrt(eigenvalue + eps), and their negatives."""
        k = self.kernel_size[0]
        patches = images.float().unfold(2, k, 1).unfold(3, k, 1)  # [N,3,H',W',k,k]
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3 * k * k)
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        eigval, eigvec = torch.linalg.eigh(cov.double())
        filters = (eigvec.T / torch.sqrt(eigval.clamp_min(0) + eps)[:, None]).float().reshape(-1, 3, k, k)
        self.weight.copy_(torch.cat([filters, -filters]))
        self.bias.zero_()


def fast_param_groups(model: nn.Module) -> list[dict]:
    """The BatchNorm shifts at 64x the learning rate (and 1/64 the weight decay, so that their decay per
    step stays that of the rest); everything else as the schedule says."""
    shifts = [m.bias for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    ids = {id(p) for p in shifts}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return [{"params": rest, "lr_scale": 1.0}, {"params": shifts, "lr_scale": 64.0, "wd_scale": 1 / 64}]


def make_stages(c_in: int, widths) -> nn.Sequential:
    stages = []
    for w in widths:
        stages.append(_Stage(c_in, w))
        c_in = w
    return nn.Sequential(*stages)


class FastNet(FeatureClassifier):
    def __init__(self, widths: tuple[int, int, int], num_classes: int, whiten_patch: int = 2):
        super().__init__()
        self.register_buffer("whitened", torch.zeros((), dtype=torch.bool))  # saved: was init_from_data run
        self.whiten = Whitening(whiten_patch)
        self.stages = make_stages(self.whiten.out_channels, widths)
        self.num_features = widths[-1]
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = LOGIT_SCALE

    def param_groups(self) -> list[dict]:
        return fast_param_groups(self)

    def init_from_data(self, images: torch.Tensor) -> None:
        self.whiten.init_from_data(images)
        self.whitened.fill_(True)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(F.gelu(self.whiten(x)))
        return torch.amax(x, dim=(2, 3))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f) * self.logit_scale


@register_model
def fastnet_s(num_classes: int = 10) -> FastNet:
    """64/128/128 channels."""
    return FastNet((64, 128, 128), num_classes)


@register_model
def fastnet_m(num_classes: int = 10) -> FastNet:
    """64/256/256 channels: airbench94's widths."""
    return FastNet((64, 256, 256), num_classes)


@register_model
def fastnet_l(num_classes: int = 10) -> FastNet:
    """128/384/384 channels: airbench96's widths, with one conv a stage fewer."""
    return FastNet((128, 384, 384), num_classes)
