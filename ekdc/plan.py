"""``ekdc plan``: the student for a latency budget, chosen before any training.

A student's latency does not depend on its weights: its folded, exported graph with random weights runs
as fast as the trained one. So each candidate student is built with random weights, folded in each
branch layout, exported (and, for int8, quantised) by export's own code, and timed by ``ekdc bench``'s
own worker (one process per file, rounds interleaved, the host clock), so that a plan's figures and
bench's agree. The chosen candidate is the one with the most MACs whose p50 latency is within the budget.

    from ekdc import load_recipe, plan_student
    plan = plan_student(load_recipe("recipes/cifar10-limited.yaml"), latency_ms=0.6, threads=2)
    plan.chosen.config      # the student: block's keys

Latencies are this machine's: the plan holds for the machine (and runtime, threads, batch) it was timed on.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import shlex
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

from .contract import META_FOLD, META_INPUT_SIZE, META_KIND, META_PRECISION, PROVIDERS, usable_cores
from .errors import UserError
from .recipe import PLANNED_KEYS, Recipe, StudentConfig, dump_recipe, recipe_from_dict, student_from_dict

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from .run import RunDir

PRECISIONS = ("fp32", "int8")

# the default grid: widths as multiples of a base (trunk 16, stage i 16 * 2**i), 2 or 3 branch stages, 1 or
# 2 blocks per stage (trunk included); basic blocks over the whole grid, inverted residuals at two widths
WIDTH_MULTIPLIERS = (0.5, 0.75, 1.0, 1.5, 2.0)
BASE_WIDTH = 16
STAGE_COUNTS = (2, 3)
DEPTHS = (1, 2)
INVERTED_RESIDUAL_MULTIPLIERS = (1.0, 2.0)
WIDTH_STEP = 4  # widths are rounded to a multiple of this: kernels like channel counts in 4s and 8s

# the short schedule: every file in a fresh process per round, rounds interleaved, the median of the
# rounds' p50; about 20 candidates x 2 layouts take a few minutes on 2 cores
WARMUP = 10
DURATION_S = 0.25
MIN_REPEATS = 1
REPEATS = 3
CALIBRATION_IMAGES = 32  # int8: random images calibrate the quantiser (latency does not depend on the scales)
PLACEHOLDER_MEAN, PLACEHOLDER_STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]  # normalisation costs the same for any values

CandidateSpec = Union[dict, StudentConfig]


@dataclasses.dataclass
class Candidate:
    """One student timed: its config (``create_model("ekd_student", **config)``'s keys), its size and its
    latency in the fastest fold layout."""

    index: int
    config: dict[str, Any]
    macs: int  # per image, Conv2d and Linear, as metrics.json counts them
    params: int  # deployed parameters (no training-only adapters)
    layout_p50_ms: dict[str, float] = dataclasses.field(default_factory=dict)  # each fold layout's median p50
    round_p50_ms: list[float] = dataclasses.field(default_factory=list)  # the fastest layout's p50 per round
    layout: Optional[str] = None  # the fold layout fastest at the planned batch
    p50_ms: Optional[float] = None  # that layout's median, over rounds, of the round's p50
    pareto: bool = False
    chosen: bool = False

    @property
    def short(self) -> str:
        return short_config(self.config)

    @property
    def spread_pct(self) -> Optional[float]:
        """(max - min) / median of the rounds' p50, percent, as bench reports it: the noise to judge by."""
        r = self.round_p50_ms
        return 100.0 * (max(r) - min(r)) / self.p50_ms if len(r) > 1 and self.p50_ms else None


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

    @property
    def target(self) -> str:
        """Where the figures hold, in words: ``batch 1 on cpu (2 threads)``."""
        return _target(self.batch, self.provider, self.threads, self.precision)

    @property
    def holds_for(self) -> str:
        gpu = f", GPU {self.machine['gpu']}" if self.machine.get("gpu") else ""
        return (f"timed on this machine ({self.machine.get('cpu', '?')}{gpu}; onnxruntime "
                f"{self.machine.get('onnxruntime', '?')}): the plan holds for it, re-plan on the deployment target")

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


# --------------------------------------------------------------------------------------------------
# candidates


def short_config(cfg: dict) -> str:
    """``trunk 16 / branches [16,32,64] basic``; blocks per stage as ``x2`` where more than one."""
    def blocks(n: int) -> str:
        return f"x{n}" if n != 1 else ""

    kind = cfg["block"] if cfg["block"] == "basic" else f"{cfg['block']} e{cfg['expand_ratio']}"
    widths = ",".join(map(str, cfg["branch_widths"]))
    trunk, branches = f"{cfg['trunk_width']}{blocks(cfg['trunk_blocks'])}", f"[{widths}]{blocks(cfg['branch_blocks'])}"
    return f"trunk {trunk} / branches {branches} {kind}"


def _width(base: int, multiplier: float) -> int:
    return max(WIDTH_STEP, int(round(base * multiplier / WIDTH_STEP)) * WIDTH_STEP)


def _grid_config(multiplier: float, stages: int, depth: int, block: str) -> dict:
    return {"trunk_width": _width(BASE_WIDTH, multiplier), "trunk_blocks": depth,
            "branch_widths": [_width(BASE_WIDTH * 2**i, multiplier) for i in range(stages)], "branch_blocks": depth,
            "block": block}


def default_candidates() -> list[dict]:
    """The default grid (24 students): the planned keys of each, the rest comes from the recipe."""
    grid = [_grid_config(m, s, d, "basic") for s in STAGE_COUNTS for d in DEPTHS for m in WIDTH_MULTIPLIERS]
    grid += [_grid_config(m, s, 1, "inverted_residual") for s in STAGE_COUNTS for m in INVERTED_RESIDUAL_MULTIPLIERS]
    return grid


def candidate_configs(recipe: Recipe, candidates: Optional[Sequence[CandidateSpec]] = None,
                      where: str = "candidates") -> list[dict]:
    """Each candidate as ``create_model`` keys: its own planned keys, the recipe's stem, one branch per
    teacher. Duplicates are dropped."""
    specs = default_candidates() if candidates is None else list(candidates)
    if not specs:
        raise UserError(f"{where}: no candidate student to plan with")
    base = {"stem": recipe.student.stem, "num_branches": len(recipe.teachers)}
    out: list[dict] = []
    for i, spec in enumerate(specs):
        given = spec.model_dump(exclude_unset=True) if isinstance(spec, StudentConfig) else spec
        if isinstance(given, dict) and given.get("latency_ms") is not None:
            raise UserError(f"{where}.{i}: a candidate is a student (widths, blocks), not a latency_ms")
        if isinstance(given, dict) and given.get("num_branches") not in (None, base["num_branches"]):
            raise UserError(f"{where}.{i}: num_branches is {given['num_branches']} but the recipe has "
                            f"{base['num_branches']} teachers (one branch each)")
        raw = {**base, **given} if isinstance(given, dict) else given
        cfg = student_from_dict(raw, f"{where}.{i}").model_kwargs()
        if cfg not in out:
            out.append(cfg)
    return out


def read_candidates(path: Union[str, Path]) -> list[dict]:
    """``--candidates FILE``: a YAML list of ``student:`` mappings (the planned keys; stem and the branch
    count come from the recipe)."""
    import yaml

    from ._io import existing_file

    path = existing_file(path, "--candidates", "a YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserError(f"--candidates {path}: not valid YAML") from None
    if not isinstance(raw, list) or not raw:
        raise UserError(f"--candidates {path}: expected a YAML list of student mappings "
                        "(- {trunk_width: 16, branch_widths: [16, 32]})")
    for i, item in enumerate(raw):
        student_from_dict(item, f"{path}: candidates.{i}")  # each named by the file, before anything is built
    return raw


def _build(cfg: dict, num_classes: int, image_size: int):
    """The candidate with random weights (eval mode), its MACs and its deployed parameter count."""
    from .models import count_macs, count_params, create_model

    student = create_model("ekd_student", num_classes=num_classes, **cfg).eval()
    return student, count_macs(student, image_size), count_params(student)


def _layouts(cfg: dict) -> tuple[str, ...]:
    # one branch folds to the same graph either way
    return ("grouped", "separate") if cfg["num_branches"] > 1 else ("grouped",)


def _export_files(student, layout: str, image_size: int, precision: str, folder: Path, stem: str) -> Path:
    """Export's own path: ``fold`` -> ``DeployModel`` -> ``export_onnx`` (-> ``quantize_int8``)."""
    from .deploy.fold import fold
    from .deploy.onnx import DeployModel, export_onnx

    meta = {META_KIND: "student", META_PRECISION: "fp32", META_FOLD: layout, META_INPUT_SIZE: str(image_size)}
    fp32 = export_onnx(DeployModel(fold(student, layout), PLACEHOLDER_MEAN, PLACEHOLDER_STD).eval(),
                       folder / f"{stem}.onnx", image_size, meta)
    if precision == "fp32":
        return fp32
    import numpy as np

    from .deploy.quantize import quantize_int8

    calib = np.random.default_rng(0).random((CALIBRATION_IMAGES, 3, image_size, image_size), dtype=np.float32)
    return quantize_int8(fp32, folder / f"{stem}.int8.onnx", calib, {**meta, META_PRECISION: "int8"})


# --------------------------------------------------------------------------------------------------
# choosing


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


def _check_args(latency_ms: float, batch: int, provider: str, threads: Optional[int], precision: str,
                repeats: int) -> None:
    if not latency_ms or not 0 < latency_ms < float("inf"):
        raise UserError(f"--latency {latency_ms}: the budget must be a number of ms more than 0")
    if batch < 1:
        raise UserError(f"--batch {batch}: must be at least 1")
    if provider not in PROVIDERS:
        raise UserError(f"--provider {provider!r}: expected one of {', '.join(PROVIDERS)}")
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: must be at least 1")
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if repeats < MIN_REPEATS:
        raise UserError(f"--repeats {repeats}: must be at least {MIN_REPEATS}")


def _class_count(recipe: Recipe) -> int:
    """The data's classes, as training will see them (an image folder is listed, nothing is decoded)."""
    from .data import index_splits

    return len(index_splits(recipe.data).classes)


# --------------------------------------------------------------------------------------------------
# the library entry


def plan_student(recipe: Recipe, latency_ms: float, *, batch: int = 1, provider: str = "cpu",
                 threads: Optional[int] = None, precision: str = "fp32",
                 candidates: Optional[Sequence[CandidateSpec]] = None, repeats: int = REPEATS,
                 num_classes: Optional[int] = None, console: Optional["Console"] = None) -> Plan:
    """Time every candidate student (default: ``default_candidates()``) on this machine and choose the one
    with the most MACs whose p50 latency at ``batch`` is at most ``latency_ms``. Raises ``NoStudentFits``
    (a UserError holding the plan) when none is fast enough."""
    import torch

    from .benchmark.runner import check_ort_provider, time_models

    _check_args(latency_ms, batch, provider, threads, precision, repeats)
    check_ort_provider(provider)  # before minutes of exporting
    configs = candidate_configs(recipe, candidates)
    size = recipe.data.image_size
    num_classes = int(num_classes or _class_count(recipe))
    threads = int(threads or usable_cores())
    say = _sayer(console)
    t0 = time.perf_counter()
    rows: list[Candidate] = []
    files: dict[str, tuple[Candidate, str]] = {}  # file name -> (candidate, layout)
    with tempfile.TemporaryDirectory(prefix="ekdc-plan-") as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights, but the same ones every time; the caller's RNG is left as it was
        n_files = sum(len(_layouts(c)) for c in configs)
        say(f"planning for p50 <= {latency_ms:g} ms at {_target(batch, provider, threads, precision)}: {len(configs)} "
            f"candidate students, {n_files} files to export ({size}px, {num_classes} classes)")
        for i, cfg in enumerate(configs):
            student, macs, params = _build(cfg, num_classes, size)
            cand = Candidate(index=i, config=cfg, macs=macs, params=params)
            rows.append(cand)
            for layout in _layouts(cfg):
                path = _export_files(student, layout, size, precision, Path(tmp), f"c{i:02d}-{layout}")
                files[path.name] = (cand, layout)
            say(f"  exported {i + 1}/{len(configs)}: {cand.short}")
        rounds = f"{repeats} round" + ("s" if repeats != 1 else "")
        say(f"timing {n_files} files with bench's worker: {rounds}, each file in a fresh process, {WARMUP} warm-up "
            f"runs + {DURATION_S:g} s")
        report = time_models([Path(tmp) / name for name in files], batches=[batch], threads=threads,
                             provider=provider, warmup=WARMUP, duration=DURATION_S, repeats=repeats,
                             on_child=_round_progress(say, len(files)))
    _fill_latencies(files, report, batch)
    mark_pareto(rows)
    chosen = choose(rows, latency_ms)
    if chosen is not None:
        chosen.chosen = True
    plan = Plan(budget_ms=float(latency_ms), batch=batch, provider=provider, threads=threads, precision=precision,
                image_size=size, num_classes=num_classes, candidates=rows, chosen=chosen, machine=report["machine"],
                settings={"warmup": WARMUP, "duration_s": DURATION_S, "repeats": repeats,
                          "timing": "ekdc bench's worker, host clock; p50 = median over rounds of each round's p50"},
                seconds=round(time.perf_counter() - t0, 1),
                created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    if chosen is None:
        raise NoStudentFits(plan)
    return plan


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
    import statistics

    per_round = {m["name"]: m["round_p50_ms"][str(batch)] for m in report["models"]}
    for name, (cand, layout) in files.items():
        rounds = per_round[name]
        cand.layout_p50_ms[layout] = statistics.median(rounds)
        if cand.layout is None or cand.layout_p50_ms[layout] < cand.p50_ms:
            cand.layout, cand.p50_ms, cand.round_p50_ms = layout, cand.layout_p50_ms[layout], list(rounds)


# --------------------------------------------------------------------------------------------------
# showing and writing


def plan_table(plan: Plan) -> "Table":
    from rich.table import Table

    from .tables import count_text

    t = Table(title=f"ekdc plan: the most MACs within p50 {plan.budget_ms:g} ms at {plan.target}")
    for col, just in (("#", "right"), ("student", "left"), ("MACs", "right"), ("params", "right"),
                      ("p50 ms", "right"), ("spread", "right"), ("fold", "left"), ("Pareto", "center"),
                      ("chosen", "left")):
        t.add_column(col, justify=just)
    for c in sorted(plan.candidates, key=lambda c: (c.macs, c.p50_ms)):
        over = c.p50_ms > plan.budget_ms
        spread = "-" if c.spread_pct is None else f"{c.spread_pct:.0f}%"
        t.add_row(str(c.index), c.short, count_text(c.macs), count_text(c.params),
                  f"[dim]{c.p50_ms:.3f}[/dim]" if over else f"{c.p50_ms:.3f}", spread, c.layout,
                  "*" if c.pareto else "", "<- chosen" if c.chosen else "")
    n = plan.settings["repeats"]
    t.caption = (f"p50: median over {n} interleaved round{'s' if n != 1 else ''}, fastest fold layout; spread: "
                 f"(max - min) / median of the rounds. * Pareto front (no candidate has more MACs at less latency). "
                 f"{plan.holds_for}")
    return t


def write_plan_plot(plan: Plan, path: Union[str, Path]) -> Path:
    """p50 latency against MACs for every candidate, the Pareto front joined, the budget and the chosen
    candidate marked; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ._io import atomic_path

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for block, marker in (("basic", "o"), ("inverted_residual", "s")):
        pts = [c for c in plan.candidates if c.config["block"] == block]
        if pts:
            ax.scatter([c.macs for c in pts], [c.p50_ms for c in pts], marker=marker, s=22, label=block, zorder=2)
    front = sorted((c for c in plan.candidates if c.pareto), key=lambda c: c.macs)
    ax.plot([c.macs for c in front], [c.p50_ms for c in front], color="gray", lw=1, zorder=1, label="Pareto front")
    for c in plan.candidates:
        ax.annotate(str(c.index), (c.macs, c.p50_ms), fontsize=6, xytext=(3, 2), textcoords="offset points")
    ax.axhline(plan.budget_ms, color="red", ls="--", lw=1, label=f"budget {plan.budget_ms:g} ms")
    if plan.chosen is not None:
        ax.scatter([plan.chosen.macs], [plan.chosen.p50_ms], marker="*", s=180, color="red", zorder=3,
                   label=f"chosen: {plan.chosen.short}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("MACs per image")
    ax.set_ylabel(f"p50 latency (ms per batch of {plan.batch})")
    ax.set_title(f"ekdc plan: {plan.target}, {plan.image_size}px; this machine only", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def planned_recipe(recipe: Recipe, plan: Plan) -> Recipe:
    """The recipe with its ``student:`` block replaced by the chosen config (validated again)."""
    raw = recipe.model_dump(mode="json")
    raw["student"] = {"arch": "ekd_student", **plan.chosen.config}
    return recipe_from_dict(raw, where="planned recipe")


def planned_yaml(recipe: Recipe, plan: Plan) -> str:
    """``planned_recipe`` as YAML, headed by a comment saying what was planned, and where it holds."""
    c = plan.chosen
    head = (f"# planned by `ekdc plan` on {plan.created}: the student with the most MACs whose p50 latency is\n"
            f"# <= {plan.budget_ms:g} ms at {plan.target}: {c.short}, {c.p50_ms:.3f} ms ({c.layout} fold),\n"
            f"# {c.macs} MACs. Timed on {plan.machine.get('cpu', '?')}: the plan holds for that machine.\n")
    return head + dump_recipe(planned_recipe(recipe, plan))


def set_lines(recipe: Recipe, plan: Plan) -> list[str]:
    """The ``--set`` arguments that give the recipe the chosen student (shell-quoted)."""
    import yaml

    items = ["student.latency_ms=null"] if recipe.student.latency_ms is not None else []
    keys = list(PLANNED_KEYS)
    if plan.chosen.config.get("stem") != recipe.student.stem:  # a candidate may name its own stem
        keys.append("stem")
    for key in keys:
        value = plan.chosen.config[key]
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip().replace(", ", ",")
        items.append(f"student.{key}={text}")
    return [f"--set {shlex.quote(item)}" for item in items]


# --------------------------------------------------------------------------------------------------
# inside `ekdc distill`: student.latency_ms


def planned_student_config(recipe: Recipe, data, rt, run: "RunDir", rep) -> dict:
    """The student's ``create_model`` keys: the recipe's, or with ``student.latency_ms`` the planned ones.
    Planned once, on rank 0, before the student is built, and kept in the run's plan.json, which
    ``--resume`` reads instead of planning again; the other ranks receive the config by broadcast."""
    if recipe.student.latency_ms is None:
        return recipe.student.model_kwargs()
    box: dict[str, dict] = {}

    def plan_once() -> None:
        box["record"] = _read_plan(run, rep) if run.plan_path.is_file() else _plan_into(recipe, data, run, rep)

    rt.on_main(plan_once)
    return dict(rt.from_main(box.get("record"))["chosen_config"])


def _plan_into(recipe: Recipe, data, run: "RunDir", rep) -> dict:
    from ._io import write_json

    plan = plan_student(recipe, recipe.student.latency_ms, num_classes=data.num_classes, console=rep.console)
    record = plan.to_dict()
    write_json(run.plan_path, record)
    write_plan_plot(plan, run.path / "plan.png")
    if rep.console is not None:
        rep.console.print(plan_table(plan))
    rep.say(f"student: planned {plan.chosen.short}, p50 {plan.chosen.p50_ms:.3f} ms at {plan.target}; "
            f"{plan.holds_for} ({run.plan_path})")
    return record


def _read_plan(run: "RunDir", rep) -> dict:
    import json

    try:
        record = json.loads(run.plan_path.read_text())
        config = record["chosen_config"]
        p50 = record["candidates"][record["chosen"]]["p50_ms"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        raise UserError(f"{run.plan_path} cannot be read as a plan; remove it to plan again") from None
    rep.say(f"[dim]student: planned before, read from {run.plan_path}: {short_config(config)} ({p50:.3f} ms)[/dim]")
    return record


def plan_metrics(run: "RunDir") -> dict:
    """``{"plan": ...}`` for metrics.json when the run planned its student, else ``{}``."""
    if not run.plan_path.is_file():
        return {}
    import json

    record = json.loads(run.plan_path.read_text())
    c = record["candidates"][record["chosen"]]
    return {"plan": {"budget_ms": record["budget_ms"], "batch": record["batch"], "provider": record["provider"],
                     "threads": record["threads"], "precision": record["precision"], "config": record["chosen_config"],
                     "student": short_config(record["chosen_config"]), "p50_ms": c["p50_ms"], "layout": c["layout"],
                     "macs": c["macs"], "params": c["params"], "candidates": len(record["candidates"]),
                     "machine": record["machine"].get("cpu"), "holds_for": "the machine it was timed on"}}
