"""`ekdc plan`: the student for a latency budget, timed on this machine before training."""
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from ekdc import UserError, load_recipe
from ekdc.plan import (Candidate, NoStudentFits, choose, default_candidates, mark_pareto, parse_latency, plan_student,
                       planned_recipe, set_lines, short_config)
from ekdc.recipe import apply_overrides, dump_recipe, recipe_from_dict
from tests.conftest import run_cli, tiny_recipe, write_recipe

# tiny candidates, far apart in MACs: the test's timing is a few seconds
SMALL = {"trunk_width": 4, "branch_widths": [4, 8]}
MEDIUM = {"trunk_width": 8, "branch_widths": [8, 16]}
LARGE = {"trunk_width": 16, "branch_widths": [16, 32], "branch_blocks": 2}
# one teacher, one epoch: one branch (one fold layout to time) and seconds of training
ONE_TEACHER = dict(teachers=[{"arch": "resnet8", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}}],
                   distill={"epochs": 1})


def _candidates_file(path: Path, *cands: dict) -> Path:
    path.write_text(yaml.safe_dump(list(cands)))
    return path


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One real plan of three tiny students (2 branches: both fold layouts timed), reused below."""
    recipe = load_recipe(write_recipe(tmp_path_factory.mktemp("plan") / "tiny.yaml"))
    return recipe, plan_student(recipe, 1e4, candidates=[SMALL, MEDIUM, LARGE], repeats=2)


def test_chosen_meets_budget_and_is_the_largest_that_does(measured):
    recipe, plan = measured
    assert (plan.batch, plan.provider, plan.precision, plan.num_classes) == (1, "cpu", "fp32", 4)
    for c in plan.candidates:
        # timed in both layouts, each the median over rounds of a round's p50; the faster one counts
        assert set(c.layout_p50_ms) == {"grouped", "separate"} and len(c.round_p50_ms) == 2
        assert c.p50_ms == min(c.layout_p50_ms.values()) > 0 and c.layout_p50_ms[c.layout] == c.p50_ms
        assert c.config["num_branches"] == 2 and c.config["stem"] == recipe.student.stem == "cifar"
    # MACs as metrics.json counts them: the largest candidate has the most
    assert [c.macs for c in plan.candidates] == sorted(c.macs for c in plan.candidates)
    assert plan.chosen is plan.candidates[-1] and plan.chosen.chosen and plan.chosen.p50_ms <= plan.budget_ms
    # every budget on the same measurements: the chosen one fits and no fitting one has more MACs
    for budget in sorted(c.p50_ms for c in plan.candidates):
        pick = choose(plan.candidates, budget)
        fits = [c for c in plan.candidates if c.p50_ms <= budget]
        assert pick.p50_ms <= budget and pick.macs == max(c.macs for c in fits)
    assert choose(plan.candidates, 0.99 * min(c.p50_ms for c in plan.candidates)) is None
    # the plan's record: JSON, and it names its chosen config
    record = json.loads(json.dumps(plan.to_dict()))
    assert record["chosen_config"] == plan.chosen.config and record["machine"]["threads"] == plan.threads


def test_planned_recipe_holds_the_chosen_student(measured):
    recipe, plan = measured
    planned = planned_recipe(recipe, plan)
    assert planned.student.model_kwargs() == plan.chosen.config
    assert planned.model_dump(exclude={"student"}) == recipe.model_dump(exclude={"student"})
    assert recipe_from_dict(yaml.safe_load(dump_recipe(planned))) == planned
    # without --out, the CLI prints these: the recipe with them is the planned one
    lines = set_lines(recipe, plan)
    assert "--set 'student.branch_widths=[16,32]'" in lines and "--set student.branch_blocks=2" in lines
    overrides = [shlex.split(line)[1] for line in lines]
    assert recipe_from_dict(apply_overrides(recipe.model_dump(mode="json"), overrides)) == planned


def test_set_lines_carry_a_candidates_own_stem(measured):
    import copy

    recipe, plan = measured
    plan = copy.deepcopy(plan)
    other = "imagenet" if recipe.student.stem == "cifar" else "cifar"
    plan.chosen.config["stem"] = other  # --candidates may time a stem other than the recipe's
    lines = set_lines(recipe, plan)
    assert f"--set student.stem={other}" in lines
    overrides = [shlex.split(line)[1] for line in lines]
    assert recipe_from_dict(apply_overrides(recipe.model_dump(mode="json"), overrides)).student.stem == other


def test_pareto_front_on_a_synthetic_table():
    cfg = {"trunk_width": 8, "trunk_blocks": 1, "branch_widths": [8], "branch_blocks": 1, "block": "basic",
           "expand_ratio": 6}
    rows = [Candidate(i, cfg, macs=m, params=0, p50_ms=t) for i, (m, t) in enumerate(
        [(100, 1.0), (200, 1.5), (150, 2.0), (300, 1.5), (300, 3.0), (50, 1.0), (400, 4.0)])]
    mark_pareto(rows)
    # 0 (100 @ 1.0) beats 5 (50 @ 1.0); 3 (300 @ 1.5) beats 1, 2 and 4; 6 has the most MACs
    assert [r.index for r in rows if r.pareto] == [0, 3, 6]
    assert choose(rows, 1.6).index == 3 and choose(rows, 1.0).index == 0 and choose(rows, 0.5) is None
    assert choose(rows, 10).index == 6


def test_default_grid():
    grid = default_candidates()
    assert 18 <= len(grid) <= 26 and len({json.dumps(g, sort_keys=True) for g in grid}) == len(grid)
    assert {len(g["branch_widths"]) for g in grid} == {2, 3} and {g["branch_blocks"] for g in grid} == {1, 2}
    assert {g["block"] for g in grid} == {"basic", "inverted_residual"}
    assert all(w % 4 == 0 and w > 0 for g in grid for w in [g["trunk_width"], *g["branch_widths"]])
    assert short_config({**grid[0], "expand_ratio": 6}) == "trunk 8 / branches [8,16] basic"


def test_latency_ms_excludes_explicit_widths(tmp_path):
    raw = tiny_recipe()
    raw["student"] = {"latency_ms": 0.5, "trunk_width": 8, "branch_widths": [8, 16], "stem": "cifar"}
    with pytest.raises(UserError) as e:
        recipe_from_dict(raw, "r.yaml")
    msg = str(e.value)
    assert "\n" not in msg and "student" in msg and "remove trunk_width, branch_widths (or latency_ms)" in msg
    with pytest.raises(UserError, match="latency_ms: must be > 0"):
        recipe_from_dict({**raw, "student": {"latency_ms": 0}})
    # alone (a stem may be given) it loads, and a run folder's recipe.yaml of it loads again
    raw["student"] = {"latency_ms": 0.5, "stem": "cifar"}
    r = recipe_from_dict(raw)
    assert r.student.latency_ms == 0.5 and recipe_from_dict(yaml.safe_load(dump_recipe(r))) == r


def test_latency_is_read_in_ms_or_with_a_unit():
    assert parse_latency("0.6") == 0.6 and parse_latency("0.6ms") == 0.6 and parse_latency(" 0.6 MS ") == 0.6
    assert parse_latency("700us") == 0.7 and parse_latency("700\u00b5s") == 0.7  # exactly: 700 / 1000
    assert parse_latency("700\u03bcs") == 0.7  # the Greek mu, which many keyboards give for the micro sign
    assert parse_latency("0.5s") == 500.0 and parse_latency("1e-1") == pytest.approx(0.1)
    for text in ("", "ms", "1 min", "fast", "0.6msx", "1\u017f", "5ks"):
        with pytest.raises(UserError, match=r"expected a number of ms such as 0.6"):
            parse_latency(text)
    res = run_cli("plan", "recipes/cifar10-limited.yaml", "--latency", "-1ms")  # parsed, then refused as a budget
    assert res.returncode == 2 and "the budget must be a number of ms more than 0" in res.stderr.strip().splitlines()[-1]


def test_impossible_budget_is_one_line_and_exit_2(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", **ONE_TEACHER)
    cands = _candidates_file(tmp_path / "c.yaml", SMALL, MEDIUM)
    res = run_cli("plan", recipe, "--latency", "0.01us", "--candidates", cands, "--repeats", "1")  # 1e-05 ms
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert "no student meets 1e-05 ms at batch 1 on cpu" in lines[0]
    # which of the two is faster is the machine's to say (they are close): the message names one of them
    assert re.search(r"the fastest of 2, trunk (4 / branches \[4,8\]|8 / branches \[8,16\]) basic, takes", lines[0])
    assert "Traceback" not in res.stderr and "Pareto" in res.stdout  # the measurements are still shown


def test_a_plot_plan_chose_is_not_called_a_flag_the_user_never_gave(tmp_path):
    (tmp_path / "planned.png").write_text("my notes")  # beside --out, where plan would put its plot
    res = run_cli("plan", "recipes/cifar10-limited.yaml", "--latency", "1", "--out", tmp_path / "planned.yaml")
    assert res.returncode == 2, res.stderr
    assert f"the plot beside --out {tmp_path / 'planned.png'} exists and is not a PNG image" in res.stderr
    assert "give --plot another file" in res.stderr and (tmp_path / "planned.png").read_text() == "my notes"
    res = run_cli("plan", "recipes/cifar10-limited.yaml", "--latency", "1", "--out", tmp_path / "planned.yaml",
                  "--plot", tmp_path / "planned.png")  # given by the user, it is the flag's
    assert res.returncode == 2 and f"--plot {tmp_path / 'planned.png'} exists" in res.stderr, res.stderr


def test_planned_yaml_loads_and_trains(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", **ONE_TEACHER)
    cands = _candidates_file(tmp_path / "c.yaml", SMALL, MEDIUM)
    out = tmp_path / "planned.yaml"
    res = run_cli("plan", recipe, "--out", recipe, "--latency", "1000", "--candidates", cands)
    assert res.returncode == 2 and "is the input recipe" in res.stderr  # refused before any timing
    before = cands.read_bytes()
    for flag in ("--out", "--json"):  # the candidates file is an input too: never replaced by a report
        res = run_cli("plan", recipe, "--latency", "1000", "--candidates", cands, flag, cands)
        assert res.returncode == 2 and f"{flag} {cands} is the candidates file" in res.stderr, res.stderr
    assert cands.read_bytes() == before
    res = run_cli("plan", recipe, "--latency", "1s", "--candidates", cands, "--repeats", "1", "--out", out)
    assert res.returncode == 0, res.stderr
    assert "holds for" in res.stdout and (tmp_path / "planned.png").stat().st_size > 0
    planned = load_recipe(out)
    assert planned.student.trunk_width == 8 and planned.student.branch_widths == [8, 16]  # the larger fits 1 s
    assert planned.teachers == load_recipe(recipe).teachers
    res = run_cli("distill", out, "--out", tmp_path / "run", "-q")
    assert res.returncode == 0, res.stderr
    ck = torch.load(tmp_path / "run" / "student.pt", weights_only=True)
    assert ck["config"]["trunk_width"] == 8 and ck["config"]["branch_widths"] == [8, 16]


def test_distill_plans_once_and_resume_reuses_the_plan(tmp_path, monkeypatch):
    import ekdc.distillation.planning as planning
    import ekdc.plan.candidates as candidates_mod
    from ekdc import distill

    calls = []
    real = planning.plan_student

    def counting(*args, **kwargs):
        calls.append(args[1])
        return real(*args, **{**kwargs, "repeats": 1})

    monkeypatch.setattr(candidates_mod, "default_candidates", lambda *_: [SMALL, MEDIUM])
    monkeypatch.setattr(planning, "plan_student", counting)
    raw = tiny_recipe(**ONE_TEACHER)
    raw["student"] = {"latency_ms": 1000.0}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    run = distill(load_recipe(path), tmp_path / "run", progress=False)
    assert calls == [1000.0]
    record = json.loads(run.plan_path.read_text())
    assert record["chosen_config"]["trunk_width"] == 8 and len(record["candidates"]) == 2
    assert (run.path / "plan.png").stat().st_size > 0
    plan = run.metrics()["plan"]
    assert plan["config"] == record["chosen_config"] and plan["budget_ms"] == 1000.0 and 0 < plan["p50_ms"] <= 1000
    assert plan["holds_for"] == "the machine it was timed on" and plan["macs"] == run.metrics()["student"]["macs"]
    ck = torch.load(run.student_path, weights_only=True)
    assert ck["config"] == record["chosen_config"]  # what export rebuilds the student from
    assert run.recipe().student.latency_ms == 1000.0  # the run's recipe.yaml loads again
    # a run killed in the student stage: --resume reads plan.json and never plans again
    run.student_path.unlink()
    run.metrics_path.unlink()
    again = distill(load_recipe(path), run.path, resume=True, progress=False)
    assert calls == [1000.0]
    assert torch.load(again.student_path, weights_only=True)["config"] == record["chosen_config"]
    assert again.metrics()["plan"]["config"] == record["chosen_config"]


def test_no_student_fits_holds_the_plan(measured):
    recipe, plan = measured
    err = NoStudentFits(plan)
    fastest = min(plan.candidates, key=lambda c: c.p50_ms)
    assert isinstance(err, UserError) and err.plan is plan and fastest.short in str(err) and "\n" not in str(err)


def test_budget_script_arguments(tmp_path):
    from tests.test_scripts import _load

    script = _load("plan_budgets")
    assert script._budgets("0.3, 0.6,1.2") == [0.3, 0.6, 1.2]
    for bad in ("x", "0,1", ""):
        with pytest.raises(UserError, match="--budgets"):
            script._budgets(bad)
    a = script._args(["--out", str(tmp_path)])
    cmds = script._commands(a, 0.6, "cifar10-limited-plan-0.6ms", tmp_path / "planned-0.6ms.yaml", "separate")
    assert cmds["plan"].startswith("ekdc plan recipes/cifar10-limited.yaml --latency 0.6 --batch 1 --threads 2")
    assert "--fold separate" in cmds["export"] and "--threads 2" in cmds["bench"]


def test_int8_plan(tmp_path):
    recipe = load_recipe(write_recipe(tmp_path / "tiny.yaml", **ONE_TEACHER))
    plan = plan_student(recipe, 1e4, candidates=[MEDIUM], precision="int8", repeats=1)
    (c,) = plan.candidates
    assert plan.precision == "int8" and "int8" in plan.target and c.chosen and list(c.layout_p50_ms) == ["grouped"]
    assert plan.export_flags == "--int8 --fold grouped"  # what export needs to write the file this plan timed
    with pytest.raises(UserError, match="--precision 'fp16'"):
        plan_student(recipe, 1.0, candidates=[MEDIUM], precision="fp16")


FASTNET = {"arch": "fastnet_student", "widths": [8, 16], "trunk_stages": 1, "num_branches": 2}


def _fastnet_recipe(path: Path) -> Path:
    raw = tiny_recipe()
    raw["student"] = FASTNET
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_fastnet_student_is_planned_in_its_own_family(tmp_path):
    """ekdc plan searches the recipe student's family: a FastNet student's grid keeps its stages and
    trunk, scales its widths in multiples of 8; the plan writes a recipe of that family."""
    from ekdc.models.fastnet_student import plan_grid

    recipe = load_recipe(_fastnet_recipe(tmp_path / "fast.yaml"))
    grid = default_candidates(recipe.student)
    assert grid == plan_grid(recipe.student.model_kwargs()) and {"widths": [8, 16]} in grid
    assert all(len(c["widths"]) == 2 and all(w % 8 == 0 for w in c["widths"]) for c in grid)
    assert len(grid) == len({json.dumps(c) for c in grid}) >= 5  # rounding duplicates dropped
    small, large = {"widths": [8, 8]}, {"widths": [32, 64]}
    plan = plan_student(recipe, 1e4, candidates=[small, large], repeats=1)
    assert plan.arch == "fastnet_student" and plan.chosen.config["widths"] == [32, 64]
    assert all(c.config["trunk_stages"] == 1 and c.config["num_branches"] == 2 for c in plan.candidates)
    # [8, 8] is not in whole 16-channel blocks: timed grouped and padded; [32, 64] is: grouped alone
    assert [list(c.layout_p50_ms) for c in plan.candidates] == [["grouped", "padded"], ["grouped"]]
    assert plan.candidates[1].macs > plan.candidates[0].macs
    planned = planned_recipe(recipe, plan)
    assert planned.student.arch == "fastnet_student" and planned.student.model_kwargs() == plan.chosen.config
    assert recipe_from_dict(yaml.safe_load(dump_recipe(planned))) == planned
    lines = set_lines(recipe, plan)
    assert lines == ["--set 'student.widths=[32,64]'"]  # the kept trunk_stages is the recipe's: not repeated
    overrides = [shlex.split(line)[1] for line in lines]
    assert recipe_from_dict(apply_overrides(recipe.model_dump(mode="json"), overrides)) == planned
    # a candidate of another family, or with ekd_student's keys, is refused in one line naming it
    with pytest.raises(UserError, match=r"candidates\.0: arch is ekd_student but the recipe's student is fastnet"):
        plan_student(recipe, 1.0, candidates=[{"arch": "ekd_student"}])
    with pytest.raises(UserError, match=r"candidates\.1: trunk_width is a key of ekd_student"):
        plan_student(recipe, 1.0, candidates=[small, {"trunk_width": 8}])


def test_same_stages_keeps_the_recipe_students_depth():
    from ekdc.plan import same_stages
    from ekdc.recipe import StudentConfig

    two = same_stages(StudentConfig(branch_widths=[16, 32]))
    three = same_stages(StudentConfig(branch_widths=[16, 32, 64]))
    assert two and three and {len(c["branch_widths"]) for c in two} == {2}
    assert {len(c["branch_widths"]) for c in three} == {3} and len(two) + len(three) == len(default_candidates())
    fast = StudentConfig(arch="fastnet_student", widths=[64, 72, 80], num_branches=3)
    assert all(len(c["widths"]) == 3 for c in same_stages(fast))


def test_plan_cli_on_a_fastnet_recipe(tmp_path):
    recipe = _fastnet_recipe(tmp_path / "fast.yaml")
    cands = _candidates_file(tmp_path / "c.yaml", {"widths": [8, 8]}, {"widths": [16, 16]})
    res = run_cli("plan", recipe, "--latency", "1000", "--candidates", cands, "--repeats", "1")
    assert res.returncode == 0, res.stderr
    assert "--set 'student.widths=[16,16]'" in res.stdout and "export it with --fold " in res.stdout
    bad = _candidates_file(tmp_path / "bad.yaml", {"branch_widths": [8, 8]})
    res = run_cli("plan", recipe, "--latency", "1000", "--candidates", bad, "--repeats", "1")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1
    assert f"{bad}: candidates.0: branch_widths is a key of ekd_student" in lines[0]


def test_widths_between_interpolates_widths_only():
    from ekdc.models import widths_between

    a, b = {"widths": [80, 88, 96], "trunk_stages": 1}, {"widths": [96, 104, 120], "trunk_stages": 1}
    assert widths_between(a, b, 8, ("widths",)) == [{"widths": [88, 96, 104], "trunk_stages": 1},
                                       {"widths": [88, 96, 112], "trunk_stages": 1}]
    far = widths_between({"widths": [8, 8]}, {"widths": [128, 256]}, 8, ("widths",))
    assert len(far) == 4 and all(w % 8 == 0 for c in far for w in c["widths"])
    assert [c["widths"][1] for c in far] == sorted(c["widths"][1] for c in far)  # evenly, in order
    assert widths_between({"widths": [8, 8]}, {"widths": [16, 16]}, 8, ("widths",)) == []  # one step apart
    ekd = {"trunk_width": 16, "branch_widths": [16, 32], "branch_blocks": 1, "block": "basic"}
    keys = ("trunk_width", "branch_widths")
    assert widths_between(ekd, {**ekd, "trunk_width": 32, "branch_widths": [32, 64]}, 4, keys)[0] == {
        **ekd, "trunk_width": 20, "branch_widths": [20, 40]}
    assert widths_between(ekd, {**ekd, "trunk_width": 32, "branch_blocks": 2}, 4, keys) == []  # another depth
    assert widths_between(ekd, {**ekd, "branch_widths": [16, 32, 64]}, 4, keys) == []  # another number of stages


def test_the_finer_pass_chooses_between_the_grids_steps(tmp_path, monkeypatch):
    """With latencies that grow with MACs, a budget between two grid students is met by one of the finer
    pass's, which plan then chooses; the table marks it and the plot draws a family without blocks."""
    from rich.console import Console

    import ekdc.plan.search as search
    from ekdc.plan import plan_table, write_plan_plot
    from ekdc.plan.candidates import build_candidate

    def by_macs(files, report, batch):  # 1 ms per 10,000 MACs, in every round
        for cand, layout in files.values():
            cand.layout_p50_ms[layout] = cand.macs / 1e4
            cand.layout, cand.p50_ms, cand.round_p50_ms = layout, cand.macs / 1e4, [cand.macs / 1e4]

    # nothing is exported or timed: the test is about which students are timed and which is chosen
    monkeypatch.setattr(search, "_export_files", lambda student, layout, size, precision, folder, stem:
                        folder / f"{stem}.onnx")
    monkeypatch.setattr(search, "time_models", lambda *a, **k: {"machine": {"cpu": "test"}, "models": []})
    monkeypatch.setattr(search, "_fill_latencies", by_macs)
    recipe = load_recipe(_fastnet_recipe(tmp_path / "fast.yaml"))
    grid = [{"widths": [8, 8]}, {"widths": [40, 40]}]
    _, macs, _ = build_candidate("fastnet_student", {"widths": [40, 40], "num_branches": 2}, 4, 16)
    budget = 0.6 * macs / 1e4  # [40,40] misses it, [8,8] is far under it
    plan = plan_student(recipe, budget, candidates=grid, repeats=1, refine=True)
    finer = [c for c in plan.candidates if c.finer]
    assert [c.index for c in plan.candidates] == list(range(len(plan.candidates))) and len(finer) == 3
    assert [c.config["widths"] for c in finer] == [[16, 16], [24, 24], [32, 32]]
    assert plan.chosen.finer and plan.chosen.p50_ms <= budget and plan.settings["finer_pass"]
    assert plan.chosen is max((c for c in plan.candidates if c.p50_ms <= budget), key=lambda c: c.macs)
    assert plan.chosen.config["widths"] != [8, 8]
    console = Console(width=200, record=True)
    console.print(plan_table(plan))
    text = console.export_text()
    assert f"{plan.chosen.index}+" in text and "timed in the finer pass" in text
    assert write_plan_plot(plan, tmp_path / "plan.png").stat().st_size > 0
    # a user's own list is timed as given
    assert not any(c.finer for c in plan_student(recipe, budget, candidates=grid, repeats=1).candidates)
