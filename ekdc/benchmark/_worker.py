"""The measured child process: loads ONE model, times it at each batch size, reports its peak memory,
then (outside the timed part and after the memory reading) its accuracy.

    python -m ekdc.benchmark._worker SPEC.json RESULT.json

SPEC is written by the parent (``runner.py``); RESULT gets ``{"batches": {...}, "peak_rss_mib": ...}``
or ``{"error": "one line"}``. Files, not stdout, because ONNX Runtime and TensorRT may print there.
Imports stay minimal (numpy, the runtime, the stdlib-only ``ekdc.contract``) so the memory reading is
the model's, not ekdc's.
"""
from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..contract import INPUT_NAME, OUTPUT_NAME, PROVIDERS, ort_session, top1
from .device_memory import DeviceMemory

_MAX_SAMPLES = 200_000  # a duration budget on a microsecond model must not grow a list without bound


class WorkerError(Exception):
    """A problem with the model or the runtime, reported to the parent as one line."""


# --------------------------------------------------------------------------------------------------
# memory


def _status_mib(field: str) -> Optional[float]:
    """A memory field of /proc/self/status (``VmHWM``, ``VmRSS``) in MiB; None where /proc is not there."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB.

    Linux keeps ``ru_maxrss`` across execve, so a child forked from a parent holding torch and a data
    set would report the parent's size; VmHWM is the high-water mark of this program's own address
    space since exec. ``ru_maxrss`` (KiB on Linux, bytes on macOS) where /proc is not available."""
    hwm = _status_mib("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def current_rss_mib() -> float:
    """Resident memory of this process now, in MiB (VmRSS); the peak where /proc is not available."""
    rss = _status_mib("VmRSS")
    return rss if rss is not None else peak_rss_mib()


def _import_runtime(spec: dict) -> None:
    """Load the runtime before the model, so that the reading in between is the process without the
    model: the model's own memory (weights, arena) is what grows after it."""
    if spec["runtime"] == "tensorrt":
        try:
            import tensorrt  # noqa: F401
            import torch  # noqa: F401
        except ImportError:
            pass  # PlanRunner says what is missing
    else:
        import onnxruntime  # noqa: F401


# --------------------------------------------------------------------------------------------------
# runners: each turns an input batch into a callable that runs once and returns its latency (ms)


class OrtRunner:
    """ONNX Runtime: pinned intra-op threads, one inter-op thread, sequential execution, all graph
    optimisations. On CUDA/TensorRT, inputs and outputs stay on the device through I/O binding."""

    timing = "host clock around each run"

    def __init__(self, spec: dict) -> None:
        import onnxruntime as ort

        self.ort, self.provider = ort, spec["provider"]
        self.input_name, self.output_name = spec.get("input_name", INPUT_NAME), spec.get("output_name", OUTPUT_NAME)
        try:
            self.sess = ort_session(spec["path"], threads=int(spec["threads"]), provider=self.provider,
                                    trt_options=self._trt_options(spec))
        except Exception as err:  # noqa: BLE001 - ORT raises its own exception types for bad graphs
            raise WorkerError(f"ONNX Runtime cannot load the model: {_first_line(err)}") from None
        want, got = PROVIDERS[self.provider], self.sess.get_providers()
        if not got or got[0] != want:
            # ORT silently falls back to the CPU when a GPU provider fails to start
            raise WorkerError(f"{want} did not start (ONNX Runtime fell back to {got[0] if got else 'nothing'}): "
                              "check the GPU, its driver and the CUDA/TensorRT libraries")
        self.max_batch = max(spec["batches"]) if self.provider == "tensorrt" else None
        if self.provider != "cpu":
            self.timing = "host clock around each synchronised run (I/O bound on the device)"

    def _trt_options(self, spec: dict) -> Optional[dict[str, Any]]:
        """TensorRT's options: one engine for every batch size, built once and reused by the later
        rounds' processes."""
        if self.provider != "tensorrt":
            return None
        if not spec.get("input_hw"):
            raise WorkerError("the model does not fix its input's height and width, and TensorRT needs them for its "
                              "engine's profile: export it at a fixed size")
        h, w = spec["input_hw"]
        big, opt = max(spec["batches"]), min(spec["batches"])
        name = self.input_name  # a model from elsewhere names its input its own way
        return {
            "trt_engine_cache_enable": True, "trt_engine_cache_path": spec["cache_dir"],
            "trt_profile_min_shapes": f"{name}:1x3x{h}x{w}",
            "trt_profile_opt_shapes": f"{name}:{opt}x3x{h}x{w}",
            "trt_profile_max_shapes": f"{name}:{big}x3x{h}x{w}",
        }

    def prepare(self, x: np.ndarray) -> Callable[[], float]:
        if self.provider == "cpu":
            feeds, run, out = {self.input_name: x}, self.sess.run, [self.output_name]

            def once() -> float:
                t0 = time.perf_counter()
                run(out, feeds)
                return (time.perf_counter() - t0) * 1e3

            return once
        binding = self.sess.io_binding()
        x_device = self.ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)  # copied to the GPU once, not per run
        binding.bind_ortvalue_input(self.input_name, x_device)
        binding.bind_output(self.output_name, "cuda", 0)
        run_bound = self.sess.run_with_iobinding

        def once_bound() -> float:
            _ = x_device  # the closure keeps the device buffer alive as long as the binding is used
            t0 = time.perf_counter()
            run_bound(binding)  # returns after the device has finished (ORT synchronises the run)
            return (time.perf_counter() - t0) * 1e3

        return once_bound

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.sess.run([self.output_name], {self.input_name: x})[0]


class PlanRunner:
    """A serialized TensorRT engine, run with the TensorRT 10 API on torch-allocated device buffers.
    Latency is the host clock around each enqueue and its synchronisation, the clock ONNX Runtime's
    runs are timed with, so that a .plan and an .onnx file compare on one clock."""

    timing = "host clock around each synchronised run (I/O bound on the device)"

    def __init__(self, spec: dict) -> None:
        try:
            import tensorrt as trt
            import torch
        except ImportError as err:
            raise WorkerError(f"a .plan needs the tensorrt and torch packages ({err})") from None
        if not torch.cuda.is_available():
            raise WorkerError("a .plan runs only on a CUDA GPU, and none is visible")
        self.trt, self.torch = trt, torch
        logger = trt.Logger(trt.Logger.ERROR)
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(spec["path"]).read_bytes())
        if self.engine is None:
            raise WorkerError("TensorRT cannot deserialize the plan (built by another TensorRT version or GPU?)")
        names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        if names != {INPUT_NAME, OUTPUT_NAME}:
            raise WorkerError(f"the plan's tensors are {sorted(names)}, expected {INPUT_NAME} and {OUTPUT_NAME}")
        for name in (INPUT_NAME, OUTPUT_NAME):
            if self.engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise WorkerError(f"the plan's '{name}' is {self.engine.get_tensor_dtype(name)}, expected float32")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        shape = tuple(self.engine.get_tensor_shape(INPUT_NAME))
        lo, _, hi = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
        # a plan built with a dynamic height and width (-1 in its shape) takes its profile's largest
        self.input_hw = tuple(int(d) if int(d) > 0 else int(m) for d, m in zip(shape[2:4], tuple(hi)[2:4]))
        self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        self._buffers: list = []  # keep device tensors alive while their addresses are bound

    def _bind(self, x: np.ndarray):
        torch = self.torch
        b = x.shape[0]
        if not self.min_batch <= b <= self.max_batch:
            raise WorkerError(f"batch {b} is outside the plan's profile ({self.min_batch}..{self.max_batch}); "
                              "rebuild the engine or pick batches in that range")
        xd = torch.from_numpy(np.ascontiguousarray(x)).to("cuda")
        if not self.context.set_input_shape(INPUT_NAME, tuple(xd.shape)):
            lo, _, hi = self.engine.get_tensor_profile_shape(INPUT_NAME, 0)
            raise WorkerError(f"the plan does not take input {list(xd.shape)} (its profile: {list(lo)} to {list(hi)}); "
                              "bench it at the size it was built for")
        out = torch.empty(tuple(self.context.get_tensor_shape(OUTPUT_NAME)), dtype=torch.float32, device="cuda")
        self.context.set_tensor_address(INPUT_NAME, xd.data_ptr())
        self.context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        self._buffers = [xd, out]
        torch.cuda.synchronize()
        return out

    def prepare(self, x: np.ndarray) -> Callable[[], float]:
        self._bind(x)
        stream, context = self.stream, self.context

        def once() -> float:
            t0 = time.perf_counter()
            if not context.execute_async_v3(stream.cuda_stream):
                raise WorkerError("TensorRT failed to enqueue the engine")
            stream.synchronize()
            return (time.perf_counter() - t0) * 1e3

        return once

    def predict(self, x: np.ndarray) -> np.ndarray:
        out = self._bind(x)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise WorkerError("TensorRT failed to enqueue the engine")
        self.stream.synchronize()
        return out.cpu().numpy()


# each runtime of ``ekdc.formats`` and the runner that loads and times its files
RUNNERS = {"onnxruntime": OrtRunner, "tensorrt": PlanRunner}


# --------------------------------------------------------------------------------------------------
# measurement


def time_batch(once: Callable[[], float], warmup: int, runs: Optional[int], duration: Optional[float],
               min_runs: int) -> list[float]:
    """Latencies (ms) after ``warmup`` untimed runs: exactly ``runs``, or as many as fit in ``duration``
    seconds (at least ``min_runs``)."""
    for _ in range(warmup):
        once()
    samples: list[float] = []
    deadline = time.perf_counter() + (duration or 0.0)
    while True:
        samples.append(once())
        n = len(samples)
        if runs is not None:
            if n >= runs:
                break
        elif (n >= min_runs and time.perf_counter() >= deadline) or n >= _MAX_SAMPLES:
            break
    return samples


def accuracy(runner, val_x_path: str, val_y_path: str, chunk: int, fixed_batch: Optional[int],
             feed: Optional[dict] = None) -> float:
    """Top-1 accuracy on the validation images the parent saved (memory-mapped uint8, scaled to the
    contract's [0,1] chunk by chunk)."""
    x = np.load(val_x_path, mmap_mode="r")
    y = np.load(val_y_path)
    step = fixed_batch or chunk
    correct = 0
    for i in range(0, len(x), step):
        xb = np.ascontiguousarray(x[i : i + step], dtype=np.float32) / np.float32(255)
        if feed and feed.get("mean") is not None:  # a model from elsewhere takes normalised images
            xb = (xb - np.float32(feed["mean"]).reshape(1, 3, 1, 1)) / np.float32(feed["std"]).reshape(1, 3, 1, 1)
        n = len(xb)
        if fixed_batch and n < fixed_batch:  # a graph with a frozen batch takes only full batches: pad
            xb = np.concatenate([xb, np.zeros((fixed_batch - n, *xb.shape[1:]), np.float32)])
        logits = np.asarray(runner.predict(xb))[:n]
        if feed and feed.get("class_index") is not None:  # its outputs in the data's class order
            if logits.shape[1] != feed["width"]:  # a TensorRT plan's C: the parent could not run it
                raise WorkerError(f"--classes names {feed['width']} classes but the model outputs {logits.shape[1]} "
                                  "values an image")
            logits = logits[:, feed["class_index"]]
        correct += round(top1(logits, y[i : i + n]) * n)  # the chunk's share of correct predictions
    return correct / max(1, len(x))


def measure(spec: dict) -> dict[str, Any]:
    baseline = peak_rss_mib()  # interpreter, numpy and ekdc's imports: the same for every model
    _import_runtime(spec)
    # the runtime's fixed cost of a session (thread pool, arena, kernels' registries), paid once by any model:
    # a session of a trivial graph with the same provider and options, kept open while the model runs
    trivial = _trivial_session(spec)
    peak_before_model = peak_rss_mib()
    # the high-water mark so far (imports, the trivial session's own start) is not the model's: reset it to
    # the resident memory now, so that the peak read after the runs is what the model added (Linux >= 4.0)
    peak_reset = _reset_peak()
    before_model = current_rss_mib()
    gpu = DeviceMemory() if spec["provider"] != "cpu" or spec["runtime"] == "tensorrt" else None
    runner = RUNNERS[spec["runtime"]](spec)
    hw = spec.get("input_hw") or getattr(runner, "input_hw", None)
    if hw is None:
        raise WorkerError("cannot tell the model's input size")
    rng = np.random.default_rng(0)
    result: dict[str, Any] = {"batches": {}, "peak_rss_by_batch_mib": {}, "baseline_rss_mib": baseline,
                              "runtime_rss_mib": before_model,
                              "peak_reset": peak_reset, "peak_before_model_mib": peak_before_model,
                              "input_hw": list(hw),
                              "timing": runner.timing}
    device_peak: Optional[float] = None
    for b in spec["batches"]:
        x = rng.random((b, 3, *hw), dtype=np.float32)
        once = runner.prepare(x)
        result["batches"][str(b)] = time_batch(once, spec["warmup"], spec["runs"], spec["duration"], spec["min_runs"])
        # the peak so far: batches run smallest first, so this is the model's memory up to this batch size
        result["peak_rss_by_batch_mib"][str(b)] = peak_rss_mib()
        if gpu is not None:
            d = gpu.sample()
            device_peak = d if device_peak is None or (d is not None and d > device_peak) else device_peak
        del once, x
    # read peak memory now: the accuracy pass below loads the validation images, which are not the model's
    result["peak_rss_mib"] = peak_rss_mib()
    del trivial
    result["device_mem_mib"] = device_peak
    result["device_mem_method"] = gpu.method if gpu is not None else None
    if spec.get("val_x"):
        t0 = time.perf_counter()
        chunk = min(256, runner.max_batch or 256)
        result["accuracy"] = accuracy(runner, spec["val_x"], spec["val_y"], chunk, spec.get("fixed_batch"),
                                      spec.get("feed"))
        result["accuracy_seconds"] = time.perf_counter() - t0
    return result


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _trivial_session(spec: dict):
    """An open session of the parent's trivial graph (one Identity on the model's input), run once, under
    the model's provider and threads; None for a TensorRT plan (its engine has no such baseline here)."""
    path = spec.get("trivial")
    if not path or spec["runtime"] != "onnxruntime":
        return None
    sess = ort_session(path, threads=int(spec["threads"]), provider=spec["provider"])
    hw = spec.get("input_hw") or [1, 1]
    sess.run(None, {INPUT_NAME: np.zeros((1, 3, *hw), dtype=np.float32)})
    return sess


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m ekdc.benchmark._worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    try:
        result = measure(spec)
    except WorkerError as err:
        result = {"error": str(err)}
    except Exception as err:  # noqa: BLE001 - anything else still reaches the parent as one line, plus detail
        result = {"error": f"{type(err).__name__}: {_first_line(err)}", "traceback": traceback.format_exc()}
    Path(argv[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
