"""The ONNX contract every exported file keeps, and the one way ekdc opens such a file.

    input   ``images``  float32 [B,3,H,W], RGB in [0,1]; normalisation happens inside the graph
    output  ``logits``  float32 [B,C]
    metadata  ``ekdc.classes`` (JSON list), ``ekdc.input_size``, ``ekdc.kind``, ``ekdc.precision``,
              ``ekdc.recipe``, ``ekdc.run_dir``, ``ekdc.preprocess`` (JSON: how a raw photo becomes the
              input); export adds ``fold`` (students) or ``teachers``

Export writes it, bench and ``export/infer.py`` read it. This module imports nothing heavier than the
standard library at import time (numpy and onnxruntime load inside the functions that need them), so
the bench's measuring process can import it without skewing its memory reading.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from .cores import usable_cores

INPUT_NAME = "images"
OUTPUT_NAME = "logits"

META_CLASSES = "ekdc.classes"
META_INPUT_SIZE = "ekdc.input_size"
META_KIND = "ekdc.kind"
META_PRECISION = "ekdc.precision"
META_RECIPE = "ekdc.recipe"
META_RUN_DIR = "ekdc.run_dir"
# how a raw photo becomes the input: {"resize": S} (to S x S), or {"resize_shorter": C, "center_crop": S,
# "max_aspect": A} (a photo with one side over A times the other: its centre square first);
# "exif_orientation": true where the photo is first turned as its EXIF orientation tag says (as browsers show it)
META_PREPROCESS = "ekdc.preprocess"
# int8 files: how they were quantised (JSON: {"method": "ptq"|"qad"|"qat_labels", "tool": ...})
META_QUANTIZATION = "ekdc.quantization"
META_FOLD = "fold"
META_TEACHERS = "teachers"

# ImageNet's normalisation: the default of models from elsewhere (ONNX teachers, bench's --preprocess imagenet)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

# ``--provider`` names and the ONNX Runtime execution providers they stand for
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def contract_metadata(*, classes: list[str], input_size: int, kind: str, precision: str, recipe: str,
                      run_dir: str | os.PathLike, preprocess: Optional[dict] = None,
                      extra: Optional[dict[str, Any]] = None) -> dict[str, str]:
    """The metadata an exported file carries (values are strings, as ONNX stores them)."""
    meta = {
        META_CLASSES: json.dumps(classes), META_INPUT_SIZE: str(input_size), META_KIND: kind,
        META_PRECISION: precision, META_RECIPE: recipe, META_RUN_DIR: str(Path(run_dir).resolve()),
        META_PREPROCESS: json.dumps(preprocess or {"resize": input_size}),
    }
    meta.update({k: str(v) for k, v in (extra or {}).items()})
    return meta


def metadata_classes(meta: dict[str, str]) -> Optional[list]:
    """The class names an ekdc export's metadata lists (None for a file from elsewhere): such a file takes
    RGB in [0,1], its normalisation inside the graph."""
    raw = meta.get(META_CLASSES)
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, list) and all(isinstance(c, str) for c in value) else None


def ort_providers(provider: str = "cpu", trt_options: Optional[dict[str, Any]] = None, device_id: int = 0) -> list:
    """ONNX Runtime's provider list for a ``--provider`` name, CPU last as the fallback it always has;
    ``device_id`` is the GPU (a torchrun process's own)."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; expected one of {', '.join(PROVIDERS)}")
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"device_id": device_id})
    if provider == "cuda":
        return [cuda, "CPUExecutionProvider"]
    return [("TensorrtExecutionProvider", {"device_id": device_id, **(trt_options or {})}), cuda, "CPUExecutionProvider"]


def ort_session(path: str | os.PathLike | bytes, *, threads: Optional[int] = None, provider: str = "cpu",
                trt_options: Optional[dict[str, Any]] = None, spin: bool = True, device_id: int = 0):
    """An ONNX Runtime session (of a file, or a model's bytes) as export and bench both use it: every graph
    optimisation, sequential execution, one inter-op thread, ``threads`` intra-op threads (default: the usable cores).
    ``spin=False`` for a session that shares the CPUs with other work (an ONNX teacher beside PyTorch
    training): ONNX Runtime's idle threads otherwise spin and starve it."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = int(threads or usable_cores())
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, opts, providers=ort_providers(provider, trt_options, device_id))


def top1(logits, labels) -> float:
    """Top-1 accuracy of ``logits`` [N,C] against integer ``labels`` [N] (numpy arrays or CPU tensors)."""
    import numpy as np

    logits, labels = np.asarray(logits), np.asarray(labels)
    return float((logits.argmax(-1) == labels).mean()) if len(labels) else 0.0
