"""From a recipe's teacher entry to a network: frozen (``frozen_teacher``) or to train
(``trainable_teacher``), whatever its source."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import torch.nn as nn

from ..contract import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError
from .base import Preprocess, Teacher
from .onnx_model import OnnxModel, inspect_onnx
from .torch_models import build, final_linear, own_preprocessing, parse_arch, reset_head
from .weights import load_into, read_weights


class DataInfo(NamedTuple):
    """What a teacher must fit: the data's classes (in order), the student's input size and statistics."""

    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]


def class_index(model_classes: list[str], num_outputs: int, data: DataInfo, what: str) -> Optional[list[int]]:
    """Where each data class sits among a model's named outputs: None when they are the data's classes in
    the data's order; one line when the names do not cover the data's classes."""
    if len(model_classes) != num_outputs:
        raise UserError(f"{what}.classes names {len(model_classes)} classes, but the model has {num_outputs} outputs")
    missing = [c for c in data.classes if c not in model_classes]
    if missing:
        counts = (f"was trained for {len(model_classes)} classes, but the data has {len(data.classes)}"
                  if len(model_classes) != len(data.classes) else "names other classes than the data's")
        raise UserError(f"{what} {counts}: its classes lack the data's class '{missing[0]}'")
    idx = [list(model_classes).index(c) for c in data.classes]
    return None if idx == list(range(num_outputs)) else idx


@dataclasses.dataclass
class TorchTeacherModel:
    model: nn.Module
    head: nn.Linear
    pre: Preprocess
    classes: Optional[list[str]]  # the head's output classes, None: the data's
    class_index: Optional[list[int]]
    from_weights: bool  # starts from trained weights (a file or pretrained), not from scratch


def _stored(fields: dict, what: str) -> dict:
    """The classes, input size, mean and std a file stores beside its weights (ekdc's checkpoints do),
    checked: a field of the wrong kind is named in one line rather than half-used."""
    out = {}
    if fields.get("classes") is not None:
        c = fields["classes"]
        if not isinstance(c, (list, tuple)) or not all(isinstance(x, str) for x in c) or len(set(c)) != len(c):
            raise UserError(f"{what}: the file's 'classes' is not a list of distinct class names")
        out["classes"] = list(c)
    if all(k in fields for k in ("input_size", "mean", "std")):
        size, mean, std = fields["input_size"], fields["mean"], fields["std"]
        rgb = lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)  # noqa: E731
        if not (isinstance(size, int) and size > 0 and rgb(mean) and rgb(std) and all(x > 0 for x in std)):
            raise UserError(f"{what}: the file's input_size/mean/std are not a size and two RGB triples")
        out.update(input_size=size, mean=list(mean), std=list(std))
    return out


def _preprocess(tcfg, fields: dict, model: nn.Module, data: DataInfo, from_weights: bool) -> Preprocess:
    """The recipe's input_size/mean/std, else what the file stores (ekdc checkpoints), else the model's own
    (pretrained or from a file: timm's pretrained_cfg, torchvision's weights meta), else the data's."""
    size, mean, std = data.image_size, data.mean, data.std
    if "input_size" in fields:
        size, mean, std = fields["input_size"], fields["mean"], fields["std"]
    elif from_weights:
        own = own_preprocessing(tcfg.arch, tcfg.pretrained, model)
        if own is not None:
            size, mean, std = own
    return Preprocess(tcfg.input_size or size, tcfg.mean or mean, tcfg.std or std)


def _load_torch(tcfg, i: int, data: DataInfo) -> tuple[nn.Module, dict, bool]:
    """The network with its weights (a file, the library's pretrained ones, or fresh), its head as the
    weights have it; and the file's other fields."""
    what = f"teachers.{i}"
    source, name = parse_arch(tcfg.arch)
    if tcfg.weights:
        sd, fields = read_weights(tcfg.weights, f"{what}.weights")
        stored = fields.get("arch")
        meta = _stored(fields, f"{what}.weights {tcfg.weights}")
        if isinstance(stored, str) and "num_classes" in fields and stored not in (tcfg.arch, name):  # an ekdc checkpoint
            raise UserError(f"{what}.weights {tcfg.weights} holds a '{stored}', not the '{tcfg.arch}' the recipe names")
        model = build(tcfg.arch, len(data.classes) if source == "registry" else None, False, what)
        head = final_linear(model, source)
        key = next((f"{n}.weight" for n, m in model.named_modules() if m is head), None)
        if head is not None and key in sd and sd[key].shape[0] != head.out_features:
            model = reset_head(model, int(sd[key].shape[0]), source) if source != "registry" else \
                build(tcfg.arch, int(sd[key].shape[0]), False, what)
        load_into(model, sd, tcfg.weights, f"{what}.weights", tcfg.arch)
        return model, meta, True
    if tcfg.pretrained:
        return build(tcfg.arch, None, tcfg.pretrained, what), {}, True
    return build(tcfg.arch, len(data.classes), False, what), {}, False


def torch_teacher_model(tcfg, i: int, data: DataInfo, trainable: bool) -> TorchTeacherModel:
    what = f"teachers.{i}"
    source, _ = parse_arch(tcfg.arch)
    model, fields, from_weights = _load_torch(tcfg, i, data)
    head = final_linear(model, source)
    if head is None:
        where = {"registry": "a registry model's head is its attribute fc, an nn.Linear",
                 "timm": "timm's get_classifier() is not an nn.Linear"}.get(source, "it has no nn.Linear")
        raise UserError(f"{what}: {tcfg.arch} has no final Linear layer ({where}): ekdc cannot re-head it or read "
                        "its features")
    classes = tcfg.classes or fields.get("classes")
    k, n = head.out_features, len(data.classes)
    # unnamed outputs are taken in the data's order when there are as many; named ones are mapped by name
    idx = class_index(list(classes), k, data, what) if classes else None
    if (not classes and k != n) or (trainable and (idx is not None or k != n)):
        if not trainable:
            raise UserError(f"{what}: {tcfg.arch} has {k} outputs and the data {n} classes; name its outputs with "
                            "classes:, or give it train: to fine-tune a new head")
        model = reset_head(model, n, source)  # the loaded weights stay: only the final Linear is new
        head, idx, classes = final_linear(model, source), None, None
    pre = _preprocess(tcfg, fields, model, data, from_weights)
    _probe(model, pre.size, what, tcfg.arch)
    return TorchTeacherModel(model, head, pre, list(classes) if classes else None, idx, from_weights)


def _probe(model: nn.Module, size: int, what: str, arch: str) -> None:
    """One image through the model at its input size, so that a model fixed to another size (a ViT) fails
    here, in one line, not in the middle of training."""
    import torch

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except Exception as err:  # noqa: BLE001 - any model's own complaint about its input
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UserError(f"{what}: {arch} does not run on {size}x{size} images ({reason}); set input_size: to a size "
                        "it takes") from None
    finally:
        model.train(was)


def onnx_teacher(tcfg, i: int, data: DataInfo) -> Teacher:
    what = f"teachers.{i}.onnx"
    info = inspect_onnx(tcfg.onnx, what)
    hw = info.input_dims[2:] if tcfg.layout == "nchw" else info.input_dims[1:3]
    channels = info.input_dims[1] if tcfg.layout == "nchw" else info.input_dims[3]
    if channels not in (None, 3):
        raise UserError(f"{what} {tcfg.onnx}: its input has {channels} channels where layout {tcfg.layout} puts them; "
                        "set layout: nchw or nhwc to match the model")
    size = tcfg.input_size or (hw[0] if hw[0] and hw[0] == hw[1] else None) or info.ekdc_input_size
    if tcfg.input_size and any(d and d != tcfg.input_size for d in hw):
        raise UserError(f"{what} {tcfg.onnx}: the graph takes {hw[0]}x{hw[1]} images ({tcfg.layout}), but input_size "
                        f"is {tcfg.input_size}")
    if size is None:
        raise UserError(f"{what} {tcfg.onnx}: the graph does not fix a square input size; give input_size:")
    model = OnnxModel(info)
    k = info.num_outputs
    if k is None:
        import torch

        k = int(model(torch.zeros(1, *([3, size, size] if tcfg.layout == "nchw" else [size, size, 3]))).shape[1])
    # an ekdc export names its classes and normalises inside: those are its defaults, the recipe's win
    ekdc = info.ekdc_classes
    classes = tcfg.classes or (ekdc if ekdc is not None and len(ekdc) == k else None)
    if not classes and k != len(data.classes):
        raise UserError(f"teachers.{i}: {tcfg.onnx} has {k} outputs and the data {len(data.classes)} classes; "
                        "give its classes: in output order")
    idx = class_index(classes, k, data, f"teachers.{i} ({tcfg.onnx})") if classes else None
    unit_mean, unit_std = ([0.0, 0.0, 0.0], [1.0, 1.0, 1.0]) if ekdc is not None else (IMAGENET_MEAN, IMAGENET_STD)
    pre = Preprocess(size, tcfg.mean or unit_mean, tcfg.std or unit_std, bgr=tcfg.channel_order == "bgr",
                     nhwc=tcfg.layout == "nhwc")
    return Teacher(model, pre, name=tcfg.name, arch=f"onnx:{info.path.name}", source="onnx", class_index=idx, tta=tcfg.tta,
                   probabilities=tcfg.outputs == "probabilities")


def frozen_teacher(tcfg, i: int, data: DataInfo) -> Teacher:
    """A teacher used as it is, from its source."""
    if tcfg.onnx:
        return onnx_teacher(tcfg, i, data)
    t = torch_teacher_model(tcfg, i, data, trainable=False)
    return Teacher(t.model, t.pre, name=tcfg.name, arch=tcfg.arch, source=parse_arch(tcfg.arch)[0], tta=tcfg.tta,
                   class_index=t.class_index, head=t.head)


def trainable_teacher(tcfg, i: int, data: DataInfo) -> TorchTeacherModel:
    """A teacher to train here: from scratch, or fine-tuned from weights with a new head if its classes
    are not the data's."""
    return torch_teacher_model(tcfg, i, data, trainable=True)


def teacher_param_groups(t: TorchTeacherModel, tcfg) -> list[dict]:
    """The head at the teacher's learning rate; a backbone that starts from trained weights at
    ``backbone_lr_scale`` of it, or frozen (``freeze_backbone``: a linear probe). A model that knows its
    own rates (FastNet's BatchNorm shifts at 64x) keeps them, from scratch or from weights: fine-tuning
    such a model at one rate for all would train it as a different net than the one its weights came from."""
    head = {id(p) for p in t.head.parameters()}
    if not tcfg.freeze_backbone and hasattr(t.model, "param_groups"):
        own = t.model.param_groups()
        scale = tcfg.backbone_lr_scale if t.from_weights else 1.0
        if scale == 1.0:
            return own
        split = []
        for g in own:
            for part, factor in (([p for p in g["params"] if id(p) in head], 1.0),
                                 ([p for p in g["params"] if id(p) not in head], scale)):
                if part:
                    split.append({**g, "params": part, "lr_scale": g.get("lr_scale", 1.0) * factor})
        return split
    backbone = [p for p in t.model.parameters() if id(p) not in head]
    if tcfg.freeze_backbone:
        for p in backbone:
            p.requires_grad_(False)
    scale = tcfg.backbone_lr_scale if t.from_weights else 1.0
    return [{"params": list(t.head.parameters()), "lr_scale": 1.0},
            {"params": [p for p in backbone if p.requires_grad], "lr_scale": scale}]


def teacher_from_checkpoint(ck: dict, model: nn.Module, tcfg, data: DataInfo, i: int) -> Teacher:
    """A teacher this run trained or saved (``checkpoint.load_teacher`` gives ``ck`` and ``model``)."""
    source, _ = parse_arch(ck.get("arch", tcfg.arch))
    idx = class_index(list(ck["classes"]), len(ck["classes"]), data, f"teachers.{i}") if ck.get("classes") else None
    pre = Preprocess(int(ck.get("input_size", data.image_size)), list(ck.get("mean", data.mean)), list(ck.get("std", data.std)))
    return Teacher(model, pre, name=tcfg.name, arch=tcfg.arch, source=source, class_index=idx, tta=tcfg.tta,
                   head=final_linear(model, source))
