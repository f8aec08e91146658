"""The recipe with the planned student: as a Recipe, as YAML, or as ``--set`` lines."""
from __future__ import annotations

import shlex

import yaml

from ..recipe import Recipe, dump_recipe, recipe_from_dict
from .candidates import plan_space
from .search import Plan


def planned_recipe(recipe: Recipe, plan: Plan) -> Recipe:
    """The recipe with its ``student:`` block replaced by the chosen config (validated again)."""
    raw = recipe.model_dump(mode="json")
    raw["student"] = {"arch": plan.arch, **plan.chosen.config}
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
    items = ["student.latency_ms=null"] if recipe.student.latency_ms is not None else []
    own = recipe.student.model_kwargs()
    kept = plan_space(plan.arch).kept  # the recipe's own unless a candidate named another (an ekd_student stem)
    chosen = plan.chosen.config
    for key in [k for k in chosen if k != "num_branches" and (k not in kept or chosen[k] != own.get(k))]:
        value = chosen[key]
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip().replace(", ", ",")
        items.append(f"student.{key}={text}")
    return [f"--set {shlex.quote(item)}" for item in items]
