"""Each model's rounds pooled into its report entry (percentiles, throughput, memory, spread), and the
ratios to the reference: the bench JSON (units in its "units" key)."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from ..contract import META_RECIPE
from ..onnx_graph import activation_peak_bytes, load_onnx
from .machine import machine_info
from .settings import Entry, Settings, ValData

FILE_KINDS = {"onnxruntime": "onnx", "tensorrt": "plan"}  # the report's "format" of each runtime's files


def median(xs: list[float]) -> float:
    return float(np.median(xs))


def _latency_stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean())}


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or den == 0:
        return None
    return float(num) / float(den)


def _model_entry(e: Entry, rounds: list[dict], s: Settings) -> dict[str, Any]:
    latency, throughput, spread, round_p50, samples = {}, {}, {}, {}, {}
    for b in s.batches:
        key = str(b)
        per_round = [r["batches"][key] for r in rounds]
        pooled = [x for xs in per_round for x in xs]
        latency[key] = _latency_stats(pooled)
        # images per second over the time spent in timed runs: batch / mean latency
        throughput[key] = b * 1e3 / latency[key]["mean"] if latency[key]["mean"] > 0 else None
        round_p50[key] = [median(xs) for xs in per_round]
        lo, hi, mid = min(round_p50[key]), max(round_p50[key]), median(round_p50[key])
        spread[key] = 100.0 * (hi - lo) / mid if len(rounds) > 1 and mid > 0 else None
        samples[key] = len(pooled)
    info = e.info
    big = str(max(s.batches))
    gflops = (2.0 * info.macs * throughput[big] / 1e9) if info.macs and throughput[big] else None
    accuracy = next((r["accuracy"] for r in rounds if r.get("accuracy") is not None), None)
    device = [r["device_mem_mib"] for r in rounds if r.get("device_mem_mib") is not None]
    return {
        "name": e.name, "path": str(info.path), "format": FILE_KINDS[info.runtime], "runtime": info.runtime,
        "kind": info.kind, "precision": info.precision, "recipe": info.metadata.get(META_RECIPE),
        "is_reference": e.is_reference,
        "provider": "tensorrt (plan)" if info.runtime == "tensorrt" else s.provider,
        "params": info.params, "macs": info.macs, "macs_exact": info.macs_exact, "stats_from": info.stats_from,
        "file_mb": info.file_mb,
        "peak_mem_mb": max(max(r["peak_rss_mib"], r.get("peak_before_model_mib", 0.0)) for r in rounds),
        # the model's own: the peak after the runtime's fixed cost of a session (the worker resets the
        # high-water mark there) minus the resident memory at that moment
        "model_mem_mb": median([max(0.0, r["peak_rss_mib"] - r["runtime_rss_mib"]) for r in rounds]),
        "model_mem_by_batch_mb": {str(b): median([max(0.0, r["peak_rss_by_batch_mib"][str(b)] - r["runtime_rss_mib"])
                                                  for r in rounds]) for b in s.batches},
        "weights_mb": None if info.weight_bytes is None else info.weight_bytes / 2**20,
        "activations_mb": _activations(info, s.batches),
        "baseline_mem_mb": min(r["baseline_rss_mib"] for r in rounds),
        "device_mem_mb": max(device) if device else None,
        "accuracy": accuracy,
        "latency_ms": latency, "throughput": throughput, "gflops": gflops,
        "spread_pct": spread, "round_p50_ms": round_p50, "samples": samples,
        "timing": rounds[0].get("timing"),
    }


def _activations(info, batches: list[int]) -> dict[str, Optional[float]]:
    """Each batch's peak of live activation bytes, from the graph (``activation_peak_bytes``), in MiB."""
    if info.runtime != "onnxruntime":
        return {str(b): None for b in batches}
    proto = load_onnx(info.path)
    peaks = {str(b): activation_peak_bytes(proto, b) for b in batches}
    return {b: None if v is None else v / 2**20 for b, v in peaks.items()}


def _vs(m: dict, ref: Optional[dict], batches: list[int]) -> dict[str, Any]:
    """Ratios to the reference, each oriented so that > 1 means this model is better (faster, smaller)."""
    g = (lambda k: ref.get(k)) if ref else (lambda k: None)  # noqa: E731
    rl = ref["latency_ms"] if ref else {}
    rt = ref["throughput"] if ref else {}
    acc, racc = m["accuracy"], g("accuracy")
    return {
        "speedup": {str(b): _ratio(rl.get(str(b), {}).get("p50"), m["latency_ms"][str(b)]["p50"]) for b in batches},
        "throughput_ratio": {str(b): _ratio(m["throughput"][str(b)], rt.get(str(b))) for b in batches},
        "memory_ratio": _ratio(g("model_mem_mb"), m["model_mem_mb"]),
        "memory_ratio_by_batch": {str(b): _ratio((g("model_mem_by_batch_mb") or {}).get(str(b)),
                                                 m["model_mem_by_batch_mb"][str(b)]) for b in batches},
        "file_ratio": _ratio(g("file_mb"), m["file_mb"]),
        "params_ratio": _ratio(g("params"), m["params"]),
        "macs_ratio": _ratio(g("macs"), m["macs"]),
        "accuracy_delta": (acc - racc) if acc is not None and racc is not None else None,
    }


def build_report(entries: list[Entry], results: dict[str, list[dict]], s: Settings,
                 val: Optional[ValData]) -> dict[str, Any]:
    models = [_model_entry(e, results[e.name], s) for e in entries]
    ref = next((m for m in models if m["is_reference"]), None)
    for m in models:
        m["vs_reference"] = _vs(m, ref, s.batches)
    first = models[0]["vs_reference"]
    return {
        "models": models,
        "reference": ref["name"] if ref else None,
        "speedup": first["speedup"],
        "memory_ratio": first["memory_ratio"],
        "batches": s.batches,
        "settings": {"provider": s.provider, "threads": s.threads, "inter_op_threads": 1, "execution": "sequential",
                     "graph_optimization": "ORT_ENABLE_ALL", "warmup": s.warmup, "runs": s.runs,
                     "duration_s": s.duration, "min_runs": s.min_runs, "repeats": s.repeats,
                     "order": "each round runs every model in a fresh process, order rotated by one per round"},
        "data": ({"source": val.source, "images": int(len(val.y)), "classes": len(val.classes)} if val else None),
        "machine": machine_info(s.provider, s.threads),
        "units": {"latency_ms": "milliseconds per batch", "throughput": "images per second",
                  "macs": "MACs per image", "params": "parameters (Conv/ConvTranspose/Gemm/MatMul weights and biases)",
                  "peak_mem_mb": "MiB, peak resident memory of the whole child process that loads and runs only "
                                 "that model (Python and the runtime included)",
                  "model_mem_mb": "MiB, the model's own memory, measured: that peak minus the process's resident "
                                  "memory after a session of a trivial graph (one Identity) was made and run with the "
                                  "same provider and options, so the runtime's fixed cost of a session is left out; "
                                  "median over rounds",
                  "model_mem_by_batch_mb": "MiB per batch size: model_mem_mb read after that batch size's runs "
                                           "(batch sizes run smallest first, so each holds the smaller ones' too)",
                  "weights_mb": "MiB, from the graph: the bytes of its stored tensors (initializers, constants)",
                  "activations_mb": "MiB per batch size, from the graph: the peak of live activation bytes over "
                                    "its nodes in order (fusion, in-place buffers, scratch space and the arena's "
                                    "reuse are not modelled)",
                  "file_mb": "MB (1e6 bytes)", "gflops": "GFLOP/s at the largest batch (2 x MACs x images/s)",
                  "spread_pct": "(max - min) / median of the per-round p50, percent",
                  "speedup": "reference p50 / model p50", "memory_ratio": "reference model_mem_mb / model model_mem_mb"},
    }
