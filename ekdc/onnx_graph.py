"""What an ONNX graph says of itself, read without running it: its image-classifier I/O, metadata, file
size, parameter count and MACs per image. Bench reads every model file through ``inspect_model``; ONNX
teachers are checked by ``classifier_io``.

Parameters and MACs are counted from the graph itself, over the ops that carry the arithmetic
(Conv, ConvTranspose, Gemm, MatMul). A weight is followed back through DequantizeLinear, Cast and
layout-only ops to the initializer that stores it, so an int8 QDQ file and an fp16 file count the
same parameters and MACs as the fp32 file they came from.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from .contract import (
    INPUT_NAME,
    META_CLASSES,
    META_INPUT_SIZE,
    META_KIND,
    META_PRECISION,
    OUTPUT_NAME,
)
from .errors import UserError
from .formats import runtime_of

# ops that only move, relabel or convert a stored weight: the parameter is the initializer behind them
_PASS_THROUGH = {"DequantizeLinear", "Cast", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
                 "QuantizeLinear"}
_COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


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
        raw = self.metadata.get(META_CLASSES)
        try:
            value = json.loads(raw) if raw else None
        except ValueError:
            return None
        return value if isinstance(value, list) else None


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
    input_name, output_name, hw, fixed_batch = check_io(proto, path)
    meta = {p.key: p.value for p in proto.metadata_props}
    if hw is None:
        hw = _size_from_metadata(meta, path)
    params, macs, exact = count_params_macs(proto)
    return ModelInfo(path=path, runtime="onnxruntime", file_mb=_file_mb(path, proto), input_hw=hw, fixed_batch=fixed_batch,
                     metadata=meta, params=params, macs=macs, macs_exact=exact, input_name=input_name,
                     output_name=output_name)


def load_onnx(path: Path):
    """``onnx.load`` without external data (shapes are all that counting needs); one line on failure."""
    import onnx

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
    from onnx import TensorProto

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


def check_io(proto, path: Path) -> tuple[str, str, Optional[tuple[int, int]], Optional[int]]:
    """Bench's contract: (input name, output name, the fixed (H, W) if the graph has them, the batch if it
    freezes it). ekdc's own files call them ``images`` and ``logits``; files from elsewhere may call them
    anything."""
    io = classifier_io(proto, path)
    h, w = io.input_dims[2], io.input_dims[3]
    hw = (h, w) if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 else None
    return io.input_name, io.output_name, hw, io.fixed_batch


def _type_name(value_info) -> str:
    from onnx import helper

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
            info.metadata[META_PRECISION] = "plan:" + (src.precision or "?")
            info.stats_from = cand.name
            break
    return info


# --------------------------------------------------------------------------------------------------
# parameters and MACs


def _subgraphs(graph):
    """The bodies of Loop, Scan and If nodes, recursively (a batch-1 model wrapped in a Loop lives there)."""
    for node in graph.node:
        for attr in node.attribute:
            for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield g
                yield from _subgraphs(g)


def count_params_macs(proto) -> tuple[int, int, bool]:
    """(parameters, MACs for one image, whether every MAC term was resolved) of an ONNX graph.

    Compute nodes inside subgraphs (a Loop over the batch) count too: their weights fully, their MACs
    once per iteration with an unknown leading dimension read as 1; the result is then marked inexact."""
    graph_proto = _with_batch_one(proto)
    graph = graph_proto.graph
    bodies = list(_subgraphs(graph))
    nodes = list(graph.node) + [n for g in bodies for n in g.node]
    producers = {out: node for node in nodes for out in node.output}
    stored = {t.name: _numel(t.dims) for g in (graph, *bodies) for t in g.initializer}
    for node in nodes:  # Constant nodes store tensors too (some exporters prefer them)
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    stored[node.output[0]] = _numel(attr.t.dims)
    shapes = _shapes(graph)
    for g in bodies:
        shapes.update({k: [1 if (i == 0 and d is None) else d for i, d in enumerate(v)] for k, v in _shapes(g).items()})

    counted: set[str] = set()
    macs, exact = 0, not any(n.op_type in _COMPUTE for g in bodies for n in g.node)
    for node in nodes:
        if node.op_type not in _COMPUTE:
            continue
        for name in _weight_inputs(node, producers, stored):
            counted.add(name)
        m = _node_macs(node, shapes)
        if m is None:
            exact = False
        else:
            macs += m
    # a MatMul's bias arrives by a following Add; count it with the layer it belongs to
    matmul_outs = {n.output[0] for n in nodes if n.op_type == "MatMul"}
    for node in nodes:
        if node.op_type == "Add" and any(i in matmul_outs for i in node.input):
            for i in node.input:
                src = _stored_source(i, producers, stored)
                if src is not None:
                    counted.add(src)
    params = sum(stored[n] for n in counted)
    return int(params), int(macs), exact


def _with_batch_one(proto):
    """A copy with the batch fixed to 1 and shapes inferred, so every shape is per image."""
    import onnx
    from onnx import shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    stored = {t.name for t in m.graph.initializer}
    # the data inputs and the outputs, whatever their names (a teacher from elsewhere has its own)
    for vi in (*[i for i in m.graph.input if i.name not in stored], *m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) >= 1:
            dims[0].Clear()
            dims[0].dim_value = 1
    del m.graph.value_info[:]  # stale symbolic shapes from the exporter would fight the fixed batch
    if len(m.functions):
        try:
            from onnx import inliner

            m = inliner.inline_local_functions(m)
        except Exception:  # noqa: BLE001 - older onnx: count the top-level graph only
            pass
    try:
        return shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - a graph inference cannot follow still has its stored weights
        return m


def _numel(dims) -> int:
    return int(math.prod(int(d) for d in dims)) if len(dims) else 1


def _shapes(graph) -> dict[str, list[Optional[int]]]:
    """Known shapes of every tensor in the graph (ints; None for an unresolved dimension)."""
    out: dict[str, list[Optional[int]]] = {}
    for vi in (*graph.input, *graph.value_info, *graph.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    for t in graph.initializer:
        out[t.name] = [int(d) for d in t.dims]
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = [int(d) for d in attr.t.dims]
    return out


def _stored_source(name: str, producers: dict, stored: dict[str, int], depth: int = 0) -> Optional[str]:
    """The initializer (or Constant) a tensor is read from, through DequantizeLinear/Cast/layout ops;
    None when the tensor is computed from the input (an activation, not a parameter)."""
    if name in stored:
        return name
    node = producers.get(name)
    if node is None or depth > 16 or node.op_type not in _PASS_THROUGH or not node.input:
        return None
    return _stored_source(node.input[0], producers, stored, depth + 1)


def _weight_inputs(node, producers: dict, stored: dict[str, int]) -> list[str]:
    """The stored tensors a compute node uses as weights and bias."""
    if node.op_type in ("Conv", "ConvTranspose"):
        candidates = node.input[1:3]
    elif node.op_type == "Gemm":
        candidates = node.input[0:3]  # either operand may be the stored one
    else:  # MatMul
        candidates = node.input[0:2]
    found = [_stored_source(i, producers, stored) for i in candidates if i]
    return [f for f in found if f is not None]


def _attr(node, name: str, default: Any) -> Any:
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _known(shape: Optional[list]) -> bool:
    return shape is not None and all(isinstance(d, int) and d > 0 for d in shape)


def _node_macs(node, shapes: dict[str, list]) -> Optional[int]:
    """Multiply-accumulates of one node for one image, from its (batch-1) shapes; None if unknown."""
    get = lambda i: shapes.get(node.input[i]) if len(node.input) > i and node.input[i] else None  # noqa: E731
    out = shapes.get(node.output[0])
    op = node.op_type
    if op == "Conv":
        w = get(1)
        if not (_known(w) and _known(out)):
            return None
        # every output element sums (Cin / groups) x kernel products: exactly the weight's per-filter size
        return _numel(out) * _numel(w[1:])
    if op == "ConvTranspose":
        x, w = get(0), get(1)
        if not (_known(x) and _known(w)):
            return None
        # every input element scatters into (Cout / groups) x kernel outputs
        return _numel(x) * _numel(w[1:])
    if op == "Gemm":
        a = get(0)
        if not (_known(a) and _known(out)) or len(a) != 2:
            return None
        k = a[0] if _attr(node, "transA", 0) else a[1]
        return _numel(out) * k
    if op == "MatMul":
        a = get(0)
        if not (_known(a) and _known(out)):
            return None
        return _numel(out) * a[-1]
    return None
