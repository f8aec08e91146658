"""The table of export formats (the ultralytics exporter's ``export_formats()``): every file ``ekdc
export`` can write for a student, the flag that asks for it, what it needs, how export checks it, and how
``ekdc bench`` loads and times it. ``export``, the CLI, the manifest and bench all read this table, so
a new format is one row here plus its ``export_*`` function (``ekdc.deploy.export``) and, for a new
runtime, its runner in bench's worker.

Standard library only: bench's measuring process imports it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

RUNTIMES = ("onnxruntime", "tensorrt")


@dataclasses.dataclass(frozen=True)
class ExportFormat:
    name: str  # the keyword of ``export(..., name=True)`` and, as --name, the CLI flag ("fp32": always written)
    title: str
    file: str  # the student's file name in the export folder
    precision: str  # the file's ``ekdc.precision``
    help: str
    needs: tuple[str, ...] = ()  # what must be installed: "tensorrt" (the package and a CUDA GPU)
    builds_from: Optional[str] = None  # the format whose file this one is made from (exported first)
    checked: str = "argmax agreement and accuracy vs fp32 on the validation images"
    runtime: str = "onnxruntime"  # how bench loads and times the file (RUNTIMES)
    suffixes: tuple[str, ...] = (".onnx",)  # files bench recognises as this format's

    @property
    def flag(self) -> Optional[str]:
        return None if self.name == "fp32" else f"--{self.name}"


_FORMATS = (
    ExportFormat("fp32", "ONNX fp32", "student.onnx", "fp32", "the folded student, averaging inside (always written)",
                 checked="logits vs the trained PyTorch student (max |Δ| under 1e-3 of their scale) and accuracy"),
    ExportFormat("fp16", "ONNX fp16", "student.fp16.onnx", "fp16",
                 "Also write student.fp16.onnx (fp16 weights and compute, float32 I/O).", builds_from="fp32"),
    ExportFormat("int8", "ONNX int8 (QDQ)", "student.int8.onnx", "int8",
                 "Also write student.int8.onnx (static QDQ, per-channel weights, QUInt8 activations).",
                 builds_from="fp32"),
    ExportFormat("trt", "TensorRT engine", "student.plan", "fp16",
                 "Also build student.plan with TensorRT from the fp16 file (needs TensorRT and a GPU).",
                 needs=("tensorrt",), builds_from="fp16", checked="built; bench it with --provider tensorrt",
                 runtime="tensorrt", suffixes=(".plan", ".engine", ".trt")),
)


def export_formats() -> tuple[ExportFormat, ...]:
    """Every format, in the order export writes them."""
    return _FORMATS


def get_format(name: str) -> ExportFormat:
    for f in _FORMATS:
        if f.name == name:
            return f
    raise KeyError(f"unknown export format {name!r}; formats: {', '.join(f.name for f in _FORMATS)}")


def with_prerequisites(names: list[str]) -> list[str]:
    """The formats asked for plus those they are built from, in table order (fp32 always)."""
    wanted, todo = {"fp32"}, list(names)
    while todo:
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            if get_format(name).builds_from:
                todo.append(get_format(name).builds_from)
    return [f.name for f in _FORMATS if f.name in wanted]


def runtime_of(path: str | os.PathLike) -> str:
    """The runtime bench loads a file with: the format whose suffix it bears (ONNX Runtime by default)."""
    suffix = os.path.splitext(str(path))[1].lower()
    return next((f.runtime for f in _FORMATS if suffix in f.suffixes and f.runtime != "onnxruntime"), "onnxruntime")
