"""Teachers from any framework, as ONNX files run by ONNX Runtime (the CUDA provider where present).

The file's entry in the recipe says what the model expects (input size, mean/std, RGB or BGR, NCHW or
NHWC, logits or probabilities, its class order); ``Preprocess`` and ``Teacher`` do the rest, so an
ONNX teacher is a ``Teacher`` like any other, frozen and without features.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from .._io import existing_file
from ..errors import UserError


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


def _dims(value_info) -> list:
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


def inspect_onnx(path: str | os.PathLike, what: str) -> OnnxInfo:
    """Check the file is a model with one float image input (rank 4) and a [B,K] output."""
    import onnx
    from onnx import TensorProto

    path = existing_file(path, what, "an ONNX file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf raises several unrelated types on garbage bytes
        raise UserError(f"{what} {path} is not an ONNX file ({(str(err).splitlines() or ['?'])[0][:120]})") from None
    inits = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    images = [i for i in inputs if i.type.tensor_type.elem_type == TensorProto.FLOAT and len(_dims(i)) == 4]
    if len(inputs) != 1 or len(images) != 1:
        names = ", ".join(f"'{i.name}' {TensorProto.DataType.Name(i.type.tensor_type.elem_type).lower()} {_dims(i)}"
                          for i in inputs) or "none"
        raise UserError(f"{what} {path} has no single image input (one float32 input of rank 4); its inputs: {names}")
    if not proto.graph.output or len(_dims(proto.graph.output[0])) != 2:
        raise UserError(f"{what} {path}: its first output is not [batch, classes]")
    out = proto.graph.output[0]
    dims = _dims(images[0])
    k = _dims(out)[1]
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxInfo(path, images[0].name, out.name, dims, k, dims[0] if dims[0] else None, opset, proto.ir_version)


class OnnxModel(nn.Module):
    """An ONNX file as a (frozen, parameterless) module: torch tensors in and out, on the input's device.
    A model whose graph fixes the batch at 1 is run one sample at a time."""

    def __init__(self, info: OnnxInfo):
        super().__init__()
        self.info = info
        self._session = None

    def _sess(self, cuda: bool):
        if self._session is None:
            import onnxruntime as ort

            from ..contract import ort_session

            provider = "cuda" if cuda and "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
            try:
                self._session = ort_session(self.info.path, provider=provider, spin=False)
            except Exception as err:  # noqa: BLE001 - ORT's own exception types
                raise UserError(f"ONNX Runtime cannot load {self.info.path}: {(str(err).splitlines() or ['?'])[0][:160]}") from None
        return self._session

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sess = self._sess(x.is_cuda)
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
        import hashlib

        h = hashlib.sha256()
        with open(self.info.path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_session"] = None  # sessions do not pickle; a copy opens its own
        return state
