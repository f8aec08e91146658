"""Frozen PyTorch teachers on the CPU, run by ONNX Runtime.

On a CPU, in fp32, ONNX Runtime runs ekdc's CIFAR-10 teachers 1.15-1.83x faster than eager PyTorch at
batch 256 (fastnet_l 1.16x, wrn_16_4 1.83x, vgg13 1.15x, 1.42x in all, on a 2-core AVX2 EPYC;
``experiments/teacher_runtime.py``, docs/TEACHER-CACHE.md). A distillation on a CPU spends most of its
time in the teachers (building a teacher-output cache, or live teachers at every step), so a frozen
teacher is exported once, in memory, and run there. The exported graph is the whole ``Teacher``
(preprocessing, class order, flip TTA, and the pooled features where the loss matches them), so it is a
drop-in for ``Teacher.forward`` / ``forward_with_features``.

It is checked, not trusted: on its first two batches, and on one in a hundred after them, the runner's
outputs are compared with PyTorch's, and a teacher that does not export, whose outputs differ, or that
ONNX Runtime fails to run, runs in PyTorch from then on, with a warning that says why. Teachers from ONNX
files already run in ONNX Runtime; on a GPU, or under autocast, PyTorch runs them.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from ..contract import ort_session
from .base import Teacher

# what ONNX Runtime's fp32 kernels may differ by from PyTorch's (summation order, BatchNorm folded into
# the convolution): far below what moves a soft target, far above what a wrong graph gives
RTOL, ATOL = 1e-3, 1e-3
CHECKS = 2  # the first batches run both ways, before ONNX Runtime's outputs are used alone
SPOT_CHECK_EVERY = 100  # and one batch in this many after them: about 1.5% more teacher time


class _Outputs(nn.Module):
    """The teacher's logits, and with ``features`` its pooled features: the graph that is exported."""

    def __init__(self, teacher: Teacher, features: bool):
        super().__init__()
        self.teacher, self.features = teacher, features

    def forward(self, pixels: torch.Tensor):
        return self.teacher.forward_with_features(pixels) if self.features else self.teacher(pixels)


class OrtTeacher:
    """``teacher`` exported to ONNX on its first call and run by ONNX Runtime on ``threads`` threads;
    called as ``(pixels) -> (logits, features or None)``. ``fallback_reason`` says why PyTorch runs it
    instead (None while ONNX Runtime does), and ``say`` (default: ``warnings.warn``) is told so once.

    Once a check has passed, ONNX Runtime's outputs are what every batch gets, checked or not, so a run
    resumed mid-way (whose first batches are checked again) takes the same numeric path as one that was not."""

    def __init__(self, teacher: Teacher, features: bool, threads: Optional[int] = None,
                 say: Optional[Callable[[str], None]] = None):
        self.teacher, self.features = teacher, features
        self.say = say
        self.threads = threads or torch.get_num_threads()
        self._session = None
        self.fallback_reason: Optional[str] = None
        self.calls = 0  # batches run so far: the first CHECKS, and every SPOT_CHECK_EVERY-th, are checked

    def _eager(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        with torch.inference_mode():
            if self.features:
                return self.teacher.forward_with_features(pixels)
            return self.teacher(pixels), None

    def _run(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        outs = self._session.run(None, {"pixels": np.ascontiguousarray(pixels.detach().float().cpu().numpy())})
        logits = torch.from_numpy(outs[0])
        return logits, (torch.from_numpy(outs[1]) if self.features else None)

    def _start(self, pixels: torch.Tensor) -> Optional[str]:
        """Export (on two images: the first full batch checks the batch dimension) and open; why not, if not."""
        try:
            self._session = ort_session(_export(_Outputs(self.teacher, self.features), pixels),
                                        threads=self.threads, spin=False)
        except Exception as err:  # noqa: BLE001 - the exporter's and ONNX Runtime's many exception types
            return f"it does not export to ONNX ({_first_line(err)})"
        return None

    def _checked(self, pixels: torch.Tensor, got) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``got`` (ONNX Runtime's outputs) if PyTorch's agree with them, else PyTorch's, from now on. A traced
        graph can freeze a Python branch that depends on the input's values, or on its batch size: hence
        checks on the first batches, and on one batch in ``SPOT_CHECK_EVERY`` after them."""
        expected = self._eager(pixels)
        for name, want, have in zip(("logits", "features"), expected, got):
            if want is None:
                continue
            if have.shape != want.shape:
                return self._give_up(f"its ONNX {name} are {list(have.shape)} where PyTorch's are {list(want.shape)}",
                                     expected)
            if not torch.allclose(have, want.float(), rtol=RTOL, atol=ATOL, equal_nan=True):
                diff = float((have - want.float()).abs().max())
                return self._give_up(f"its ONNX {name} differ from PyTorch's by up to {diff:.3g}", expected)
        return got

    def _give_up(self, reason: str, expected=None):
        self._session, self.fallback_reason = None, reason
        line = f"teacher {self.teacher.name} runs in PyTorch, not ONNX Runtime: {reason}"
        if self.say is not None:
            from rich.markup import escape  # the reason quotes an exception, which may hold [brackets]

            self.say(f"[yellow]warning:[/yellow] {escape(line)}")
        else:
            warnings.warn(line, stacklevel=3)
        return expected

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self._session is None and self.fallback_reason is None:
            reason = self._start(pixels)
            if reason is not None:
                self._give_up(reason)
        if self.fallback_reason is not None:
            return self._eager(pixels)
        check = self.calls < CHECKS or self.calls % SPOT_CHECK_EVERY == 0
        self.calls += 1
        try:
            got = self._run(pixels)
        except Exception as err:  # noqa: BLE001 - ONNX Runtime's own exception types (a shape it cannot take, memory)
            self._give_up(f"ONNX Runtime cannot run it on {list(pixels.shape)} ({_first_line(err)})")
            return self._eager(pixels)
        return self._checked(pixels, got) if check else got


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or ["?"])[0][:120]


def _export(module: nn.Module, example: torch.Tensor) -> bytes:
    """The module as ONNX bytes, batch dynamic. TorchScript tracing (``dynamo=False``): seconds, where
    the dynamo exporter takes a minute for a large teacher, and it traces the features' forward hook."""
    buf = io.BytesIO()
    names = ["logits", "features"] if module.features else ["logits"]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example[:2].float().contiguous(),), buf, dynamo=False, opset_version=17,
                          input_names=["pixels"], output_names=names,
                          dynamic_axes={n: {0: "batch"} for n in ["pixels", *names]})
    return buf.getvalue()


def runs_in_ort(teacher: Teacher, pixels: torch.Tensor) -> bool:
    """Whether ``teacher`` on ``pixels`` is one ONNX Runtime should run: a PyTorch teacher, on the CPU, in
    fp32 (under autocast PyTorch's bf16 kernels are the faster path)."""
    return (teacher.source != "onnx" and pixels.device.type == "cpu" and pixels.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu"))
