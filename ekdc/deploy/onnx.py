"""ONNX export under the ekdc contract (``ekdc/contract.py``), parity and timing.

Every file has a dynamic batch; reduced-precision files keep float32 I/O.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

from .. import _io
from ..contract import INPUT_NAME, OUTPUT_NAME


class DeployModel(nn.Module):
    """``images`` in [0,1] -> normalise -> ``net`` -> float32 ``logits``. With ``half``, the network
    runs in fp16 between a cast in and a cast out, so the file keeps float32 I/O."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float], half: bool = False):
        super().__init__()
        self.net = net.half() if half else net
        self.half = half
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images - self.mean) * self.inv_std
        if self.half:
            return self.net(x.half()).float()
        return self.net(x)


class TeacherEnsemble(nn.Module):
    """Teachers (``ekdc.teachers.Teacher``: each resizes and normalises [0,1] images itself) as one
    module: the mean of their logits, or with ``reduce="sum"`` their sum (a part of a larger average)."""

    def __init__(self, teachers: list[nn.Module], reduce: str = "mean"):
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.reduce = reduce

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([t(images).float() for t in self.teachers])
        return logits.mean(0) if self.reduce == "mean" else logits.sum(0)


def export_onnx(model: nn.Module, path: str | Path, input_size: int, metadata: dict[str, str]) -> Path:
    """Export with the dynamo exporter into one self-contained file (no external data), full
    ``onnx.checker`` check, metadata set; written atomically."""

    model = model.eval()
    example = torch.rand(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with _io.atomic_path(path) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        raw = tmp.with_suffix(".raw.onnx")
        try:
            torch.onnx.export(
                model, (example,), str(raw), dynamo=True, external_data=False, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes={INPUT_NAME: {0: batch}}, optimize=True, verbose=False,
            )
            proto = onnx.load(str(raw))
        finally:
            raw.unlink(missing_ok=True)
        save_checked(proto, tmp, metadata)
    return Path(path)


def save_checked(proto, path: str | Path, metadata: dict[str, str]) -> None:
    """Set the metadata, run ``onnx.checker`` in full, save as one self-contained file."""

    set_metadata(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))


def set_file_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Set metadata in a written file (atomically)."""
    proto = onnx.load(str(path))
    set_metadata(proto, metadata)
    with _io.atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))


def set_metadata(proto, metadata: dict[str, str]) -> None:
    keep = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    for k, v in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, str(v)


def as_float_images(x_uint8: torch.Tensor) -> np.ndarray:
    """uint8 ``[N,3,H,W]`` images as the contract's float32 input in [0,1]."""
    return (x_uint8.float() / 255).numpy()


def run_session(sess, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Logits of uint8 ``images``, converted to the contract's input batch by batch (a split is never
    held as float32 all at once)."""
    out = [sess.run([OUTPUT_NAME], {INPUT_NAME: as_float_images(images[i : i + batch_size])})[0]
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def run_torch(model: nn.Module, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    """Logits of uint8 ``images`` from a deploy-form PyTorch module (input in [0,1]), batch by batch."""
    with torch.inference_mode():
        return np.concatenate([model(torch.from_numpy(as_float_images(images[i : i + batch_size]))).numpy()
                               for i in range(0, len(images), batch_size)])


def parity(reference: np.ndarray, logits: np.ndarray) -> dict:
    """How closely ``logits`` follow ``reference``: max abs difference (absolute and relative to the
    reference's scale) and argmax agreement."""
    diff = float(np.abs(reference - logits).max())
    scale = float(np.abs(reference).max()) or 1.0
    agree = float((reference.argmax(1) == logits.argmax(1)).mean())
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale, "argmax_agreement": agree, "images": int(len(logits))}


def pick_fastest(timings: dict[str, dict[str, float]]) -> str:
    """The candidate with the lowest geometric mean, over batch sizes, of latency relative to the
    best candidate at that batch: batch 1 and a large batch weigh the same."""
    names = list(timings)
    batches = list(next(iter(timings.values())))
    best = {b: min(timings[n][b] for n in names) for b in batches}
    score = {n: float(np.exp(np.mean([np.log(timings[n][b] / best[b]) for b in batches]))) for n in names}
    return min(names, key=lambda n: score[n])
