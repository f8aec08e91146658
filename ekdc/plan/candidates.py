"""The students a plan times: the default grid, or a user's list (``--candidates``), each completed with
the recipe's stem and branch count."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import yaml

from .._io import existing_file
from ..errors import UserError
from ..models import count_macs, count_params, create_model
from ..recipe import Recipe, StudentConfig, student_from_dict

# the default grid: widths as multiples of a base (trunk 16, stage i 16 * 2**i), 2 or 3 branch stages, 1 or
# 2 blocks per stage (trunk included); basic blocks over the whole grid, inverted residuals at two widths
WIDTH_MULTIPLIERS = (0.5, 0.75, 1.0, 1.5, 2.0)
BASE_WIDTH = 16
STAGE_COUNTS = (2, 3)
DEPTHS = (1, 2)
INVERTED_RESIDUAL_MULTIPLIERS = (1.0, 2.0)
WIDTH_STEP = 4  # widths are rounded to a multiple of this: kernels like channel counts in 4s and 8s

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
    """Each candidate as ``create_model`` keys: its own planned keys, the recipe's stem and branch count.
    Duplicates are dropped."""
    specs = default_candidates() if candidates is None else list(candidates)
    if not specs:
        raise UserError(f"{where}: no candidate student to plan with")
    base = {"stem": recipe.student.stem, "num_branches": recipe.student.num_branches}
    out: list[dict] = []
    for i, spec in enumerate(specs):
        given = spec.model_dump(exclude_unset=True) if isinstance(spec, StudentConfig) else spec
        if isinstance(given, dict) and given.get("latency_ms") is not None:
            raise UserError(f"{where}.{i}: a candidate is a student (widths, blocks), not a latency_ms")
        if isinstance(given, dict) and given.get("num_branches") not in (None, base["num_branches"]):
            raise UserError(f"{where}.{i}: num_branches is {given['num_branches']} but the recipe's student has "
                            f"{base['num_branches']} (student.num_branches: the planner keeps the branch count)")
        raw = {**base, **given} if isinstance(given, dict) else given
        cfg = student_from_dict(raw, f"{where}.{i}").model_kwargs()
        if cfg not in out:
            out.append(cfg)
    return out


def read_candidates(path: Union[str, Path]) -> list[dict]:
    """``--candidates FILE``: a YAML list of ``student:`` mappings (the planned keys; stem and the branch
    count come from the recipe)."""
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


def build_candidate(cfg: dict, num_classes: int, image_size: int):
    """The candidate with random weights (eval mode), its MACs and its deployed parameter count."""
    student = create_model("ekd_student", num_classes=num_classes, **cfg).eval()
    return student, count_macs(student, image_size), count_params(student)


def layouts(cfg: dict) -> tuple[str, ...]:
    # one branch folds to the same graph either way
    return ("grouped", "separate") if cfg["num_branches"] > 1 else ("grouped",)
