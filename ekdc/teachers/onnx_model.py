"""Teachers from any framework, as ONNX files run by ONNX Runtime (the CUDA provider where present).

The file's entry in the recipe says what the model expects (input size, mean/std, RGB or BGR, NCHW or
NHWC, logits or probabilities, its class order); ``Preprocess`` and ``Teacher`` do the rest, so an
ONNX teacher is a ``Teacher`` like any other, frozen and without features. A file ekdc exported says
it in its metadata (RGB in [0,1] with the normalisation inside, its classes, its input size): those
are its defaults, so a student or ``teachers.onnx`` of an earlier run teaches as it is.
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn

from .._io import existing_file, file_sha256
from ..contract import META_INPUT_SIZE, metadata_classes, ort_session
from ..errors import UserError
from ..onnx_graph import classifier_io, load_onnx


@dataclasses.dataclass
class OnnxInfo:
    path: Path
    input_name: str
    output_name: str
    input_dims: list  # ints where fixed, None where symbolic
    num_outputs: Optional[int]  # the output's class dimension, where the graph fixes it
    fixed_batch: Optional[int]
    opset: int
    ir_version: int
    metadata: dict = dataclasses.field(default_factory=dict)  # the file's metadata_props

    @property
    def ekdc_classes(self) -> Optional[list]:
        """An ekdc export's classes (None for a file from elsewhere)."""
        return metadata_classes(self.metadata)

    @property
    def ekdc_input_size(self) -> Optional[int]:
        raw = self.metadata.get(META_INPUT_SIZE, "")
        return int(raw) if raw.isdigit() and self.ekdc_classes is not None else None


def inspect_onnx(path: str | os.PathLike, what: str) -> OnnxInfo:
    """Check the file is an image classifier (one float image input of rank 4, NCHW or NHWC, and a [B,K]
    first output), by the check bench uses too."""
    path = existing_file(path, what, "an ONNX file")
    try:
        proto = load_onnx(path)
        io = classifier_io(proto, path, channels_last_ok=True, one_output=False, float16_output_ok=True,
                           expect="a teacher is an image classifier: one float32 input of rank 4, a [B,C] output")
    except UserError as err:
        raise UserError(f"{what} {err}") from None
    dims = [d if isinstance(d, int) and d > 0 else None for d in io.input_dims]
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxInfo(path, io.input_name, io.output_name, dims, io.num_outputs, io.fixed_batch, opset, proto.ir_version,
                    {p.key: p.value for p in proto.metadata_props})


class OnnxModel(nn.Module):
    """An ONNX file as a (frozen, parameterless) module: torch tensors in and out, on the input's device.
    A model whose graph fixes the batch at 1 is run one sample at a time."""

    def __init__(self, info: OnnxInfo):
        super().__init__()
        self.info = info
        self._session = None

    def _sess(self, device: torch.device):
        if self._session is None:
            cuda = device.type == "cuda"
            provider = "cuda" if cuda and "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
            try:  # on the process's own GPU (under torchrun, each rank's)
                self._session = ort_session(self.info.path, provider=provider, spin=False, device_id=device.index or 0)
            except Exception as err:  # noqa: BLE001 - ORT's own exception types
                raise UserError(f"ONNX Runtime cannot load {self.info.path}: {(str(err).splitlines() or ['?'])[0][:160]}") from None
            if provider == "cuda" and self._session.get_providers()[0] != "CUDAExecutionProvider":
                # listed but not started (its CUDA libraries do not match torch's): it would run on the CPU, slowly
                warnings.warn(f"ONNX teacher {self.info.path.name}: ONNX Runtime's CUDA provider did not start, so it "
                              "runs on the CPU (install the onnxruntime-gpu build that matches this CUDA)", stacklevel=2)
        return self._session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sess = self._sess(x.device)
        a = np.ascontiguousarray(x.detach().float().cpu().numpy())
        step = self.info.fixed_batch or len(a)
        outs = []
        for i in range(0, len(a), step):
            chunk = a[i : i + step]
            n = len(chunk)
            if n < step:  # a graph with a frozen batch takes only full batches: pad, then drop the padding
                chunk = np.concatenate([chunk, np.zeros((step - n, *chunk.shape[1:]), np.float32)])
            try:
                outs.append(sess.run([self.info.output_name], {self.info.input_name: chunk})[0][:n])
            except Exception as err:  # noqa: BLE001 - ORT's own exception types
                raise UserError(f"ONNX Runtime cannot run {self.info.path} on input {list(chunk.shape)} "
                                f"({(str(err).strip().splitlines() or ['?'])[0][:160]}); check its input_size and layout") from None
        return torch.from_numpy(np.concatenate(outs).astype(np.float32, copy=False)).to(x.device)

    def content_hash(self) -> str:
        """sha256 of the file's bytes (what a teacher-output cache is keyed by)."""
        return file_sha256(self.info.path)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_session"] = None  # sessions do not pickle; a copy opens its own
        return state
