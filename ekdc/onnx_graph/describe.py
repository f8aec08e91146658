"""A model file as bench and the teachers see it before running it: its image-classifier I/O, metadata,
file size, and (from ``cost.py``) parameters, MACs and weight bytes. Bench reads every model file
through ``inspect_model``; ONNX teachers are checked by ``classifier_io``.

Parameters and MACs are counted from the graph itself, over the ops that carry the arithmetic
(Conv, ConvTranspose, Gemm, MatMul). A weight is followed back through DequantizeLinear, Cast and
layout-only ops to the initializer that stores it, so an int8 QDQ file and an fp16 file count the
same parameters and MACs as the fp32 file they came from.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

import onnx
from onnx import TensorProto, helper

from ..contract import (
    INPUT_NAME,
    META_INPUT_SIZE,
    META_KIND,
    META_PRECISION,
    OUTPUT_NAME,
    metadata_classes,
)
from ..errors import UserError
from ..formats import runtime_of
from .cost import count_params_macs, weight_bytes


@dataclasses.dataclass
class ModelInfo:
    """A model as the parent sees it, before any timing."""

    path: Path
    runtime: str  # what loads and runs it (``ekdc.formats.RUNTIMES``)
    file_mb: float
    input_hw: Optional[tuple[int, int]]  # None only for a plan with no ONNX beside it
    fixed_batch: Optional[int]  # a batch dimension frozen in the graph, else None
    metadata: dict[str, str]
    params: Optional[int]
    macs: Optional[int]
    macs_exact: bool  # False where some compute op had shapes shape inference could not resolve
    stats_from: Optional[str] = None  # for a plan: the ONNX file its params/MACs were read from
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    weight_bytes: Optional[int] = None  # the stored tensors' bytes (None for a plan with no ONNX beside it)
    num_outputs: Optional[int] = None  # C of the [B,C] output, where the graph fixes it

    @property
    def from_ekdc(self) -> bool:
        """An ekdc export: its metadata says how to feed it (classes, [0,1] RGB with normalisation inside)."""
        return self.classes is not None

    @property
    def precision(self) -> Optional[str]:
        return self.metadata.get(META_PRECISION)

    @property
    def kind(self) -> Optional[str]:
        return self.metadata.get(META_KIND)

    @property
    def classes(self) -> Optional[list]:
        return metadata_classes(self.metadata)


# --------------------------------------------------------------------------------------------------
# entry point


def inspect_model(path: str | os.PathLike) -> ModelInfo:
    """Check ``path`` is a readable model under the ekdc contract and gather its static figures."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"model not found: {path}")
    if not path.is_file():
        raise UserError(f"model {path} is a folder, not a model file")
    if runtime_of(path) == "tensorrt":
        return _inspect_plan(path)
    proto = load_onnx(path)
    io = classifier_io(proto, path)  # bench's contract; ekdc's files call their I/O images and logits, others anything
    meta = {p.key: p.value for p in proto.metadata_props}
    hw = fixed_hw(io) or _size_from_metadata(meta, path)
    params, macs, exact = count_params_macs(proto)
    return ModelInfo(path=path, runtime="onnxruntime", file_mb=_file_mb(path, proto), input_hw=hw,
                     fixed_batch=io.fixed_batch, metadata=meta, params=params, macs=macs, macs_exact=exact,
                     input_name=io.input_name, output_name=io.output_name, weight_bytes=weight_bytes(proto),
                     num_outputs=io.num_outputs)


def load_onnx(path: Path):
    """``onnx.load`` without external data (shapes are all that counting needs); one line on failure."""

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf raises several unrelated types on garbage bytes
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"{path} is not an ONNX file ({first[:120]})") from None
    # protobuf decodes many byte strings without complaint; a real model has an IR version and a graph input
    if proto.ir_version <= 0 or not proto.graph.input:
        raise UserError(f"{path} is not an ONNX file (no IR version or no graph input in it)")
    return proto


# --------------------------------------------------------------------------------------------------
# the contract


def _dims(value_info) -> list[Any]:
    """Dimensions of a graph input/output: ints where fixed, strings (or None) where symbolic."""
    shape = value_info.type.tensor_type.shape
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in shape.dim]


@dataclasses.dataclass
class ClassifierIO:
    """An image classifier's graph I/O: one float32 image input of rank 4, a float32 [B,C] output."""

    input_name: str
    output_name: str
    input_dims: list  # ints where fixed, strings or None where symbolic
    num_outputs: Optional[int]  # C, where the graph fixes it
    fixed_batch: Optional[int]  # a batch frozen in the graph, else None


BENCH_EXPECTS = "ekdc bench takes an image classifier: one float32 input [B,3,H,W] and one float32 output [B,C]"


def classifier_io(proto, path: Path, *, channels_last_ok: bool = False, one_output: bool = True,
                  float16_output_ok: bool = False, expect: str = BENCH_EXPECTS) -> ClassifierIO:
    """Check that ``proto`` is an image classifier: exactly one float32 input of rank 4 with 3 channels
    ([B,3,H,W], or [B,H,W,3] where ``channels_last_ok``) beside its initializers, and a float32 (or, where
    ``float16_output_ok``, float16) [B,C] output (the first of several unless ``one_output``). One line
    naming the file and what it has, else."""

    init_names = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in init_names]
    if len(inputs) != 1:
        names = ", ".join(f"'{i.name}' {_type_name(i)} {_shape_text(_dims(i))}" for i in inputs) or "none"
        raise UserError(f"{path}: has no single image input; its inputs are {names} ({expect})")
    x = inputs[0]
    if x.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise UserError(f"{path}: input '{x.name}' is {_type_name(x)}, expected float32 ({expect})")
    dims = _dims(x)
    layouts = "[B,3,H,W]" + (" or [B,H,W,3]" if channels_last_ok else "")
    # with channels_last_ok the caller checks the channels where the recipe's layout puts them
    if len(dims) != 4 or (not channels_last_ok and dims[1] != 3):
        raise UserError(f"{path}: input '{x.name}' has shape {_shape_text(dims)}, expected {layouts} ({expect})")
    outputs = list(proto.graph.output)
    if not outputs or (one_output and len(outputs) != 1) or len(_dims(outputs[0])) != 2:
        shown = ", ".join(f"'{o.name}' {_shape_text(_dims(o))}" for o in outputs) or "none"
        raise UserError(f"{path}: model outputs are {shown} ({expect})")
    y = outputs[0]
    floats = (TensorProto.FLOAT, TensorProto.FLOAT16) if float16_output_ok else (TensorProto.FLOAT,)
    if y.type.tensor_type.elem_type not in floats:
        raise UserError(f"{path}: output '{y.name}' is {_type_name(y)}, expected float32 ({expect})")
    k = _dims(y)[1]
    return ClassifierIO(x.name, y.name, dims, k if isinstance(k, int) and k > 0 else None,
                        dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None)


def fixed_hw(io: ClassifierIO) -> Optional[tuple[int, int]]:
    """The (H, W) the graph fixes, or None where either is symbolic."""
    h, w = io.input_dims[2], io.input_dims[3]
    return (h, w) if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 else None


def _type_name(value_info) -> str:

    try:
        return str(helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type))
    except Exception:  # noqa: BLE001 - an unknown or missing element type
        return "not a tensor"


def _shape_text(dims: list[Any]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in dims) + "]"


def _size_from_metadata(meta: dict[str, str], path: Path) -> tuple[int, int]:
    raw = meta.get(META_INPUT_SIZE)
    try:
        size = int(raw) if raw is not None else 0
    except ValueError:
        size = 0
    if size <= 0:
        raise UserError(f"{path}: input height and width are not fixed in the graph and there is no valid "
                        f"'{META_INPUT_SIZE}' metadata to say which size to bench")
    return size, size


def _file_mb(path: Path, proto=None) -> float:
    """Size on disk in MB (1e6 bytes), counting external-data files once each."""
    total = path.stat().st_size
    if proto is not None:
        seen: set[str] = set()
        for t in proto.graph.initializer:
            for entry in t.external_data:
                if entry.key == "location" and entry.value not in seen:
                    seen.add(entry.value)
                    ext = path.parent / entry.value
                    if ext.is_file():
                        total += ext.stat().st_size
    return total / 1e6


# --------------------------------------------------------------------------------------------------
# TensorRT plans


def _inspect_plan(path: Path) -> ModelInfo:
    """A plan carries no ONNX metadata; params, MACs and metadata come from the ONNX file it was
    built from when one sits beside it (export builds ``student.plan`` from ``student.fp16.onnx``)."""
    info = ModelInfo(path=path, runtime="tensorrt", file_mb=_file_mb(path), input_hw=None, fixed_batch=None, metadata={},
                     params=None, macs=None, macs_exact=False)
    stem = path.name[: -len(path.suffix)]
    for cand in (path.with_name(f"{stem}.fp16.onnx"), path.with_name(f"{stem}.onnx")):
        if cand.is_file():
            try:
                src = inspect_model(cand)
            except UserError:
                continue
            info.input_hw, info.metadata = src.input_hw, dict(src.metadata)
            info.params, info.macs, info.macs_exact = src.params, src.macs, src.macs_exact
            info.weight_bytes, info.num_outputs = src.weight_bytes, src.num_outputs
            info.metadata[META_PRECISION] = "plan:" + (src.precision or "?")
            info.stats_from = cand.name
            break
    return info


