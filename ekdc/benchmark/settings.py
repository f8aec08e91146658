"""What a bench (or a plan's timing) runs with, checked before any process starts: each problem is one
line naming the flag."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import TYPE_CHECKING, Optional, Union

import onnxruntime as ort

from ..contract import PROVIDERS
from ..cores import usable_cores
from ..errors import UserError
from ..onnx_graph import ModelInfo

if TYPE_CHECKING:
    import numpy as np
    from rich.console import Console

PathLike = Union[str, os.PathLike]
DEFAULT_DURATION_S = 1.0  # per batch size and round, when neither runs nor duration is given
DEFAULT_MIN_RUNS = 10  # ... but never fewer timed runs than this
DURATION_MIN_RUNS = 3  # with an explicit --duration


@dataclasses.dataclass
class Entry:
    name: str
    info: ModelInfo
    is_reference: bool = False
    feed: Optional[dict] = None  # how to feed the validation images (None: no accuracy for this model)


@dataclasses.dataclass
class Settings:
    batches: list[int]
    threads: int
    provider: str
    warmup: int
    runs: Optional[int]
    duration: Optional[float]
    min_runs: int
    repeats: int


@dataclasses.dataclass
class ValData:
    x: "np.ndarray"  # uint8 [N,3,H,W]: a quarter of float32's memory; the worker scales each chunk to [0,1]
    y: "np.ndarray"  # int64 [N]
    classes: list[str]
    source: str
    explicit: bool  # named by --data (problems are errors) rather than found in the metadata (problems are notes)


def say(console: Optional["Console"], text: str) -> None:
    if console is not None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)


def check_timing_args(provider: str, threads: Optional[int], repeats: int) -> None:
    """What bench and plan both take: a known provider, at least one thread, at least one round."""
    if provider not in PROVIDERS:
        raise UserError(f"--provider {provider!r}: expected one of {', '.join(PROVIDERS)}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: must be at least 1")
    if repeats < 1:
        raise UserError(f"--repeats {repeats}: must be at least 1")


def check_settings(batches, threads, provider, warmup, runs, duration, repeats) -> Settings:
    check_timing_args(provider, threads, repeats)
    try:
        batch_list = [int(b) for b in batches]
    except (TypeError, ValueError):
        raise UserError(f"--batch {batches!r}: expected positive integers such as 1,8,64") from None
    if not batch_list:
        raise UserError("--batch: give at least one batch size, such as 1,8,64")
    if any(b <= 0 for b in batch_list):
        raise UserError(f"--batch {','.join(map(str, batch_list))}: batch sizes must be positive integers")
    batch_list = sorted(set(batch_list))
    if warmup < 0:
        raise UserError(f"--warmup {warmup}: must be 0 or more")
    if runs is not None and duration is not None:
        raise UserError("give --runs or --duration, not both")
    if runs is not None and runs < 1:
        raise UserError(f"--runs {runs}: must be at least 1")
    if duration is not None and not 0 < duration < math.inf:
        raise UserError(f"--duration {duration}: must be a finite number of seconds, more than 0")
    if runs is None and duration is None:
        duration, min_runs = DEFAULT_DURATION_S, DEFAULT_MIN_RUNS
    else:
        min_runs = DURATION_MIN_RUNS if runs is None else int(runs)
    return Settings(batches=batch_list, threads=int(threads or usable_cores()), provider=provider,
                     warmup=int(warmup), runs=runs, duration=duration, min_runs=min_runs, repeats=int(repeats))


def check_batches_fit(entries: list[Entry], batches: list[int]) -> None:
    for e in entries:
        fixed = e.info.fixed_batch
        if fixed is not None and any(b != fixed for b in batches):
            raise UserError(f"{e.info.path}: the graph's batch is fixed at {fixed}, so --batch "
                            f"{','.join(map(str, batches))} cannot run (export with a dynamic batch)")


def check_ort_provider(provider: str) -> None:
    """ONNX Runtime here has the execution provider ``--provider`` names, or one line saying what to install."""
    if provider == "cpu":
        return
    need, have = PROVIDERS[provider], ort.get_available_providers()
    if need not in have:
        pkg = "onnxruntime-gpu" + (" with TensorRT" if provider == "tensorrt" else "")
        raise UserError(f"--provider {provider}: ONNX Runtime {ort.__version__} here has no {need} "
                        f"(it has {', '.join(have)}); install {pkg} on a machine with an NVIDIA GPU")


def check_provider_ready(provider: str, entries: list[Entry]) -> None:
    """Fail before any process starts, in one line naming what is missing."""
    if any(e.info.runtime == "onnxruntime" for e in entries):
        check_ort_provider(provider)
    plans = [e for e in entries if e.info.runtime == "tensorrt"]
    if plans:
        name = plans[0].info.path.name
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            raise UserError(f"{name}: a TensorRT plan needs the tensorrt package (pip install 'ekdc[tensorrt]') "
                            "and an NVIDIA GPU") from None
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"{name}: a TensorRT plan runs only on a CUDA GPU, and none is visible")
