"""Quantization-aware distillation (QAD): the folded student, fake-quantised with NVIDIA ModelOpt (int8
per-channel weights, per-tensor activations, calibrated on training images), fine-tuned for a few
epochs against the teacher ensemble's averaged logits (KL at the run's temperature, plus the label
loss). Two files come of it:

- ONNX Runtime's own QDQ form (``student.int8.onnx``): QAD's fine-tuned weights, quantised by ONNX
  Runtime's static quantiser (int8 per-channel weights behind DequantizeLinear, uint8 activations, a Q on
  every conv's output), which its CPU provider fuses into QLinearConv and runs as int8. ModelOpt's own
  QDQ has no Q on op outputs, so ONNX Runtime runs its convolutions in float between Q/DQ pairs: slower
  than fp32 (docs/INT8.md).
- ModelOpt's QDQ (``student.int8.tensorrt.onnx``): the explicit quantization TensorRT builds from.

Fold first, quantize second: the folded graph has one output (the averaging is inside), so the
per-branch terms of training no longer apply and the target is the teachers' mean. The teachers run
live (on the run's device where it is there). With ``teachers=False`` the fine-tuning sees the labels
only (quantization-aware training, no teachers). The training itself is a stage of the one training loop
(``ekdc.training.qad_stage``: the run's objective on the folded graph, checkpointed and resumable).
ModelOpt is an optional extra: ``pip install 'ekdc[qad]'``.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import math
import warnings
from pathlib import Path
from typing import Callable, Optional

import onnx
import torch
import torch.nn as nn

from .. import _io
from ..contract import INPUT_NAME, OUTPUT_NAME
from ..errors import UserError
from ..run import RunDir
from ..training.qad_stage import qad_stage
from .onnx import DeployModel, save_checked

EXTRA = "pip install 'ekdc[qad]'"


@dataclasses.dataclass
class QADSettings:
    epochs: int = 2
    lr: Optional[float] = None  # default: the run's distill.lr / 50 (fine-tuning, not training)
    teachers: bool = True  # KD against the teachers' mean; False: the labels only
    seed: int = 0  # the fine-tuning's batch order and augmentation
    batch_size: Optional[int] = None  # default: the run's distill.batch_size

    @classmethod
    def from_flags(cls, qad: bool, epochs: Optional[int], lr: Optional[float], labels: bool) -> Optional["QADSettings"]:
        """export's ``--qad`` and its flags (None, or False for ``--qad-labels``: not given): the settings, None
        without ``--qad``, or one line where a QAD flag is given without it, even at its default value (the int8
        file would be PTQ's while the user asked for a QAD setting)."""
        given = [flag for flag, value in (("--qad-epochs", epochs), ("--qad-lr", lr), ("--qad-labels", labels or None))
                 if value is not None]
        if given and not qad:
            raise UserError(f"{given[0]} applies to QAD only: add --int8 --qad, or leave it out")
        if not qad:
            return None
        default = cls()
        return cls(epochs=default.epochs if epochs is None else epochs, lr=lr, teachers=not labels)

    def check(self) -> None:
        if self.epochs < 1:
            raise UserError(f"--qad-epochs {self.epochs}: must be at least 1")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--qad-lr {self.lr}: must be a number more than 0")


def modelopt_quantization():
    """``modelopt.torch.quantization``, or one line naming the extra to install."""
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            import modelopt.torch.quantization as mtq
    except ImportError as err:
        raise UserError(f"--qad needs NVIDIA ModelOpt (nvidia-modelopt), which is not installed here ({err}); "
                        f"{EXTRA}") from None
    return mtq


def _device(recipe) -> torch.device:
    """The run's device where it is there (a GPU fine-tunes much faster), else the CPU."""
    want = str(getattr(recipe, "device", "auto"))
    if want != "cpu" and torch.cuda.is_available():
        index = want.partition(":")[2]
        # the run's GPU if this machine has it (a run trained elsewhere may name one it lacks), else the first
        return torch.device(want if index.isdigit() and int(index) < torch.cuda.device_count() else "cuda:0")
    return torch.device("cpu")


def _calibrate(model: nn.Module, calib_x: torch.Tensor, mtq, dev: torch.device) -> nn.Module:
    """ModelOpt's int8 config (per-channel weights, per-tensor activations), ranges from the calibration images."""
    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for i in range(0, len(calib_x), 64):
                m(calib_x[i : i + 64].to(dev).float() / 255)

    with contextlib.redirect_stdout(io.StringIO()):
        return mtq.quantize(model, mtq.INT8_DEFAULT_CFG, forward_loop)


def export_qdq(model: nn.Module, path: Path, input_size: int, metadata: dict[str, str]) -> Path:
    """The fake-quantised model as QDQ ONNX (ModelOpt's quantizers export as QuantizeLinear /
    DequantizeLinear through the TorchScript exporter), under ekdc's contract; written atomically."""
    example = torch.rand(2, 3, input_size, input_size)
    with _io.atomic_path(path) as tmp, warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        raw = tmp.with_suffix(".raw.onnx")
        try:
            torch.onnx.export(model, (example,), str(raw), dynamo=False, opset_version=17, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            proto = onnx.load(str(raw))
        finally:
            raw.unlink(missing_ok=True)
        if not any(n.op_type == "QuantizeLinear" for n in proto.graph.node):
            raise RuntimeError("ModelOpt's export holds no QuantizeLinear node: the file would not be int8. This is a "
                               "bug in ekdc or an unsupported ModelOpt version: please report it")
        save_checked(proto, tmp, metadata)
    return Path(path)


def _weights_digest(model: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def learned_weights(deploy: DeployModel, quantized: nn.Module) -> DeployModel:
    """``deploy`` with the weights QAD fine-tuned, its quantizers left out: what ONNX Runtime's quantiser
    re-quantises (the same int8 per-channel weight grid the fine-tuning trained them for)."""
    plain = copy.deepcopy(deploy).float().eval()
    learned = quantized.state_dict()
    missing = [k for k in plain.state_dict() if k not in learned]
    if missing:
        raise RuntimeError(f"QAD's model has no '{missing[0]}': ModelOpt renamed a weight. This is a bug in ekdc or an "
                           "unsupported ModelOpt version: please report it")
    plain.load_state_dict({k: learned[k].detach().cpu() for k in plain.state_dict()})
    return plain


def quantization_aware_distill(deploy: DeployModel, recipe, teachers: list, calib_x: torch.Tensor, s: QADSettings,
                               path: Path, input_size: int, metadata: dict[str, str],
                               say: Callable[[str], None], run: RunDir) -> tuple[Path, DeployModel, dict]:
    """Fake-quantise ``deploy`` (a copy: the fp32 graph is kept), fine-tune it against ``teachers`` (or the
    labels alone), export ModelOpt's QDQ to ``path``; returns that file, the fine-tuned weights as a float
    deploy graph (for ONNX Runtime's quantiser), and what the manifest records of the fine-tuning."""
    mtq = modelopt_quantization()
    torch.manual_seed(s.seed)
    dev = _device(recipe)
    model = _calibrate(copy.deepcopy(deploy).float().to(dev), calib_x, mtq, dev)
    use_teachers = bool(s.teachers and teachers)
    d = recipe.distill
    lr = s.lr if s.lr is not None else d.lr / 50  # fine-tuning, not training
    bs = s.batch_size or d.batch_size
    key = {"epochs": s.epochs, "lr": lr, "batch_size": bs, "seed": s.seed, "teachers": use_teachers,
           "calibration_images": int(len(calib_x)), "student": _weights_digest(deploy)}
    info = qad_stage(model, recipe, teachers if use_teachers else None, run, epochs=s.epochs, lr=lr, batch_size=bs,
                     seed=s.seed, key=key, say=say, device=dev)
    info.update(method="qad" if use_teachers else "qat_labels", tool="nvidia-modelopt",
                config="INT8_DEFAULT_CFG: int8 per-channel weights, per-tensor activations", seed=s.seed,
                teachers=(len(teachers) if use_teachers else 0))
    return export_qdq(model, path, input_size, metadata), learned_weights(deploy, model), info
