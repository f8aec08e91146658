"""Teachers from anywhere, behind one interface (``Teacher``): ekdc's registry (``arch: resnet56``),
torchvision (``arch: torchvision:resnet50``), timm (``arch: timm:convnext_nano``) and ONNX files from any
framework (``onnx: model.onnx``)."""
from __future__ import annotations

import onnx

from ..models import count_macs, count_params
from ..onnx_graph import count_params_macs
from .base import Preprocess, Teacher
from .build import (
    DataInfo,
    frozen_teacher,
    teacher_from_checkpoint,
    teacher_param_groups,
    trainable_teacher,
)
from .torch_models import check_arch, parse_arch, search

__all__ = ["DataInfo", "Preprocess", "Teacher", "check_arch", "frozen_teacher", "parse_arch", "search",
           "teacher_from_checkpoint", "teacher_param_groups", "teacher_stats", "trainable_teacher"]


def teacher_stats(t: Teacher) -> tuple[int, int]:
    """(parameters, MACs per image at the teacher's own input size, both passes of flip TTA); an ONNX
    teacher's are counted from its graph, as ``ekdc bench`` counts them."""
    passes = 2 if t.tta == "flip" else 1
    if t.source == "onnx":
        params, macs, _ = count_params_macs(onnx.load(str(t.model.info.path)))
        return params, passes * macs
    return count_params(t.model), passes * count_macs(t.model, t.input_size)
