"""Plan the cifar10-limited student for several latency budgets: one planned recipe per budget, and a summary.

    python experiments/plan_budgets.py --out plans [--recipe recipes/cifar10-limited.yaml] \\
        [--budgets 0.3,0.6,1.2] [--batch 1] [--threads 2] [--repeats 3] [--candidates FILE]

For each budget B this is the equivalent of

    ekdc plan recipes/cifar10-limited.yaml --latency B --threads 2 --set name=cifar10-limited-plan-Bms \\
        --out plans/planned-Bms.yaml --json plans/plan-Bms.json

through the library: every budget is planned on its own (its own timing), so the summary also shows how
far two measurements of the same candidate agree. It writes planned-Bms.yaml (the recipe with the chosen
student, named cifar10-limited-plan-Bms so that the runs get their own folders), planned-Bms.png and
plan-Bms.json beside it, and summary.json: per budget the chosen config, its MACs and params, its planned
p50 and the commands that train, export and bench it. A budget that nothing meets is recorded with the
fastest candidate's latency, and the other budgets go on. About 2 minutes a budget on 2 cores.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

try:
    import ekdc  # noqa: F401
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ekdc.errors import UserError

PROG = "plan_budgets"


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the planned recipes and summary.json")
    p.add_argument("--recipe", type=Path, default=Path("recipes/cifar10-limited.yaml"))
    p.add_argument("--budgets", default="0.3,0.6,1.2", help="comma-separated p50 budgets in ms")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="intra-op threads (the study's: 2)")
    p.add_argument("--provider", default="cpu")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per plan")
    p.add_argument("--candidates", type=Path, default=None, help="YAML list of students [default: the default grid]")
    return p.parse_args(argv)


def _budgets(text: str) -> list[float]:
    try:
        budgets = [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--budgets {text!r}: expected comma-separated numbers of ms such as 0.3,0.6,1.2") from None
    if not budgets or any(b <= 0 for b in budgets):
        raise UserError(f"--budgets {text!r}: give at least one budget, each more than 0 ms")
    return budgets


def _tag(budget: float) -> str:
    return f"{budget:g}ms"


def _commands(a: argparse.Namespace, budget: float, name: str, planned: Path, layout: str) -> dict[str, str]:
    """The CLI equivalent of this plan, and what trains, exports and benches its student afterwards (the
    export in the fold layout the plan timed fastest: export's own --fold auto weighs batch 1 and 64)."""
    tag = _tag(budget)
    plan = ["ekdc", "plan", str(a.recipe), "--latency", f"{budget:g}", "--batch", str(a.batch), "--threads",
            str(a.threads), "--set", f"name={name}", "--out", str(planned), "--json", str(a.out / f"plan-{tag}.json")]
    if a.provider != "cpu":
        plan += ["--provider", a.provider]
    if a.repeats != 3:
        plan += ["--repeats", str(a.repeats)]
    if a.candidates is not None:
        plan += ["--candidates", str(a.candidates)]
    export_dir = a.out / f"export-{tag}"
    return {
        "plan": shlex.join(plan),
        "distill": shlex.join(["ekdc", "distill", str(planned), "--out", f"runs/{name}"]),
        "export": shlex.join(["ekdc", "export", f"runs/{name}", "--out", str(export_dir), "--fold", layout]),
        "bench": shlex.join(["ekdc", "bench", str(export_dir / "student.onnx"), "--batch", str(a.batch), "--threads",
                             str(a.threads), "--provider", a.provider]),
    }


def plan_one(a: argparse.Namespace, budget: float, console) -> dict:
    from ekdc._io import write_json, write_text
    from ekdc.plan import NoStudentFits, plan_student, plan_table, planned_yaml, read_candidates, write_plan_plot
    from ekdc.recipe import load_recipe

    base = load_recipe(a.recipe)
    name = f"{base.name}-plan-{_tag(budget)}"
    recipe = load_recipe(a.recipe, [f"name={name}"])
    tag = _tag(budget)
    planned = a.out / f"planned-{tag}.yaml"
    candidates = read_candidates(a.candidates) if a.candidates is not None else None
    t0 = time.perf_counter()
    try:
        plan = plan_student(recipe, budget, batch=a.batch, provider=a.provider, threads=a.threads,
                            candidates=candidates, repeats=a.repeats, console=console)
    except NoStudentFits as err:
        plan = err.plan
        write_json(a.out / f"plan-{tag}.json", plan.to_dict())
        fastest = min(plan.candidates, key=lambda c: c.p50_ms)
        console.print(plan_table(plan))
        return {"budget_ms": budget, "error": str(err), "fastest": fastest.short, "fastest_p50_ms": fastest.p50_ms}
    console.print(plan_table(plan))
    write_text(planned, planned_yaml(recipe, plan))
    write_plan_plot(plan, planned.with_suffix(".png"))
    write_json(a.out / f"plan-{tag}.json", plan.to_dict())
    c = plan.chosen
    return {"budget_ms": budget, "config": c.config, "student": c.short, "macs": c.macs, "params": c.params,
            "planned_p50_ms": c.p50_ms, "layout": c.layout, "spread_pct": c.spread_pct,
            "round_p50_ms": c.round_p50_ms, "planned_recipe": str(planned), "plan_seconds": round(time.perf_counter() - t0, 1),
            "candidates": len(plan.candidates), "machine": plan.machine,
            "commands": _commands(a, budget, name, planned, c.layout)}


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    console = Console(highlight=False)
    try:
        a = _args(argv)
        budgets = _budgets(a.budgets)
        from ekdc._io import ensure_writable_dir, write_json

        ensure_writable_dir(a.out)
        rows = []
        for budget in budgets:
            console.print(f"[bold]budget {budget:g} ms[/bold]")
            rows.append(plan_one(a, budget, console))
            write_json(a.out / "summary.json", {"recipe": str(a.recipe), "batch": a.batch, "threads": a.threads,
                                                "provider": a.provider, "repeats": a.repeats, "budgets": rows})
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    for r in rows:
        if "error" in r:
            console.print(f"{r['budget_ms']:g} ms: none fits; the fastest, {r['fastest']}, takes {r['fastest_p50_ms']:.3f} ms")
        else:
            console.print(f"{r['budget_ms']:g} ms: {r['student']}, {r['macs'] / 1e6:.1f}M MACs, planned p50 "
                          f"{r['planned_p50_ms']:.3f} ms -> {r['planned_recipe']}")
    console.print(f"wrote {a.out / 'summary.json'}; the plans hold for this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
