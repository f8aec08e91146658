"""Static int8 quantisation with ONNX Runtime: QDQ format, per-channel weights, QUInt8 activations.

QUInt8 activations because on x86 CPUs ONNX Runtime's u8s8 kernels are the fast path: QInt8
activations measured slower than fp32 here (see docs/BENCHMARKS.md).
"""
from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)

from .. import _io
from ..contract import INPUT_NAME
from .onnx import set_metadata


class _Calibration:
    """ONNX Runtime's CalibrationDataReader protocol over an array of images in [0,1]."""

    def __init__(self, images: np.ndarray, batch_size: int = 32):
        self._batches = iter([images[i : i + batch_size] for i in range(0, len(images), batch_size)])

    def get_next(self):
        b = next(self._batches, None)
        return None if b is None else {INPUT_NAME: b}


def quantize_int8(fp32_path: str | Path, out_path: str | Path, calib_images: np.ndarray,
                  metadata: dict[str, str]) -> Path:

    out_path = Path(out_path)
    with _io.atomic_path(out_path) as tmp, contextlib.redirect_stdout(io.StringIO()):
        logging.getLogger("onnxruntime").setLevel(logging.ERROR)
        pre = tmp.with_suffix(".pre.onnx")
        try:
            try:  # shape inference and graph clean-up help the quantiser; optional
                from onnxruntime.quantization.shape_inference import quant_pre_process

                quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
                src = pre
            except Exception:  # noqa: BLE001 - pre-processing is an optimisation, never required
                src = Path(fp32_path)
            quantize_static(
                str(src), str(tmp), _Calibration(calib_images.astype(np.float32)),
                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                extra_options={"CalibTensorRangeSymmetric": False},
            )
        finally:
            pre.unlink(missing_ok=True)
        proto = onnx.load(str(tmp))
        set_metadata(proto, metadata)
        onnx.save(proto, str(tmp))
    return out_path
