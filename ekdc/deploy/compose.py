"""``teachers.onnx`` for an ensemble with ONNX teachers: one graph under the contract (input ``images``,
RGB in [0,1] at the student's size; output ``logits``, the mean over the teachers).

The PyTorch teachers are exported as one part (the sum of their logits, each resized and normalised
inside). Each ONNX teacher is brought to a common opset (``onnx.version_converter``), every name in it
prefixed (subgraphs included), and wrapped: resize, normalise, channel order and layout before
it; log of probabilities and the data's class order after. A teacher whose graph fixes the batch at 1
runs inside a ``Loop`` over the batch. Only standard ONNX operators are used.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, version_converter

from ..contract import INPUT_NAME, OUTPUT_NAME
from ..errors import UserError

MIN_OPSET = 13  # Resize with sizes, Clip with min as an input


def _opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _check_standard(proto, what: str) -> None:
    def walk(graph):
        for node in graph.node:
            if node.domain not in ("", "ai.onnx"):
                raise UserError(f"{what} uses the operator {node.domain}::{node.op_type}, outside standard ONNX: "
                                "teachers.onnx holds standard operators only")
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)
    walk(proto.graph)


def _at_opset(proto, target: int, what: str):

    if _opset(proto) == target:
        return proto
    try:
        return version_converter.convert_version(proto, target)
    except Exception as err:  # noqa: BLE001 - the converter raises several types
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"{what} cannot be converted from opset {_opset(proto)} to {target} for teachers.onnx ({reason})") from None


def _const(name: str, value) -> "object":

    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(value), name + "_value"))


def _preprocess_nodes(p: str, teacher, student_size: int, out: str) -> list:
    """[0,1] RGB ``images`` -> the ONNX teacher's input ``out``."""

    pre = teacher.pre
    nodes, x = [], INPUT_NAME
    if pre.size != student_size:
        nodes += [helper.make_node("Shape", [INPUT_NAME], [p + "shape"]), _const(p + "zero", np.array([0], np.int64)),
                  _const(p + "two", np.array([2], np.int64)),
                  helper.make_node("Slice", [p + "shape", p + "zero", p + "two"], [p + "bc"]),
                  _const(p + "hw", np.array([pre.size, pre.size], np.int64)),
                  helper.make_node("Concat", [p + "bc", p + "hw"], [p + "sizes"], axis=0),
                  helper.make_node("Resize", [x, "", "", p + "sizes"], [p + "resized"], mode="linear",
                                   coordinate_transformation_mode="half_pixel")]
        x = p + "resized"
    spec = pre.spec()
    nodes += [_const(p + "mean", np.array(spec["mean"], np.float32).reshape(1, 3, 1, 1)),
              _const(p + "std", np.array(spec["std"], np.float32).reshape(1, 3, 1, 1)),
              helper.make_node("Sub", [x, p + "mean"], [p + "centred"]),
              helper.make_node("Div", [p + "centred", p + "std"], [p + "normed"])]
    x = p + "normed"
    if pre.bgr:
        nodes += [_const(p + "bgr", np.array([2, 1, 0], np.int64)), helper.make_node("Gather", [x, p + "bgr"], [p + "swapped"], axis=1)]
        x = p + "swapped"
    if pre.nhwc:
        nodes.append(helper.make_node("Transpose", [x], [p + "nhwc"], perm=[0, 2, 3, 1]))
        x = p + "nhwc"
    nodes.append(helper.make_node("Identity", [x], [out]))
    return nodes


def _postprocess_nodes(p: str, teacher, src: str, out: str) -> list:
    """The model's outputs -> logits over the data's classes, in the data's order."""


    # whatever the model's output type (fp16, double), the ensemble averages float32
    nodes, x = [helper.make_node("Cast", [src], [p + "float"], to=TensorProto.FLOAT)], p + "float"
    if teacher.probabilities:
        nodes += [_const(p + "eps", np.array(1e-12, np.float32)), helper.make_node("Clip", [x, p + "eps"], [p + "clipped"]),
                  helper.make_node("Log", [p + "clipped"], [p + "logp"])]
        x = p + "logp"
    if teacher.class_index.numel():
        nodes += [_const(p + "classes", teacher.class_index.cpu().numpy().astype(np.int64)),
                  helper.make_node("Gather", [x, p + "classes"], [p + "picked"], axis=1)]
        x = p + "picked"
    nodes.append(helper.make_node("Identity", [x], [out]))
    return nodes


def _loop_over_batch(p: str, body_nodes: list, src: str, model_in: str, in_dims: list, model_out: str, out: str) -> list:
    """Run ``body_nodes`` (a batch-1 model reading ``model_in`` of shape ``in_dims``) once per sample of ``src``."""

    # the Reshape to the model's own input shape keeps every shape in the body known (shape inference,
    # and so bench's MAC count, can follow it)
    shape = [1] + [int(d) if d else -1 for d in in_dims[1:]]
    body = helper.make_graph(
        [helper.make_node("Unsqueeze", [p + "i", p + "ax0"], [p + "start"]),
         helper.make_node("Add", [p + "start", p + "one"], [p + "end"]),
         helper.make_node("Slice", [src, p + "start", p + "end", p + "ax0"], [p + "sample"]),
         _const(p + "in_shape", np.array(shape, np.int64)),
         helper.make_node("Reshape", [p + "sample", p + "in_shape"], [model_in]), *body_nodes,
         helper.make_node("Identity", [p + "cond"], [p + "cond_out"]),
         helper.make_node("Identity", [model_out], [p + "sample_out"])],
        p + "body",
        [helper.make_tensor_value_info(p + "i", TensorProto.INT64, []), helper.make_tensor_value_info(p + "cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info(p + "cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info(p + "sample_out", TensorProto.FLOAT, None)])
    return [_const(p + "ax0", np.array([0], np.int64)), _const(p + "one", np.array([1], np.int64)),
            helper.make_node("Shape", [src], [p + "src_shape"]), _const(p + "idx0", np.array(0, np.int64)),
            helper.make_node("Gather", [p + "src_shape", p + "idx0"], [p + "n"]),
            helper.make_node("Loop", [p + "n", ""], [p + "stacked"], body=body),
            helper.make_node("Squeeze", [p + "stacked", p + "one"], [out])]  # [B,1,K] -> [B,K]


def _prefix_all(proto, p: str):
    """Every tensor, node and local function name prefixed with ``p``, inside subgraphs too: a name a
    Loop or If body reads from the graph around it is renamed with its definition (``onnx.compose.add_prefix``
    leaves such captured names behind)."""

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    local = {(f.domain, f.name) for f in m.functions}
    ren = lambda n: p + n if n else n  # noqa: E731 - "" marks an omitted optional input

    def graph(g):
        for vi in (*g.input, *g.output, *g.value_info):
            vi.name = ren(vi.name)
        for t in g.initializer:
            t.name = ren(t.name)
        for sparse in g.sparse_initializer:
            sparse.values.name = ren(sparse.values.name)
        for node in g.node:
            node.name = ren(node.name)
            node.input[:] = [ren(x) for x in node.input]
            node.output[:] = [ren(x) for x in node.output]
            if (node.domain, node.op_type) in local:
                node.op_type = p + node.op_type
            for attr in node.attribute:
                if attr.HasField("g"):
                    graph(attr.g)
                for sub in attr.graphs:
                    graph(sub)

    graph(m.graph)
    for f in m.functions:
        f.name = p + f.name
    return m


def _onnx_part(i: int, teacher, student_size: int, target: int, ir: int, out: str) -> tuple[list, list, list]:
    """(nodes, initializers, functions) computing one ONNX teacher's logits ``out`` from ``images``."""

    info = teacher.model.info
    what = f"teacher {teacher.name} ({info.path})"
    proto = onnx.load(str(info.path))
    _check_standard(proto, what)
    proto = _at_opset(proto, target, what)
    proto.ir_version = ir
    p = f"ekdc_t{i}_"
    proto = _prefix_all(proto, p)
    model_in, model_out = p + info.input_name, p + info.output_name
    pre = _preprocess_nodes(p + "pre_", teacher, student_size, p + "input_all" if info.fixed_batch == 1 else model_in)
    if info.fixed_batch == 1:
        core = pre + _loop_over_batch(p + "loop_", list(proto.graph.node), p + "input_all", model_in, info.input_dims,
                                      model_out, p + "raw")
    elif info.fixed_batch:
        raise UserError(f"{what}: its graph fixes the batch at {info.fixed_batch}; teachers.onnx needs a dynamic batch or 1")
    else:
        core = pre + list(proto.graph.node) + [onnx.helper.make_node("Identity", [model_out], [p + "raw"])]
    post = _postprocess_nodes(p + "post_", teacher, p + "raw", out)
    return core + post, list(proto.graph.initializer), list(proto.functions)


def compose_teachers(torch_part, onnx_teachers: list, num_teachers: int, student_size: int):
    """One ModelProto: the PyTorch part (``torch_part``: images -> the sum of its teachers' logits, or
    None) and each ONNX teacher, averaged over ``num_teachers``."""

    protos = [torch_part] if torch_part is not None else []
    target = max([MIN_OPSET] + [_opset(m) for m in protos] + [t.model.info.opset for t in onnx_teachers])
    ir = max([m.ir_version for m in protos] + [t.model.info.ir_version for t in onnx_teachers] + [onnx.IR_VERSION_2021_7_30])
    nodes, inits, funcs, sums = [], [], [], []
    if torch_part is not None:
        part = _prefix_all(_at_opset(torch_part, target, "the PyTorch teachers"), "ekdc_torch_")
        rename = {"ekdc_torch_" + INPUT_NAME: INPUT_NAME}
        for n in part.graph.node:
            n.input[:] = [rename.get(x, x) for x in n.input]
        nodes += list(part.graph.node)
        inits += list(part.graph.initializer)
        funcs += list(part.functions)
        sums.append("ekdc_torch_" + OUTPUT_NAME)
    for i, t in enumerate(onnx_teachers):
        n_, i_, f_ = _onnx_part(i, t, student_size, target, ir, f"ekdc_t{i}_logits")
        nodes += n_
        inits += i_
        funcs += f_
        sums.append(f"ekdc_t{i}_logits")
    nodes += [helper.make_node("Sum", sums, ["ekdc_sum"]), _const("ekdc_inv_n", np.array(1.0 / num_teachers, np.float32)),
              helper.make_node("Mul", ["ekdc_sum", "ekdc_inv_n"], [OUTPUT_NAME])]
    graph = helper.make_graph(nodes, "teachers", [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, student_size, student_size])],
                              [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", None])], inits)
    opsets = {"": target}
    for m in protos:
        for o in m.opset_import:
            if o.domain not in ("", "ai.onnx"):
                opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()], functions=funcs)
    model.ir_version = ir
    return model

