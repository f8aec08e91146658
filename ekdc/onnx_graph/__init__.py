"""What an ONNX graph says of itself, read without running it: ``describe.py`` (I/O under the ekdc
contract, metadata, size: ``inspect_model``, ``classifier_io``) and ``cost.py`` (parameters, MACs,
weight bytes, the peak of live activations)."""
from .cost import activation_peak_bytes, count_params_macs, weight_bytes
from .describe import (
           BENCH_EXPECTS,
           ClassifierIO,
           ModelInfo,
           classifier_io,
           inspect_model,
           load_onnx,
)

__all__ = ["BENCH_EXPECTS", "ClassifierIO", "ModelInfo", "activation_peak_bytes", "classifier_io",
           "count_params_macs", "inspect_model", "load_onnx", "weight_bytes"]
