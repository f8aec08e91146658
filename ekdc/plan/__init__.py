"""``ekdc plan``: the student for a latency budget, chosen before any training.

A student's latency does not depend on its weights: its folded, exported graph with random weights runs
as fast as the trained one. So each candidate student is built with random weights, folded in each
branch layout, exported (and, for int8, quantised) by export's own code, and timed by ``ekdc bench``'s
own worker (one process per file, rounds interleaved, the host clock), so that a plan's figures and
bench's agree. The chosen candidate is the one with the most MACs whose p50 latency is within the budget.
Each student family says what to search (``PlanSpace``, registered with it): ekd_student a fixed grid of
widths, depths and block kinds; fastnet_student the recipe's own stages at widths scaled by one factor.

    from ekdc import load_recipe, plan_student
    plan = plan_student(load_recipe("recipes/cifar10-limited.yaml"), latency_ms=0.6, threads=2)
    plan.chosen.config      # the student: block's keys

Latencies are this machine's: the plan holds for the machine (and runtime, threads, batch) it was timed on.
"""
from .candidates import (
           Candidate,
           candidate_configs,
           default_candidates,
           plan_space,
           read_candidates,
           same_stages,
           short_config,
)
from .rewrite import planned_recipe, planned_yaml, set_lines
from .search import NoStudentFits, Plan, choose, mark_pareto, parse_latency, plan_student
from .show import plan_table, write_plan_plot

__all__ = ["Candidate", "NoStudentFits", "Plan", "candidate_configs", "choose", "default_candidates", "mark_pareto",
           "parse_latency", "plan_space", "plan_student", "plan_table", "planned_recipe", "planned_yaml", "read_candidates",
           "same_stages", "set_lines", "short_config", "write_plan_plot"]
