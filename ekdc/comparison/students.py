"""The one-branch students a comparison sets beside the recipe's: of equal MACs (widened), or of equal
measured latency (planned by ``ekdc plan`` for the recipe student's own p50)."""
from __future__ import annotations

from typing import Callable

from ..errors import UserError
from ..models import count_macs, create_model, get_student
from ..plan import plan_student, same_stages, short_config
from ..recipe import Recipe, recipe_from_dict

MACS_TOLERANCE = 0.05  # the plain student's MACs are within 5% of the recipe student's


def student_macs(config: dict, num_classes: int, image_size: int, arch: str = "ekd_student") -> int:
    return count_macs(create_model(arch, num_classes=num_classes, **config).eval(), image_size)


def equal_macs_student(config: dict, num_classes: int, image_size: int,
                       arch: str = "ekd_student") -> tuple[dict, int, int]:
    """One branch of the recipe student's layout, every width scaled by one factor (the family's
    ``one_branch_widened``) so that its MACs come within ``MACS_TOLERANCE`` of the recipe student's:
    (config, its MACs, the target)."""
    _widened = get_student(arch).one_branch_widened
    if _widened is None:
        raise UserError(f"compare: student {arch} has no one-branch form of equal MACs (its family gives no "
                        "one_branch_widened)")
    target = student_macs(config, num_classes, image_size, arch)
    macs = lambda m: student_macs(_widened(config, m), num_classes, image_size, arch)  # noqa: E731
    lo, hi = 1.0, 1.0
    while macs(hi) < target:  # one branch of N at the same widths has about 1/N of the branches' MACs
        lo, hi = hi, hi * 2
        if hi > 64:
            raise UserError("compare: no one-branch student reaches the recipe student's MACs")
    for _ in range(40):  # bisection on the width factor
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if macs(mid) < target else (lo, mid)
    best = min((lo, hi), key=lambda m: abs(macs(m) - target))
    cfg, got = _widened(config, best), macs(best)
    if abs(got - target) > MACS_TOLERANCE * target:
        raise UserError(f"compare: the closest one-branch student has {got:,} MACs against {target:,}: more than "
                        f"{MACS_TOLERANCE:.0%} apart")
    return cfg, got, target


def recipe_latency_ms(recipe: Recipe, config: dict, num_classes: int, say: Callable[[str], None],
                      rounds: int) -> float:
    """The recipe student's p50 at batch 1 on this machine, timed as ``ekdc plan`` times a candidate, over
    ``rounds`` fresh processes: the equal-latency student is planned for it, so a busy round must not set it."""
    plan = plan_student(recipe, float("1e9"), candidates=[config], num_classes=num_classes, repeats=rounds)
    say(f"compare: the recipe's student ({short_config(config)}) takes {plan.chosen.p50_ms:.3f} ms at {plan.target}")
    return plan.chosen.p50_ms


def planned_student(recipe: Recipe, budget_ms: float, num_classes: int, console) -> dict:
    """The one-branch student ``ekdc plan`` chooses for ``budget_ms`` among its family's candidates with as many
    stages as the recipe's student, and then between its grid's steps (the finer pass): the two differ in widths
    and branches, not in depth, and the one branch comes nearer the budget than the grid's steps alone allow."""
    raw = recipe.model_dump(mode="json")
    raw["student"] = {k: v for k, v in raw["student"].items() if k not in ("latency_ms",)} | {"num_branches": 1}
    raw["mode"] = "avg_kd" if raw["mode"] == "ekd" else raw["mode"]  # what the one branch trains with is the row's
    one = recipe_from_dict(raw, where="compare: the one-branch recipe")
    candidates = same_stages(recipe.student)
    return dict(plan_student(one, budget_ms, candidates=candidates, num_classes=num_classes, refine=True,
                             console=console).chosen.config)
