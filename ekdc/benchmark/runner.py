"""``bench``: every model measured in its own child process, interleaved over rounds, pooled into a report.

Why child processes: peak resident memory is only the model's own when the process loads nothing
else, and a fresh process per (round, model) means no model inherits another's warm caches, arena
or thread pool. Why interleaved, rotating rounds: machine drift (thermal, other load) then spreads
over every model instead of landing on whichever ran last; the spread between rounds is reported so
a reader can tell a real difference from noise.

"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

from rich.console import Console

from .._io import check_outputs, write_json
from ..contract import META_QUANTIZATION
from ..errors import UserError
from ..onnx_graph import inspect_model
from .pooling import build_report
from .report import write_plot
from .rounds import bench_entries, plan_line, reports_inputs, run_rounds, unique_names
from .settings import (
    Entry,
    PathLike,
    check_batches_fit,
    check_provider_ready,
    check_settings,
    say,
)
from .valdata import check_data_fits, foreign_feed, resolve_data, save_val


def bench(models: Union[PathLike, Sequence[PathLike]], *, against: Optional[PathLike] = None,
          batches: Iterable[int] = (1, 8, 64), threads: Optional[int] = None, provider: str = "cpu",
          warmup: int = 5, runs: Optional[int] = None, duration: Optional[float] = None, repeats: int = 3,
          data: Optional[PathLike] = None, json_path: Optional[PathLike] = None,
          plot_path: Optional[PathLike] = None, console: Optional["Console"] = None,
          classes: Optional[Sequence[str]] = None, preprocess: Optional[str] = None) -> dict:
    """Measure ``models`` (and the reference, by default ``teachers.onnx`` beside the first model):
    latency percentiles and throughput per batch size, peak memory, size, params, MACs, accuracy,
    and their ratios to the reference. Returns the report (the JSON written to ``json_path``).

    Any ONNX image classifier can be benched; accuracy needs to know how to feed it: ekdc's exports say
    so in their metadata, a model from elsewhere through ``classes`` (its outputs in order) and
    ``preprocess`` (``raw``: RGB in [0,1]; ``imagenet``; or ``R,G,B/R,G,B``: mean/std)."""
    settings = check_settings(batches, threads, provider, warmup, runs, duration, repeats)
    foreign = foreign_feed(classes, preprocess)
    check_outputs(reports_inputs(models, against), json=json_path, plot=plot_path)  # before anything is read
    entries = bench_entries(models, against, console)
    check_batches_fit(entries, settings.batches)
    check_provider_ready(settings.provider, entries)
    val = resolve_data(data, entries[0].info, console)
    if val is not None:
        val = check_data_fits(val, entries, console, foreign)
    say(console, plan_line(entries, settings))
    for line in tensorrt_form_notes(entries, settings.provider):
        say(console, line)
    with tempfile.TemporaryDirectory(prefix="ekdc-bench-") as tmp:
        val_paths = save_val(val, Path(tmp)) if val is not None else None
        results = run_rounds(entries, settings, Path(tmp), val_paths, console)
    report = build_report(entries, results, settings, val)
    if json_path is not None:
        write_json(json_path, report)
        say(console, f"wrote {json_path}")
    if plot_path is not None:
        write_plot(report, plot_path)
        say(console, f"wrote {plot_path}")
    return report


def tensorrt_form_notes(entries: list, provider: str) -> list[str]:
    """A note for each int8 file in TensorRT's Q/DQ form (QAD's ``student.int8.tensorrt.onnx``) timed on ONNX
    Runtime's CPU or CUDA provider: its convolutions run in float there, so its time is not int8's."""
    if provider == "tensorrt":
        return []
    out = []
    for e in entries:
        try:
            form = json.loads(e.info.metadata.get(META_QUANTIZATION, "{}")).get("form", "")
        except (ValueError, AttributeError):
            continue
        if str(form).startswith("tensorrt-qdq"):
            out.append(f"note: {e.name} is int8 in TensorRT's Q/DQ form: on ONNX Runtime ({provider}) its convolutions "
                       "run in float, so its time is not int8's (build a TensorRT engine from it, or bench "
                       "student.int8.onnx)")
    return out


def time_models(models: Sequence[PathLike], *, batches: Iterable[int] = (1,), threads: Optional[int] = None,
                provider: str = "cpu", warmup: int = 5, runs: Optional[int] = None, duration: Optional[float] = None,
                repeats: int = 3, on_child: Optional[Callable[[int, int], None]] = None) -> dict:
    """bench's measurement alone, no reference and no accuracy: each model in its own process, rounds
    interleaved, the same worker, clock and settings. Returns the report (``build_report``): per model,
    ``latency_ms`` and ``round_p50_ms`` per batch. ``ekdc plan`` times its candidates with it, so that a
    plan's latencies and bench's agree. ``on_child(done, total)`` follows the progress."""
    settings = check_settings(batches, threads, provider, warmup, runs, duration, repeats)
    paths = [Path(m) for m in models]
    if not paths:
        raise UserError("no model to time")
    entries = [Entry(name=n, info=inspect_model(p)) for n, p in zip(unique_names(paths), paths)]
    check_batches_fit(entries, settings.batches)
    check_provider_ready(settings.provider, entries)
    with tempfile.TemporaryDirectory(prefix="ekdc-time-") as tmp:
        results = run_rounds(entries, settings, Path(tmp), None, None, on_child)
    return build_report(entries, results, settings, None)
