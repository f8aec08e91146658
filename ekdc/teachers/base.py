"""The teacher interface: whatever a teacher is made from, distillation sees a frozen function from
images (RGB in [0,1] at the student's size) to logits over the data's classes, with pooled features
where the model has them. Resizing, normalisation, channel order and class order are the teacher's job,
so the distiller, ``teachers.onnx`` and the metrics never ask where a teacher came from.
"""
from __future__ import annotations

import hashlib
import json
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class Preprocess(nn.Module):
    """RGB images in [0,1] -> a model's input: resized to ``size`` (bilinear), normalised, and for
    models that want it, in BGR order and NHWC layout."""

    def __init__(self, size: int, mean: list[float], std: list[float], bgr: bool = False, nhwc: bool = False):
        super().__init__()
        self.size, self.bgr, self.nhwc = int(size), bool(bgr), bool(nhwc)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def spec(self) -> dict:
        return {"input_size": self.size, "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        x = (x - self.mean) / self.std
        if self.bgr:
            x = x.flip(1)
        return x.permute(0, 2, 3, 1) if self.nhwc else x


class Teacher(nn.Module):
    """A frozen teacher: ``model`` behind its ``pre``-processing, its outputs (log-probabilities where
    the model gives probabilities) picked and ordered as the data's classes by ``class_index``."""

    def __init__(self, model: nn.Module, pre: Preprocess, *, name: str, arch: str, source: str,
                 class_index: Optional[list[int]] = None, probabilities: bool = False, head: Optional[nn.Linear] = None,
                 tta: str = "none"):
        super().__init__()
        self.model, self.pre = model.eval(), pre
        self.tta = tta  # "flip": the logits of the image and its mirror image, averaged
        self.name, self.arch, self.source = name, arch, source
        self.probabilities = probabilities
        self.head = head  # the final Linear, whose input is the pooled features (None: no features)
        index = torch.tensor(class_index if class_index is not None else [], dtype=torch.long)
        self.register_buffer("class_index", index, persistent=False)
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def has_features(self) -> bool:
        return self.head is not None

    @property
    def num_features(self) -> int:
        if self.head is None:
            raise ValueError(f"teacher {self.name} ({self.source}) has no features to match")
        return int(self.head.in_features)

    @property
    def input_size(self) -> int:
        return self.pre.size

    def fingerprint(self) -> str:
        """A hash of everything the teacher's outputs depend on: its weights (an ONNX teacher's file),
        its preprocessing and its class order. Teacher-output caches are keyed by it."""
        h = hashlib.sha256(json.dumps({
            "arch": self.arch, "source": self.source, "pre": self.pre.spec(), "bgr": self.pre.bgr,
            "nhwc": self.pre.nhwc, "class_index": self.class_index.tolist(), "probabilities": self.probabilities,
            **({"tta": self.tta} if self.tta != "none" else {}),
        }, sort_keys=True).encode())
        file_hash = getattr(self.model, "content_hash", None)
        if file_hash is not None:
            h.update(file_hash().encode())
        for name, t in sorted(self.model.state_dict().items()):
            h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def train(self, mode: bool = True) -> "Teacher":
        # frozen means eval-mode BatchNorm too, whatever mode a containing module is put in
        return super().train(False)

    def _once(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.model(self.pre(pixels))
        if self.probabilities:
            out = out.float().clamp_min(1e-12).log()
        return out.index_select(1, self.class_index) if self.class_index.numel() else out

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self._once(pixels)
        if self.tta == "flip":
            out = 0.5 * (out + self._once(pixels.flip(-1)))
        return out

    def forward_with_features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and the pooled features: the input of the final Linear (a pre-hook serves every family)."""
        seen: list[torch.Tensor] = []
        hook = self.num_features and self.head.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        try:
            logits = self(pixels)
        finally:
            hook.remove()
        # with flip TTA the head ran twice: its features are the mean of the two, as its logits are
        feats = torch.stack(seen).mean(0) if self.tta == "flip" else seen[-1]
        return logits, feats.flatten(1)
