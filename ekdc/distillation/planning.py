"""``student.latency_ms`` inside ``ekdc distill``: the student planned (``ekdc plan``) once, on rank 0,
before it is built, and kept in the run's plan.json, which ``--resume`` reads instead of planning again."""
from __future__ import annotations

import json

from .._io import write_json
from ..errors import UserError
from ..plan import plan_student, plan_table, short_config, write_plan_plot
from ..recipe import Recipe
from ..run import RunDir


def planned_student_config(recipe: Recipe, data, rt, run: RunDir, rep) -> dict:
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


def _plan_into(recipe: Recipe, data, run: RunDir, rep) -> dict:
    plan = plan_student(recipe, recipe.student.latency_ms, num_classes=data.num_classes, console=rep.console)
    record = plan.to_dict()
    write_json(run.plan_path, record)
    write_plan_plot(plan, run.path / "plan.png")
    if rep.console is not None:
        rep.console.print(plan_table(plan))
    rep.say(f"student: planned {plan.chosen.short}, p50 {plan.chosen.p50_ms:.3f} ms at {plan.target}; "
            f"{plan.holds_for} ({run.plan_path})")
    return record


def _read_plan(run: RunDir, rep) -> dict:
    try:
        record = json.loads(run.plan_path.read_text())
        config = record["chosen_config"]
        p50 = record["candidates"][record["chosen"]]["p50_ms"]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        raise UserError(f"{run.plan_path} cannot be read as a plan; remove it to plan again") from None
    rep.say(f"[dim]student: planned before, read from {run.plan_path}: {short_config(config)} ({p50:.3f} ms)[/dim]")
    return record


def plan_metrics(run: RunDir) -> dict:
    """``{"plan": ...}`` for metrics.json when the run planned its student, else ``{}``."""
    if not run.plan_path.is_file():
        return {}
    record = json.loads(run.plan_path.read_text())
    c = record["candidates"][record["chosen"]]
    return {"plan": {"budget_ms": record["budget_ms"], "batch": record["batch"], "provider": record["provider"],
                     "threads": record["threads"], "precision": record["precision"], "config": record["chosen_config"],
                     "student": short_config(record["chosen_config"]), "p50_ms": c["p50_ms"], "layout": c["layout"],
                     "macs": c["macs"], "params": c["params"], "candidates": len(record["candidates"]),
                     "machine": record["machine"].get("cpu"), "holds_for": "the machine it was timed on"}}
