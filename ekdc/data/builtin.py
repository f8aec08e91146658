"""The data sets that come as tensors: torchvision's CIFAR, scikit-learn's digits, and synthetic data."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from .registry import Sources, register_dataset
from .sources import TensorSource


def _torchvision_cifar(cfg, cls_name: str) -> Sources:
    """The official training split (from which validation is carved, like every data set here)."""
    import torchvision

    root = cfg.root or "data"
    try:
        ds = getattr(torchvision.datasets, cls_name)(root, train=True, download=cfg.download)
    except RuntimeError as err:
        raise UserError(
            f"data.root: {cls_name} not found under '{root}' ({str(err).splitlines()[0]}); "
            "set data.download: true to fetch it"
        ) from None
    x = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return Sources(TensorSource(x, np.asarray(ds.targets, dtype=np.int64), list(ds.classes)))


@register_dataset("cifar10")
def cifar10(cfg) -> Sources:
    return _torchvision_cifar(cfg, "CIFAR10")


@register_dataset("cifar100")
def cifar100(cfg) -> Sources:
    return _torchvision_cifar(cfg, "CIFAR100")


@register_dataset("digits")
def digits(cfg) -> Sources:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images): offline, in every install."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))[:, None].repeat(1, 3, 1, 1)
    return Sources(TensorSource(x, d.target.astype(np.int64), [str(i) for i in range(10)]))


@register_dataset("synthetic")
def synthetic(cfg) -> Sources:
    """Learnable random data for tests: one smooth random template per class, plus noise."""
    g = torch.Generator().manual_seed(1234)
    k, n, s = cfg.num_classes, cfg.num_samples, cfg.image_size
    templates = F.interpolate(torch.rand(k, 3, 4, 4, generator=g), size=(s, s), mode="bilinear", align_corners=False)
    labels = torch.arange(n) % k
    x = templates[labels] * 0.7 + torch.rand(n, 3, s, s, generator=g) * 0.3
    return Sources(TensorSource((x * 255).round().to(torch.uint8), labels.numpy(), [f"class_{i}" for i in range(k)]))
