"""``bench``: every model measured in its own child process, interleaved over rounds, pooled into a report.

Why child processes: peak resident memory is only the model's own when the process loads nothing
else, and a fresh process per (round, model) means no model inherits another's warm caches, arena
or thread pool. Why interleaved, rotating rounds: machine drift (thermal, other load) then spreads
over every model instead of landing on whichever ran last; the spread between rounds is reported so
a reader can tell a real difference from noise.

Top-level imports stay light: ``python -m ekdc.benchmark._worker`` imports this package too.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, Union

from ..contract import IMAGENET_MEAN, IMAGENET_STD, META_RECIPE, META_RUN_DIR, PROVIDERS, usable_cores
from ..errors import UserError
from .onnx_stats import ModelInfo, inspect_model

if TYPE_CHECKING:
    import numpy as np
    from rich.console import Console

DEFAULT_DURATION_S = 1.0  # per batch size and round, when neither runs nor duration is given
DEFAULT_MIN_RUNS = 10  # ... but never fewer timed runs than this
DURATION_MIN_RUNS = 3  # with an explicit --duration


@dataclasses.dataclass
class _Entry:
    name: str
    info: ModelInfo
    is_reference: bool = False
    feed: Optional[dict] = None  # how to feed the validation images (None: no accuracy for this model)


@dataclasses.dataclass
class _Settings:
    batches: list[int]
    threads: int
    provider: str
    warmup: int
    runs: Optional[int]
    duration: Optional[float]
    min_runs: int
    repeats: int


@dataclasses.dataclass
class _ValData:
    x: "np.ndarray"  # uint8 [N,3,H,W]: a quarter of float32's memory; the worker scales each chunk to [0,1]
    y: "np.ndarray"  # int64 [N]
    classes: list[str]
    source: str
    explicit: bool  # named by --data (problems are errors) rather than found in the metadata (problems are notes)


PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------------
# the library entry


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
    settings = _check_settings(batches, threads, provider, warmup, runs, duration, repeats)
    foreign = _foreign_feed(classes, preprocess)
    _check_outputs(json_path=json_path, plot_path=plot_path)
    entries = _entries(models, against, console)
    _check_batches_fit(entries, settings.batches)
    _check_provider_ready(settings.provider, entries)
    val = _resolve_data(data, entries[0].info, console)
    if val is not None:
        val = _check_data_fits(val, entries, console, foreign)
    _say(console, _plan_line(entries, settings))
    with tempfile.TemporaryDirectory(prefix="ekdc-bench-") as tmp:
        val_paths = _save_val(val, Path(tmp)) if val is not None else None
        results = _run_rounds(entries, settings, Path(tmp), val_paths, console)
    report = build_report(entries, results, settings, val)
    if json_path is not None:
        from .._io import write_json

        write_json(json_path, report)
        _say(console, f"wrote {json_path}")
    if plot_path is not None:
        from .report import write_plot

        write_plot(report, plot_path)
        _say(console, f"wrote {plot_path}")
    return report


def time_models(models: Sequence[PathLike], *, batches: Iterable[int] = (1,), threads: Optional[int] = None,
                provider: str = "cpu", warmup: int = 5, runs: Optional[int] = None, duration: Optional[float] = None,
                repeats: int = 3, on_child: Optional[Callable[[int, int], None]] = None) -> dict:
    """bench's measurement alone, no reference and no accuracy: each model in its own process, rounds
    interleaved, the same worker, clock and settings. Returns the report (``build_report``): per model,
    ``latency_ms`` and ``round_p50_ms`` per batch. ``ekdc plan`` times its candidates with it, so that a
    plan's latencies and bench's agree. ``on_child(done, total)`` follows the progress."""
    settings = _check_settings(batches, threads, provider, warmup, runs, duration, repeats)
    paths = [Path(m) for m in models]
    if not paths:
        raise UserError("no model to time")
    entries = [_Entry(name=n, info=inspect_model(p)) for n, p in zip(_unique_names(paths), paths)]
    _check_batches_fit(entries, settings.batches)
    _check_provider_ready(settings.provider, entries)
    with tempfile.TemporaryDirectory(prefix="ekdc-time-") as tmp:
        results = _run_rounds(entries, settings, Path(tmp), None, None, on_child)
    return build_report(entries, results, settings, None)


def _say(console: Optional["Console"], text: str) -> None:
    if console is not None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)


# --------------------------------------------------------------------------------------------------
# arguments


def _check_settings(batches, threads, provider, warmup, runs, duration, repeats) -> _Settings:
    if provider not in PROVIDERS:
        raise UserError(f"--provider {provider!r}: expected one of {', '.join(PROVIDERS)}")
    try:
        batch_list = [int(b) for b in batches]
    except (TypeError, ValueError):
        raise UserError(f"--batch {batches!r}: expected positive integers such as 1,8,64") from None
    if not batch_list:
        raise UserError("--batch: give at least one batch size, such as 1,8,64")
    if any(b <= 0 for b in batch_list):
        raise UserError(f"--batch {','.join(map(str, batch_list))}: batch sizes must be positive integers")
    batch_list = sorted(set(batch_list))
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: must be at least 1")
    if warmup < 0:
        raise UserError(f"--warmup {warmup}: must be 0 or more")
    if runs is not None and duration is not None:
        raise UserError("give --runs or --duration, not both")
    if runs is not None and runs < 1:
        raise UserError(f"--runs {runs}: must be at least 1")
    if duration is not None and not duration > 0:
        raise UserError(f"--duration {duration}: must be more than 0 seconds")
    if repeats < 1:
        raise UserError(f"--repeats {repeats}: must be at least 1")
    if runs is None and duration is None:
        duration, min_runs = DEFAULT_DURATION_S, DEFAULT_MIN_RUNS
    else:
        min_runs = DURATION_MIN_RUNS if runs is None else int(runs)
    return _Settings(batches=batch_list, threads=int(threads or usable_cores()), provider=provider,
                     warmup=int(warmup), runs=runs, duration=duration, min_runs=min_runs, repeats=int(repeats))


def _check_outputs(**paths: Optional[PathLike]) -> None:
    """Find an unwritable --json/--plot before the measurements, not after them."""
    from .._io import ensure_writable_dir

    for flag, p in paths.items():
        if p is None:
            continue
        if Path(p).is_dir():
            raise UserError(f"--{flag.split('_')[0]} {p} is a folder; give a file name")
        ensure_writable_dir(Path(p).parent)


def _entries(models, against, console) -> list[_Entry]:
    """The models in the order given, then the reference unless it is one of them."""
    paths = [Path(models)] if isinstance(models, (str, os.PathLike)) else [Path(m) for m in models]
    if not paths:
        raise UserError("no model to bench: give at least one exported .onnx file")
    infos = [inspect_model(p) for p in paths]
    seen: dict[Path, Path] = {}
    for p in paths:
        key = p.resolve()
        if key in seen:
            raise UserError(f"{p} is listed twice")
        seen[key] = p
    ref_path = _reference_path(paths[0], against, console)
    ref_index = None
    if ref_path is not None:
        key = ref_path.resolve()
        ref_index = next((i for i, p in enumerate(paths) if p.resolve() == key), None)
        if ref_index is None:
            infos.append(inspect_model(ref_path))
            paths.append(ref_path)
            ref_index = len(paths) - 1
    names = _unique_names(paths)
    return [_Entry(name=n, info=i, is_reference=(k == ref_index)) for k, (n, i) in enumerate(zip(names, infos))]


def _reference_path(first: Path, against: Optional[PathLike], console) -> Optional[Path]:
    if against is not None:
        p = Path(against)
        if not p.exists():
            raise UserError(f"--against: reference model not found: {p}")
        return p
    beside = first.parent / "teachers.onnx"
    if beside.is_file():
        return beside
    _say(console, f"no reference: no teachers.onnx beside {first} and no --against, so ratios are null")
    return None


def _unique_names(paths: list[Path]) -> list[str]:
    """File names, widened with parent folders only where two files share a name."""
    names = [p.name for p in paths]
    depth = 1
    while len(set(names)) < len(names) and depth < 8:
        depth += 1
        names = ["/".join(p.resolve().parts[-depth:]) if names.count(n) > 1 else n for p, n in zip(paths, names)]
    return names


def _check_batches_fit(entries: list[_Entry], batches: list[int]) -> None:
    for e in entries:
        fixed = e.info.fixed_batch
        if fixed is not None and any(b != fixed for b in batches):
            raise UserError(f"{e.info.path}: the graph's batch is fixed at {fixed}, so --batch "
                            f"{','.join(map(str, batches))} cannot run (export with a dynamic batch)")


def check_ort_provider(provider: str) -> None:
    """ONNX Runtime here has the execution provider ``--provider`` names, or one line saying what to install."""
    if provider == "cpu":
        return
    import onnxruntime as ort

    need, have = PROVIDERS[provider], ort.get_available_providers()
    if need not in have:
        pkg = "onnxruntime-gpu" + (" with TensorRT" if provider == "tensorrt" else "")
        raise UserError(f"--provider {provider}: ONNX Runtime {ort.__version__} here has no {need} "
                        f"(it has {', '.join(have)}); install {pkg} on a machine with an NVIDIA GPU")


def _check_provider_ready(provider: str, entries: list[_Entry]) -> None:
    """Fail before any process starts, in one line naming what is missing."""
    if any(e.info.format == "onnx" for e in entries):
        check_ort_provider(provider)
    plans = [e for e in entries if e.info.format == "plan"]
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


# --------------------------------------------------------------------------------------------------
# validation data


def _resolve_data(data: Optional[PathLike], first: ModelInfo, console) -> Optional[_ValData]:
    """``--data`` (a recipe or a run folder), else the run folder named in the first model's metadata."""
    if data is not None:
        recipe, source = _recipe_from(Path(data))
        return _load_val(recipe, source, explicit=True)
    run_dir = first.metadata.get(META_RUN_DIR)
    if not run_dir:
        _say(console, "no accuracy: no --data given and the model names no run folder (pass --data RECIPE|RUN_DIR)")
        return None
    if not (Path(run_dir) / "recipe.yaml").is_file():
        _say(console, f"no accuracy: the model's run folder {run_dir} is not there (pass --data RECIPE|RUN_DIR)")
        return None
    try:
        from ..run import RunDir

        return _load_val(RunDir(run_dir).recipe(), run_dir, explicit=False)
    except UserError as err:  # found, not asked for: a note, not a failure
        _say(console, f"no accuracy: {err}")
        return None


def _recipe_from(path: Path):
    if not path.exists():
        raise UserError(f"--data {path}: no such recipe or run folder")
    if path.is_dir():
        from ..run import RunDir

        return RunDir(path).recipe(), str(path)
    from ..recipe import load_recipe

    return load_recipe(path), str(path)


def _load_val(recipe, source: str, explicit: bool) -> _ValData:
    import numpy as np

    from ..data import index_splits

    index = index_splits(recipe.data)  # only the validation images are decoded
    x, y = index.take("val")
    return _ValData(x=x.numpy(), y=y.numpy().astype(np.int64, copy=False), classes=list(index.classes), source=source,
                    explicit=explicit)


def parse_preprocess(text: str) -> dict:
    """``raw`` (RGB in [0,1], what ekdc's exports take), ``imagenet``, or ``R,G,B/R,G,B`` (mean/std)."""
    t = text.strip().lower()
    if t == "raw":
        return {"mean": None, "std": None}
    if t == "imagenet":
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    try:
        mean, std = ([float(v) for v in part.split(",")] for part in t.split("/"))
        if len(mean) == len(std) == 3 and all(v > 0 for v in std):
            return {"mean": mean, "std": std}
    except ValueError:
        pass
    raise UserError(f"--preprocess {text!r}: expected raw, imagenet, or mean/std as R,G,B/R,G,B "
                    "(e.g. 0.485,0.456,0.406/0.229,0.224,0.225)")


def _foreign_feed(classes: Optional[Sequence[str]], preprocess: Optional[str]) -> Optional[dict]:
    if classes is None and preprocess is None:
        return None
    if classes is None or preprocess is None:
        raise UserError("--classes and --preprocess go together: a model from elsewhere needs both for accuracy")
    return {"classes": list(classes), **parse_preprocess(preprocess)}


def _feed_for(e: _Entry, val: _ValData, foreign: Optional[dict]) -> tuple[Optional[dict], Optional[str]]:
    """(how to feed this model the validation images, or the problem that rules accuracy out)."""
    h, w = int(val.x.shape[2]), int(val.x.shape[3])
    if e.info.input_hw is not None and tuple(e.info.input_hw) != (h, w):
        ih, iw = e.info.input_hw
        return None, f"validation images of {val.source} are {h}x{w} but {e.name} takes {ih}x{iw}"
    if e.info.from_ekdc:
        if len(e.info.classes) != len(val.classes):
            return None, f"{val.source} has {len(val.classes)} classes but {e.name} predicts {len(e.info.classes)}"
        return {}, None
    if foreign is None:
        return None, (f"{e.name} carries no ekdc metadata, so nothing says how to feed it: give --classes "
                      "(its outputs in order) and --preprocess")
    missing = [c for c in val.classes if c not in foreign["classes"]]
    if missing:
        return None, f"--classes lacks the data's class '{missing[0]}'"
    return {"class_index": [foreign["classes"].index(c) for c in val.classes], "mean": foreign["mean"],
            "std": foreign["std"]}, None


def _check_data_fits(val: _ValData, entries: list[_Entry], console, foreign: Optional[dict] = None) -> Optional[_ValData]:
    """Each model gets the validation images at its input size, fed as it expects, or no accuracy."""
    for e in entries:
        e.feed, problem = _feed_for(e, val, foreign)
        if problem is not None:
            if val.explicit and (e.info.from_ekdc or foreign is not None):
                raise UserError(f"--data: {problem}")
            _say(console, f"no accuracy for {e.name}: {problem}")
    return val if any(e.feed is not None for e in entries) else None


def _save_val(val: _ValData, tmp: Path) -> tuple[str, str]:
    import numpy as np

    xp, yp = tmp / "val_x.npy", tmp / "val_y.npy"
    np.save(xp, val.x)
    np.save(yp, val.y)
    return str(xp), str(yp)


# --------------------------------------------------------------------------------------------------
# rounds of child processes


def _plan_line(entries: list[_Entry], s: _Settings) -> str:
    budget = f"{s.runs} runs" if s.runs is not None else f"{s.duration:g} s (at least {s.min_runs} runs)"
    rounds = f"{s.repeats} round" + ("s" if s.repeats != 1 else "")
    return (f"benching {len(entries)} models at batch {','.join(map(str, s.batches))}: {rounds}, each "
            f"model in a fresh process, {s.warmup} warm-up + {budget} per batch size; {s.provider}, "
            f"{s.threads} threads")


def _run_rounds(entries: list[_Entry], s: _Settings, tmp: Path, val_paths: Optional[tuple[str, str]],
                console, on_child: Optional[Callable[[int, int], None]] = None) -> dict[str, list[dict]]:
    """Round r runs every model once, each in a fresh process, in an order rotated by r."""
    results: dict[str, list[dict]] = {e.name: [] for e in entries}
    n = len(entries)
    for r in range(s.repeats):
        order = list(range(n))[r % n:] + list(range(n))[: r % n]
        for k in order:
            e = entries[k]
            # accuracy is a property of the model, not of the round: compute it once
            res = _run_child(e, s, tmp, val_paths if r == 0 and e.feed is not None else None, tag=f"r{r}-m{k}")
            results[e.name].append(res)
            p50s = "/".join(f"{_median(res['batches'][str(b)]):.3g}" for b in s.batches)
            _say(console, f"[{r + 1}/{s.repeats}] {e.name}: p50 {p50s} ms at batch "
                          f"{'/'.join(map(str, s.batches))}, peak {res['peak_rss_mib']:.0f} MiB")
            if on_child is not None:
                on_child(sum(map(len, results.values())), n * s.repeats)
    return results


def _run_child(e: _Entry, s: _Settings, tmp: Path, val_paths: Optional[tuple[str, str]], tag: str) -> dict:
    spec_path, out_path = tmp / f"{tag}.spec.json", tmp / f"{tag}.result.json"
    spec = {
        "path": str(e.info.path.resolve()), "format": e.info.format, "provider": s.provider,
        "threads": s.threads, "batches": s.batches, "warmup": s.warmup, "runs": s.runs,
        "duration": s.duration, "min_runs": s.min_runs,
        "input_hw": list(e.info.input_hw) if e.info.input_hw else None, "fixed_batch": e.info.fixed_batch,
        "val_x": val_paths[0] if val_paths else None, "val_y": val_paths[1] if val_paths else None,
        "feed": e.feed, "input_name": e.info.input_name, "output_name": e.info.output_name,
        "cache_dir": str(tmp / "trt-cache"),
    }
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "ekdc.benchmark._worker", str(spec_path), str(out_path)],
                          capture_output=True, text=True, env=_child_env())
    try:
        res = json.loads(out_path.read_text())
    except (OSError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{e.name}: the measuring process died (exit code {proc.returncode}): {tail[:200]}") from None
    if "error" in res:
        raise UserError(f"{e.name}: {res['error']}")
    return res


def _child_env() -> dict[str, str]:
    """The parent's environment, with this ekdc importable even when it is not installed."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


# --------------------------------------------------------------------------------------------------
# pooling and ratios


def _median(xs: list[float]) -> float:
    import numpy as np

    return float(np.median(xs))


def _latency_stats(samples: list[float]) -> dict[str, float]:
    import numpy as np

    a = np.asarray(samples, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(a.mean())}


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    if num is None or den is None or den == 0:
        return None
    return float(num) / float(den)


def _model_entry(e: _Entry, rounds: list[dict], s: _Settings) -> dict[str, Any]:
    latency, throughput, spread, round_p50, samples = {}, {}, {}, {}, {}
    for b in s.batches:
        key = str(b)
        per_round = [r["batches"][key] for r in rounds]
        pooled = [x for xs in per_round for x in xs]
        latency[key] = _latency_stats(pooled)
        # images per second over the time spent in timed runs: batch / mean latency
        throughput[key] = b * 1e3 / latency[key]["mean"] if latency[key]["mean"] > 0 else None
        round_p50[key] = [_median(xs) for xs in per_round]
        lo, hi, mid = min(round_p50[key]), max(round_p50[key]), _median(round_p50[key])
        spread[key] = 100.0 * (hi - lo) / mid if len(rounds) > 1 and mid > 0 else None
        samples[key] = len(pooled)
    info = e.info
    big = str(max(s.batches))
    gflops = (2.0 * info.macs * throughput[big] / 1e9) if info.macs and throughput[big] else None
    accuracy = next((r["accuracy"] for r in rounds if r.get("accuracy") is not None), None)
    device = [r["device_mem_mib"] for r in rounds if r.get("device_mem_mib") is not None]
    return {
        "name": e.name, "path": str(info.path), "format": info.format,
        "kind": info.kind, "precision": info.precision, "recipe": info.metadata.get(META_RECIPE),
        "is_reference": e.is_reference,
        "provider": "tensorrt (plan)" if info.format == "plan" else s.provider,
        "params": info.params, "macs": info.macs, "macs_exact": info.macs_exact, "stats_from": info.stats_from,
        "file_mb": info.file_mb,
        "peak_mem_mb": max(r["peak_rss_mib"] for r in rounds),
        # the model's own: peak minus the process after `import onnxruntime`, before the model is loaded
        "model_mem_mb": _median([max(0.0, r["peak_rss_mib"] - r["runtime_rss_mib"]) for r in rounds]),
        "baseline_mem_mb": min(r["baseline_rss_mib"] for r in rounds),
        "device_mem_mb": max(device) if device else None,
        "accuracy": accuracy,
        "latency_ms": latency, "throughput": throughput, "gflops": gflops,
        "spread_pct": spread, "round_p50_ms": round_p50, "samples": samples,
        "timing": rounds[0].get("timing"),
    }


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
        "file_ratio": _ratio(g("file_mb"), m["file_mb"]),
        "params_ratio": _ratio(g("params"), m["params"]),
        "macs_ratio": _ratio(g("macs"), m["macs"]),
        "accuracy_delta": (acc - racc) if acc is not None and racc is not None else None,
    }


def build_report(entries: list[_Entry], results: dict[str, list[dict]], s: _Settings,
                 val: Optional[_ValData]) -> dict[str, Any]:
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
                  "model_mem_mb": "MiB, the model's own memory: that peak minus the process's resident memory after "
                                  "the runtime is imported, just before the model is loaded (weights and arena); "
                                  "median over rounds",
                  "file_mb": "MB (1e6 bytes)", "gflops": "GFLOP/s at the largest batch (2 x MACs x images/s)",
                  "spread_pct": "(max - min) / median of the per-round p50, percent",
                  "speedup": "reference p50 / model p50", "memory_ratio": "reference model_mem_mb / model model_mem_mb"},
    }


def machine_info(provider: str, threads: int) -> dict[str, Any]:
    import platform

    import onnxruntime as ort

    info: dict[str, Any] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable_cores(),
        "onnxruntime": ort.__version__, "provider": provider, "threads": threads,
        "python": platform.python_version(), "platform": platform.platform(),
    }
    if provider != "cpu":
        info["gpu"] = _gpu_name()
    return info


def cpu_model() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _gpu_name() -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None
