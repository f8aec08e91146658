"""The students a plan times: the recipe student's family's grid (``PlanSpace.grid``), or a user's list
(``--candidates``), each completed with the recipe's family, branch count and the keys the family keeps."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from .._io import existing_file
from ..errors import UserError
from ..models import PlanSpace, count_macs, count_params, create_model, get_student
from ..recipe import Recipe, StudentConfig, student_from_dict
from ..recipe.loading import load_yaml

CandidateSpec = Union[dict, StudentConfig]


@dataclasses.dataclass
class Candidate:
    """One student timed: its config (``create_model(arch, **config)``'s keys, its family the recipe's), its
    size and its latency in the fastest fold layout."""

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
    finer: bool = False  # timed in the finer pass, between the grid's chosen student and the next larger

    @property
    def short(self) -> str:
        return short_config(self.config)

    @property
    def spread_pct(self) -> Optional[float]:
        """(max - min) / median of the rounds' p50, percent, as bench reports it: the noise to judge by."""
        r = self.round_p50_ms
        return 100.0 * (max(r) - min(r)) / self.p50_ms if len(r) > 1 and self.p50_ms else None


def short_config(cfg: dict) -> str:
    """``trunk 16 / branches [16,32,64] basic``; blocks per stage as ``x2`` where more than one. Another
    family's config is shown as its keys: ``widths [64,80,80], trunk_stages 1``."""
    def blocks(n: int) -> str:
        return f"x{n}" if n != 1 else ""

    if "trunk_width" not in cfg:
        return ", ".join(f"{k} {json.dumps(v).replace(' ', '')}" for k, v in cfg.items() if k != "num_branches")

    kind = cfg["block"] if cfg["block"] == "basic" else f"{cfg['block']} e{cfg['expand_ratio']}"
    widths = ",".join(map(str, cfg["branch_widths"]))
    trunk, branches = f"{cfg['trunk_width']}{blocks(cfg['trunk_blocks'])}", f"[{widths}]{blocks(cfg['branch_blocks'])}"
    return f"trunk {trunk} / branches {branches} {kind}"


def plan_space(arch: str) -> PlanSpace:
    """The family's search space; one line when ``ekdc plan`` has none for it."""
    space = get_student(arch).plan
    if space is None:
        raise UserError(f"ekdc plan has no search space for student {arch} (its family registers no PlanSpace): "
                        "give its widths yourself")
    return space


def default_candidates(student: Optional[StudentConfig] = None) -> list[dict]:
    """The grid of the student's family for that student (default: ``ekd_student``'s)."""
    student = student if student is not None else StudentConfig()
    return plan_space(student.arch).grid(student.model_kwargs())


def same_stages(student: StudentConfig) -> list[dict]:
    """The family's grid, less the candidates whose number of stages differs from the student's."""
    space, own = plan_space(student.arch), student.model_kwargs()
    base = {k: own[k] for k in space.kept}
    return [c for c in default_candidates(student) if space.stages({**base, **c}) == space.stages(own)]


def candidate_configs(recipe: Recipe, candidates: Optional[Sequence[CandidateSpec]] = None,
                      where: str = "candidates") -> list[dict]:
    """Each candidate as ``create_model`` keys: its own keys, then the recipe's branch count and the keys its
    family keeps (``PlanSpace.kept``: ekd_student's stem). Duplicates are dropped."""
    arch = recipe.student.arch
    space = plan_space(arch)
    specs = default_candidates(recipe.student) if candidates is None else list(candidates)
    if not specs:
        raise UserError(f"{where}: no candidate student to plan with")
    own = recipe.student.model_kwargs()
    base = {"num_branches": recipe.student.num_branches, **{k: own[k] for k in space.kept}}
    out: list[dict] = []
    for i, spec in enumerate(specs):
        given = spec.model_dump(exclude_unset=True) if isinstance(spec, StudentConfig) else spec
        if isinstance(given, dict) and given.get("latency_ms") is not None:
            raise UserError(f"{where}.{i}: a candidate is a student (widths, blocks), not a latency_ms")
        if isinstance(given, dict) and given.get("num_branches") not in (None, base["num_branches"]):
            raise UserError(f"{where}.{i}: num_branches is {given['num_branches']} but the recipe's student has "
                            f"{base['num_branches']} (student.num_branches: the planner keeps the branch count)")
        if isinstance(given, dict) and given.get("arch", arch) != arch:
            raise UserError(f"{where}.{i}: arch is {given['arch']} but the recipe's student is {arch} (the planner "
                            "keeps the family: plan with a recipe of that student)")
        raw = {**base, **given, "arch": arch} if isinstance(given, dict) else given
        cfg = student_from_dict(raw, f"{where}.{i}").model_kwargs()
        if cfg not in out:
            out.append(cfg)
    return out


def read_candidates(path: Union[str, Path], recipe: Optional[Recipe] = None) -> list[dict]:
    """``--candidates FILE``: a YAML list of ``student:`` mappings (the planned keys; the family, branch
    count and kept keys come from the recipe). With ``recipe``, each is checked against it here, and a
    wrong one is named by the file."""
    path = existing_file(path, "--candidates", "a YAML file")
    try:
        raw = load_yaml(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError):
        raise UserError(f"--candidates {path}: not valid YAML") from None
    if not isinstance(raw, list) or not raw:
        raise UserError(f"--candidates {path}: expected a YAML list of student mappings "
                        "(- {trunk_width: 16, branch_widths: [16, 32]})")
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise UserError(f"{path}: candidates.{i}: expected a mapping of student keys, got {type(item).__name__}")
    if recipe is not None:
        candidate_configs(recipe, raw, where=f"{path}: candidates")
    return raw


def build_candidate(arch: str, cfg: dict, num_classes: int, image_size: int):
    """The candidate with random weights (eval mode), its MACs and its deployed parameter count."""
    student = create_model(arch, num_classes=num_classes, **cfg).eval()
    return student, count_macs(student, image_size), count_params(student)


def layouts(student) -> tuple[str, ...]:
    """The fold layouts to time: the family's (``fold_layouts``); for one branch ``separate`` is ``grouped``'s
    graph (``padded`` is not: it widens the channels)."""
    return tuple(x for x in student.fold_layouts if student.num_branches > 1 or x != "separate")
