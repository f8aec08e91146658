"""Timing the candidates and choosing one: ``plan_student``."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from rich.console import Console

from ..benchmark.runner import time_models
from ..benchmark.settings import check_ort_provider, check_timing_args
from ..contract import (
    META_FOLD,
    META_INPUT_SIZE,
    META_KIND,
    META_PRECISION,
)
from ..cores import usable_cores
from ..data import index_splits
from ..deploy.fold import fold
from ..deploy.onnx import DeployModel, export_onnx
from ..deploy.quantize import quantize_int8
from ..errors import UserError
from ..recipe import Recipe
from .candidates import (
    Candidate,
    CandidateSpec,
    build_candidate,
    candidate_configs,
    layouts,
    plan_space,
)

PRECISIONS = ("fp32", "int8")

# the short schedule: every file in a fresh process per round, rounds interleaved, the median of the
# rounds' p50; about 20 candidates x 2 layouts take a few minutes on 2 cores
WARMUP = 10
DURATION_S = 0.25
REPEATS = 3
CALIBRATION_IMAGES = 32  # int8: random images calibrate the quantiser (latency does not depend on the scales)
PLACEHOLDER_MEAN, PLACEHOLDER_STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]  # normalisation costs the same for any values


@dataclasses.dataclass
class Plan:
    budget_ms: float
    batch: int
    provider: str
    threads: int
    precision: str
    image_size: int
    num_classes: int
    candidates: list[Candidate]
    chosen: Optional[Candidate]
    machine: dict[str, Any]
    settings: dict[str, Any]
    seconds: float
    created: str
    arch: str = "ekd_student"  # the candidates' family: the recipe student's

    @property
    def target(self) -> str:
        """Where the figures hold, in words: ``batch 1 on cpu (2 threads)``."""
        return _target(self.batch, self.provider, self.threads, self.precision)

    @property
    def holds_for(self) -> str:
        gpu = f", GPU {self.machine['gpu']}" if self.machine.get("gpu") else ""
        return (f"timed on this machine ({self.machine.get('cpu', '?')}{gpu}; onnxruntime "
                f"{self.machine.get('onnxruntime', '?')}): the plan holds for it, re-plan on the deployment target")

    @property
    def export_flags(self) -> str:
        """The ``ekdc export`` flags that give the file this plan timed: its fold and, for int8, ``--int8``."""
        return ("--int8 " if self.precision == "int8" else "") + f"--fold {self.chosen.layout}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["chosen"] = self.chosen.index if self.chosen is not None else None
        d["chosen_config"] = dict(self.chosen.config) if self.chosen is not None else None
        return d


class NoStudentFits(UserError):
    """No candidate meets the budget; ``plan`` holds every measurement (the CLI still shows the table)."""

    def __init__(self, plan: Plan):
        fastest = min(plan.candidates, key=lambda c: c.p50_ms)
        super().__init__(f"no student meets {plan.budget_ms:g} ms at {plan.target}: the fastest of "
                         f"{len(plan.candidates)}, {fastest.short}, takes {fastest.p50_ms:.3g} ms")
        self.plan = plan


def _export_files(student, layout: str, image_size: int, precision: str, folder: Path, stem: str) -> Path:
    """Export's own path: ``fold`` -> ``DeployModel`` -> ``export_onnx`` (-> ``quantize_int8``)."""
    meta = {META_KIND: "student", META_PRECISION: "fp32", META_FOLD: layout, META_INPUT_SIZE: str(image_size)}
    fp32 = export_onnx(DeployModel(fold(student, layout), PLACEHOLDER_MEAN, PLACEHOLDER_STD).eval(),
                       folder / f"{stem}.onnx", image_size, meta)
    if precision == "fp32":
        return fp32
    calib = np.random.default_rng(0).random((CALIBRATION_IMAGES, 3, image_size, image_size), dtype=np.float32)
    return quantize_int8(fp32, folder / f"{stem}.int8.onnx", calib, {**meta, META_PRECISION: "int8"})


def mark_pareto(candidates: Sequence[Candidate]) -> None:
    """A candidate is on the front when no other has at least its MACs at no more latency, and is strictly
    better in one of the two."""
    for c in candidates:
        c.pareto = not any(o is not c and o.macs >= c.macs and o.p50_ms <= c.p50_ms
                           and (o.macs > c.macs or o.p50_ms < c.p50_ms) for o in candidates)


def choose(candidates: Sequence[Candidate], budget_ms: float) -> Optional[Candidate]:
    """The candidate with the most MACs whose p50 is within the budget (the faster of a tie); None if none."""
    fits = [c for c in candidates if c.p50_ms is not None and c.p50_ms <= budget_ms]
    return max(fits, key=lambda c: (c.macs, -c.p50_ms)) if fits else None


_MICRO = ("us", "\u00b5s", "\u03bcs")  # u, the micro sign and the Greek mu: keyboards give either
_PER_MS = {"ms": 1.0, "s": 1e-3, **{u: 1e3 for u in _MICRO}}  # units in a millisecond


def parse_latency(text: str) -> float:
    """``--latency`` as a person writes it: ``0.6`` (ms), ``0.6ms``, ``600us`` or ``0.0006s``, in ms."""
    m = re.fullmatch(r"\s*([-+0-9.eE]+|nan|inf)\s*([a-zA-Z\u00b5\u03bc]*)\s*", text, flags=re.IGNORECASE)
    unit = m.group(2).lower() if m else ""
    try:
        if m is None or (unit or "ms") not in _PER_MS:
            raise ValueError
        return float(m.group(1)) / _PER_MS[unit or "ms"]  # divided: 700us is 0.7 exactly, not 0.7000000000000001
    except ValueError:
        raise UserError(f"--latency {text!r}: expected a number of ms such as 0.6 (or with a unit: 0.6ms, "
                        f"600us, 0.0006s)") from None


def _check_args(latency_ms: float, batch: int, provider: str, threads: Optional[int], precision: str,
                repeats: int) -> None:
    if not latency_ms or not 0 < latency_ms < float("inf"):
        raise UserError(f"--latency {latency_ms}: the budget must be a number of ms more than 0")
    if batch < 1:
        raise UserError(f"--batch {batch}: must be at least 1")
    check_timing_args(provider, threads, repeats)
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")


def _class_count(recipe: Recipe) -> int:
    """The data's classes, as training will see them (an image folder is listed, nothing is decoded)."""
    return len(index_splits(recipe.data).classes)


def plan_student(recipe: Recipe, latency_ms: float, *, batch: int = 1, provider: str = "cpu",
                 threads: Optional[int] = None, precision: str = "fp32",
                 candidates: Optional[Sequence[CandidateSpec]] = None, repeats: int = REPEATS,
                 num_classes: Optional[int] = None, console: Optional["Console"] = None,
                 refine: Optional[bool] = None) -> Plan:
    """Time every candidate student (default: the family's grid, ``default_candidates``) on this machine and
    choose the one with the most MACs whose p50 latency at ``batch`` is at most ``latency_ms``. With ``refine``
    (default: when the candidates are the family's grid), the students between the chosen one and the next
    larger (``PlanSpace.between``) are timed in a second pass and may be chosen instead. Raises
    ``NoStudentFits`` (a UserError holding the plan) when none is fast enough."""
    _check_args(latency_ms, batch, provider, threads, precision, repeats)
    configs = candidate_configs(recipe, candidates)  # one line for a family ekdc plan cannot search
    check_ort_provider(provider)  # before minutes of exporting
    refine = candidates is None if refine is None else refine
    num_classes = int(num_classes or _class_count(recipe))
    threads = int(threads or usable_cores())
    say = _sayer(console)
    t0 = time.perf_counter()
    timing = dict(recipe=recipe, batch=batch, provider=provider, threads=threads, precision=precision,
                  num_classes=num_classes, repeats=repeats, say=say)
    say(f"planning for p50 <= {latency_ms:g} ms at {_target(batch, provider, threads, precision)}: {len(configs)} "
        f"candidate students ({recipe.data.image_size}px, {num_classes} classes)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights, but the same ones every time; the caller's RNG is left as it was
        rows, machine = _time_candidates(configs, 0, **timing)
        chosen = choose(rows, latency_ms)
        mids = _between(recipe, rows, chosen) if refine and chosen is not None else []
        if mids:
            say(f"a finer pass between {chosen.short} and the next larger student: {len(mids)} more")
            more, machine = _time_candidates(mids, len(rows), **timing, finer=True)
            rows += more
            chosen = choose(rows, latency_ms)
    mark_pareto(rows)
    if chosen is not None:
        chosen.chosen = True
    plan = Plan(budget_ms=float(latency_ms), batch=batch, provider=provider, threads=threads, precision=precision,
                image_size=recipe.data.image_size, num_classes=num_classes, candidates=rows, chosen=chosen,
                machine=machine, settings={"warmup": WARMUP, "duration_s": DURATION_S, "repeats": repeats,
                                           "timing": "ekdc bench's worker, host clock; p50 = median over rounds of "
                                                     "each round's p50", "finer_pass": bool(mids)},
                seconds=round(time.perf_counter() - t0, 1),
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), arch=recipe.student.arch)
    if chosen is None:
        raise NoStudentFits(plan)
    return plan


def _between(recipe: Recipe, rows: Sequence[Candidate], chosen: Candidate) -> list[dict]:
    """The family's students between ``chosen`` and the candidate of the next most MACs that ``between`` can
    reach (the same depth and blocks), not timed yet; [] when the family has no ``between``."""
    space = plan_space(recipe.student.arch)
    if space.between is None:
        return []
    timed = [c.config for c in rows]
    for larger in sorted((c for c in rows if c.macs > chosen.macs), key=lambda c: c.macs):
        mids = [m for m in space.between(chosen.config, larger.config) if m not in timed]
        if mids:
            return candidate_configs(recipe, mids, where="plan's finer pass")
    return []


def _time_candidates(configs: Sequence[dict], first_index: int, *, recipe: Recipe, batch: int, provider: str,
                     threads: int, precision: str, num_classes: int, repeats: int, say: Callable[[str], None],
                     finer: bool = False) -> tuple[list[Candidate], dict]:
    """Build, fold (each layout), export and time ``configs``, rounds interleaved: their Candidates (indices
    from ``first_index``) and the machine the timing ran on."""
    size = recipe.data.image_size
    rows: list[Candidate] = []
    files: dict[str, tuple[Candidate, str]] = {}  # file name -> (candidate, layout)
    with tempfile.TemporaryDirectory(prefix="ekdc-plan-") as tmp:
        for i, cfg in enumerate(configs, start=first_index):
            student, macs, params = build_candidate(recipe.student.arch, cfg, num_classes, size)
            cand = Candidate(index=i, config=cfg, macs=macs, params=params, finer=finer)
            rows.append(cand)
            for layout in layouts(student):
                path = _export_files(student, layout, size, precision, Path(tmp), f"c{i:02d}-{layout}")
                files[path.name] = (cand, layout)
            say(f"  exported {i - first_index + 1}/{len(configs)}: {cand.short}")
        rounds = f"{repeats} round" + ("s" if repeats != 1 else "")
        say(f"timing {len(files)} files with bench's worker: {rounds}, each file in a fresh process, {WARMUP} warm-up "
            f"runs + {DURATION_S:g} s")
        report = time_models([Path(tmp) / name for name in files], batches=[batch], threads=threads,
                             provider=provider, warmup=WARMUP, duration=DURATION_S, repeats=repeats,
                             on_child=_round_progress(say, len(files)))
    _fill_latencies(files, report, batch)
    return rows, report["machine"]


def _sayer(console: Optional["Console"]) -> Callable[[str], None]:
    if console is None:
        return lambda text: None
    return lambda text: console.print(text, markup=False, highlight=False)


def _target(batch: int, provider: str, threads: int, precision: str) -> str:
    return f"batch {batch} on {provider} ({threads} threads{'' if precision == 'fp32' else ', ' + precision})"


def _round_progress(say: Callable[[str], None], per_round: int) -> Callable[[int, int], None]:
    def on_child(done: int, total: int) -> None:
        if done % per_round == 0:
            say(f"  timed round {done // per_round}/{total // per_round}")

    return on_child


def _fill_latencies(files: dict[str, tuple[Candidate, str]], report: dict, batch: int) -> None:
    per_round = {m["name"]: m["round_p50_ms"][str(batch)] for m in report["models"]}
    for name, (cand, layout) in files.items():
        rounds = per_round[name]
        cand.layout_p50_ms[layout] = statistics.median(rounds)
        if cand.layout is None or cand.layout_p50_ms[layout] < cand.p50_ms:
            cand.layout, cand.p50_ms, cand.round_p50_ms = layout, cand.layout_p50_ms[layout], list(rounds)
