"""What a graph costs, counted from the graph without running it: parameters and MACs per image over
the ops that carry the arithmetic (Conv, ConvTranspose, Gemm, MatMul), the bytes its weights take, and
the peak of its live activations at a batch size.

A weight is followed back through DequantizeLinear, Cast and layout-only ops to the initializer that
stores it, so an int8 QDQ file and an fp16 file count the same parameters and MACs as the fp32 file
they came from.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import onnx
from onnx import helper, inliner, shape_inference

# ops that only move, relabel or convert a stored weight: the parameter is the initializer behind them
_PASS_THROUGH = {"DequantizeLinear", "Cast", "Identity", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten",
                 "QuantizeLinear"}
_COMPUTE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}





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
    return _with_batch(proto, 1)


def _with_batch(proto, batch: int):
    """A copy with the batch fixed and shapes inferred."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    stored = {t.name for t in m.graph.initializer}
    # the data inputs and the outputs, whatever their names (a teacher from elsewhere has its own)
    for vi in (*[i for i in m.graph.input if i.name not in stored], *m.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) >= 1:
            dims[0].Clear()
            dims[0].dim_value = batch
    del m.graph.value_info[:]  # stale symbolic shapes from the exporter would fight the fixed batch
    if len(m.functions):
        try:
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


# --------------------------------------------------------------------------------------------------
# memory


def _itemsize(elem_type: int) -> int:
    try:
        return int(helper.tensor_dtype_to_np_dtype(elem_type).itemsize)
    except Exception:  # noqa: BLE001 - an undefined or string type
        return 4


def weight_bytes(proto) -> int:
    """The bytes the graph's stored tensors take (initializers and Constant nodes, subgraphs included),
    at their stored types: what the file holds, and what a runtime keeps resident for it at least."""
    graphs = [proto.graph, *_subgraphs(proto.graph)]
    total = 0
    for g in graphs:
        for t in g.initializer:
            total += _numel(t.dims) * _itemsize(t.data_type)
        for n in g.node:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        total += _numel(a.t.dims) * _itemsize(a.t.data_type)
    return int(total)


def activation_peak_bytes(proto, batch: int) -> Optional[int]:
    """The peak, over the nodes in graph order (ONNX keeps them topologically sorted), of the bytes of
    the tensors alive at once: the input from the start, each node's outputs from the node that makes
    them until their last reader has run (the graph's outputs to the end). Stored tensors (weights)
    are left out: ``weight_bytes`` counts them. None where shape inference cannot size every tensor.

    What a runtime does that this does not model: operator fusion (a fused Conv+Relu never holds the
    Conv's output), in-place and shared buffers, kernels' scratch space (im2col, packed weights), the
    arena's rounding and reuse pattern, and per-thread buffers."""
    m = _with_batch(proto, int(batch))
    g = m.graph
    stored = {t.name for t in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant"}
    for n in g.node:  # computed from stored tensors alone (a weight's DequantizeLinear, Cast): a weight too
        if n.input and all(i in stored for i in n.input if i):
            stored.update(o for o in n.output if o)
    sizes = {}
    for vi in (*g.input, *g.value_info, *g.output):
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] if t.HasField("shape") else None
        sizes[vi.name] = None if dims is None or any(d is None for d in dims) else _numel(dims) * _itemsize(t.elem_type)
    last_use: dict[str, int] = {}
    for k, n in enumerate(g.node):
        for i in n.input:
            last_use[i] = k
    for o in g.output:
        last_use[o.name] = len(g.node)
    live: dict[str, int] = {}
    for vi in g.input:
        if vi.name not in stored:
            if sizes.get(vi.name) is None:
                return None
            live[vi.name] = sizes[vi.name]
    peak = sum(live.values())
    for k, n in enumerate(g.node):
        if n.op_type == "Constant" or all(o in stored for o in n.output if o):
            continue
        for o in n.output:
            if o and o not in stored:
                if sizes.get(o) is None:
                    return None
                live[o] = sizes[o]
        peak = max(peak, sum(live.values()))
        for name in [t for t in live if last_use.get(t, -1) <= k]:
            del live[name]
    return int(peak)
