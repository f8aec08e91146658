"""The models to measure, and the rounds of child processes that measure them: round r runs every model
once, each in a fresh process, in an order rotated by r."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional

import onnx
from onnx import TensorProto, helper

from ..contract import INPUT_NAME, OUTPUT_NAME
from ..errors import UserError
from ..onnx_graph import inspect_model
from .pooling import median
from .settings import Entry, PathLike, Settings, say


def model_paths(models) -> list[Path]:
    """bench's ``models``: one path or several, as a list of at least one."""
    paths = [Path(models)] if isinstance(models, (str, os.PathLike)) else [Path(m) for m in models]
    if not paths:
        raise UserError("no model to bench: give at least one exported .onnx file")
    for p in paths:  # said here, before a report's paths are made from it ('.' has no name to put beside)
        if p.is_dir():
            raise UserError(f"model {p} is a folder, not a model file")
    return paths


def reports_inputs(models, against) -> dict[str, Path]:
    """What a report written by bench must not overwrite: each model, and the reference (given, or the default
    beside the first model), by what they are (``check_outputs``' inputs)."""
    paths = model_paths(models)
    return {**{f"input model {i + 1}": p for i, p in enumerate(paths)},
            "reference model": Path(against) if against is not None else paths[0].with_name("teachers.onnx")}


def bench_entries(models, against, console) -> list[Entry]:
    """The models in the order given, then the reference unless it is one of them."""
    paths = model_paths(models)
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
    names = unique_names(paths)
    return [Entry(name=n, info=i, is_reference=(k == ref_index)) for k, (n, i) in enumerate(zip(names, infos))]


def _reference_path(first: Path, against: Optional[PathLike], console) -> Optional[Path]:
    if against is not None:
        p = Path(against)
        if not p.exists():
            raise UserError(f"--against: reference model not found: {p}")
        return p
    beside = first.parent / "teachers.onnx"
    if beside.is_file():
        return beside
    say(console, f"no reference: no teachers.onnx beside {first} and no --against, so ratios are null")
    return None


def unique_names(paths: list[Path]) -> list[str]:
    """File names, widened with parent folders only where two files share a name."""
    names = [p.name for p in paths]
    depth = 1
    while len(set(names)) < len(names) and depth < 8:
        depth += 1
        names = ["/".join(p.resolve().parts[-depth:]) if names.count(n) > 1 else n for p, n in zip(paths, names)]
    return names




def plan_line(entries: list[Entry], s: Settings) -> str:
    budget = f"{s.runs} runs" if s.runs is not None else f"{s.duration:g} s (at least {s.min_runs} runs)"
    rounds = f"{s.repeats} round" + ("s" if s.repeats != 1 else "")
    return (f"benching {len(entries)} model{'s' if len(entries) != 1 else ''} at batch {','.join(map(str, s.batches))}: {rounds}, each "
            f"model in a fresh process, {s.warmup} warm-up + {budget} per batch size; {s.provider}, "
            f"{s.threads} threads")


def run_rounds(entries: list[Entry], s: Settings, tmp: Path, val_paths: Optional[tuple[str, str]],
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
            p50s = "/".join(f"{median(res['batches'][str(b)]):.3g}" for b in s.batches)
            say(console, f"[{r + 1}/{s.repeats}] {e.name}: p50 {p50s} ms at batch "
                          f"{'/'.join(map(str, s.batches))}, peak {res['peak_rss_mib']:.0f} MiB")
            if on_child is not None:
                on_child(sum(map(len, results.values())), n * s.repeats)
    return results


def _run_child(e: Entry, s: Settings, tmp: Path, val_paths: Optional[tuple[str, str]], tag: str) -> dict:
    spec_path, out_path = tmp / f"{tag}.spec.json", tmp / f"{tag}.result.json"
    spec = {
        "path": str(e.info.path.resolve()), "runtime": e.info.runtime, "provider": s.provider,
        "threads": s.threads, "batches": s.batches, "warmup": s.warmup, "runs": s.runs,
        "duration": s.duration, "min_runs": s.min_runs,
        "input_hw": list(e.info.input_hw) if e.info.input_hw else None, "fixed_batch": e.info.fixed_batch,
        "val_x": val_paths[0] if val_paths else None, "val_y": val_paths[1] if val_paths else None,
        "feed": e.feed, "input_name": e.info.input_name, "output_name": e.info.output_name,
        "cache_dir": str(tmp / "trt-cache"),
        "trivial": str(_trivial_graph(tmp, e.info.input_hw)) if e.info.input_hw else None,
    }
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "ekdc.benchmark._worker", str(spec_path), str(out_path)],
                          capture_output=True, text=True, env=_child_env())
    try:
        res = json.loads(out_path.read_text())
    except (OSError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        # SIGKILL with nothing said is, on Linux, most often the out-of-memory killer: the batch is what to cut
        hint = (f"; killed (SIGKILL), most often for memory: try a smaller --batch than {max(s.batches)}"
                if proc.returncode == -9 else "")
        raise UserError(f"{e.name}: the measuring process died (exit code {proc.returncode}): {tail[:200]}{hint}") \
            from None
    if "error" in res:
        raise UserError(f"{e.name}: {res['error']}")
    return res


def _trivial_graph(tmp: Path, hw) -> Path:
    """One Identity on an image batch: the session whose memory is the runtime's fixed cost, which the
    measured process subtracts from its peak (``model_mem_mb``)."""
    path = tmp / f"trivial-{hw[0]}x{hw[1]}.onnx"
    if not path.is_file():
        shape = ["batch", 3, int(hw[0]), int(hw[1])]
        x = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, shape)
        y = helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, shape)
        graph = helper.make_graph([helper.make_node("Identity", [INPUT_NAME], [OUTPUT_NAME])], "trivial", [x], [y])
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _child_env() -> dict[str, str]:
    """The parent's environment, with this ekdc importable even when it is not installed."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env
