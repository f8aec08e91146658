"""TensorRT engines (TensorRT 10 Python API), an optional extra: ``pip install 'ekdc[tensorrt]'``.

The engine is built strongly typed from the fp16 ONNX file, so its precision is the ONNX file's:
TensorRT 11 removed the FP16/INT8 builder flags, and a strongly typed network is the way that works
on both. Explicit batch with one optimisation profile (min/opt/max batch).
"""
from __future__ import annotations

from pathlib import Path

from .. import _io
from ..errors import UserError


def check_tensorrt_available(flag: str = "--trt") -> None:
    """One line and exit 2 where TensorRT or a CUDA GPU is missing."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        raise UserError(f"{flag}: TensorRT is not installed (pip install 'ekdc[tensorrt]', on a machine with an NVIDIA GPU)") from None
    import torch

    if not torch.cuda.is_available():
        raise UserError(f"{flag}: no CUDA GPU found; a TensorRT engine is built on the GPU it will run on")


def build_engine(onnx_path: str | Path, plan_path: str | Path, input_size: int, min_batch: int = 1,
                 opt_batch: int = 8, max_batch: int = 64, workspace_gib: float = 2.0) -> Path:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT cannot parse {onnx_path}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    shape = (3, input_size, input_size)
    profile.set_shape("images", (min_batch, *shape), (opt_batch, *shape), (max_batch, *shape))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise UserError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    with _io.atomic_path(plan_path) as tmp:
        tmp.write_bytes(bytes(serialized))
    return Path(plan_path)
