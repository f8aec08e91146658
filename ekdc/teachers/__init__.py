"""Teachers from anywhere, behind one interface (``Teacher``): ekdc's registry (``arch: resnet56``),
torchvision (``arch: torchvision:resnet50``), timm (``arch: timm:convnext_nano``) and ONNX files from any
framework (``onnx: model.onnx``)."""
from __future__ import annotations

from .base import Preprocess, Teacher
from .build import DataInfo, frozen_teacher, teacher_from_checkpoint, teacher_param_groups, trainable_teacher
from .torch_models import check_arch, parse_arch, search

__all__ = ["DataInfo", "Preprocess", "Teacher", "check_arch", "frozen_teacher", "parse_arch", "search",
           "teacher_for_run", "teacher_from_checkpoint", "teacher_param_groups", "teacher_stats", "trainable_teacher"]


def teacher_for_run(tcfg, i: int, data: DataInfo, run) -> Teacher:
    """The teacher a run uses: the one it trained (or saved) in ``teachers/<name>.pt``, else its source."""
    from .. import checkpoint

    path = run.teacher_path(tcfg.name)
    if path.exists():
        model, ck = checkpoint.load_teacher(path, tcfg.arch or "")
        return teacher_from_checkpoint(ck, model, tcfg, data, i)
    if tcfg.train is not None:  # trained (or fine-tuned) in the run: its weights exist only there, never guess them
        from ..errors import UserError

        raise UserError(f"teacher {tcfg.name} was trained in run {run.path}, but its checkpoint {path} is missing")
    return frozen_teacher(tcfg, i, data)


def teacher_stats(t: Teacher) -> tuple[int, int]:
    """(parameters, MACs per image at the teacher's own input size); an ONNX teacher's are counted from
    its graph, as ``ekdc bench`` counts them."""
    if t.source == "onnx":
        import onnx

        from ..benchmark.onnx_stats import count_params_macs

        params, macs, _ = count_params_macs(onnx.load(str(t.model.info.path)))
        return params, macs
    from ..models import count_macs, count_params

    return count_params(t.model), count_macs(t.model, t.input_size)
