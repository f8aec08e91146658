"""``ekdc compare``: rows over seeds sharing one set of teachers, equal-cost one-branch students, a report
from the finished cells, and a grid that resumes."""
from __future__ import annotations

import json

import pytest

from ekdc import UserError, load_recipe
from ekdc.comparison import compare, parse_row, parse_rows
from ekdc.comparison.grid import LATENCY_ROUNDS
from ekdc.comparison.students import equal_macs_student, student_macs

from conftest import run_cli, write_recipe

TINY = dict(teachers=[{"arch": "resnet8", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
                      {"arch": "resnet8", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}}],
            distill={"epochs": 1, "batch_size": 32, "lr": 0.05, "temperature": 4.0}, mode="avg_kd")


def test_row_grammar():
    r = parse_row("plain:avg_kd+dkd+conf+k4")
    assert (r.student, r.base, r.dkd, r.confidence, r.views, r.slug) == ("plain", "avg_kd", True, True, 4,
                                                                         "plain-avg_kd-dkd-conf-k4")
    assert parse_row("recipe").student == "recipe" and parse_row("ekd+feat").feat
    for bad, words in [("plain:ekd", "one-branch student cannot use it"), ("avg_kd+jsd", r"unknown part '\+jsd'"),
                       ("wide:ce", "is not a row")]:
        with pytest.raises(UserError, match=words):
            parse_row(bad)
    with pytest.raises(UserError, match="listed twice"):
        parse_rows("ce,ce")


def test_equal_macs_student_within_five_percent():
    base = dict(num_branches=3, trunk_width=16, trunk_blocks=1, branch_widths=[16, 32, 64], branch_blocks=1,
                stem="cifar", block="basic", expand_ratio=6)
    cfg, macs, target = equal_macs_student(base, 10, 32)
    assert cfg["num_branches"] == 1 and target == student_macs(base, 10, 32) == 41_338_752
    assert abs(macs - target) <= 0.05 * target and cfg["branch_widths"][0] > 16


def test_compare_grid_report_and_resume(tmp_path, monkeypatch):
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", **TINY))
    monkeypatch.chdir(tmp_path)  # --out relative, as people type it: a resumed grid must still match its cells
    out = tmp_path / "grid"
    report = compare(recipe, "recipe,ce,plain:avg_kd+dkd", [0, 1], "grid", progress=False)
    rows = {e["row"]: e for e in report["rows"]}
    assert list(rows) == ["recipe", "ce", "plain:avg_kd+dkd"]
    assert rows["recipe"]["num_branches"] == 2 and rows["plain:avg_kd+dkd"]["num_branches"] == 1
    assert rows["plain:avg_kd+dkd"]["kd_loss"] == "dkd" and rows["recipe"]["kd_loss"] == "kl" and rows["ce"]["kd_loss"] is None
    m0 = rows["recipe"]["macs"]
    assert abs(rows["plain:avg_kd+dkd"]["macs"] - m0) <= 0.05 * m0
    for e in rows.values():
        assert set(e["acc"]) == {"0", "1"} and e["missing_seeds"] == [] and e["latency_ms"] > 0
        assert e["latency_ms_b64"] > e["latency_ms"] and e["img_s_b64"] > 0  # a batch of 64 takes longer than one image
        assert len(e["latency_rounds_ms"]) == LATENCY_ROUNDS and min(e["latency_rounds_ms"]) > 0
        for seed, acc in e["acc"].items():  # the exported file's own accuracy
            manifest = json.loads((out / e["row"].replace(":", "-").replace("+", "-") / f"s{seed}" / "export" /
                                   "manifest.json").read_text())
            assert acc == manifest["files"][0]["accuracy"]
            if seed == "0":  # the timed file: its fold layout, export's choice, is reported beside its latency
                assert e["fold"] == manifest["fold"]["choice"] and e["fold"] in ("grouped", "separate", "padded")
    gap = rows["ce"]["gap"]
    assert gap["seeds"] == 2 and gap["mean"] == pytest.approx(
        sum(rows["ce"]["acc"][s] - rows["recipe"]["acc"][s] for s in "01") / 2)
    # one set of teachers, trained once, loaded as files by every cell
    assert sorted(p.name for p in (out / "teachers" / "teachers").glob("*.pt")) == ["resnet8.pt", "resnet8_1.pt"]
    cell = load_recipe(out / "ce" / "s1" / "recipe.yaml")
    assert cell.teachers[0].weights.endswith("teachers/teachers/resnet8.pt") and cell.teachers[0].train is None
    assert not any((out / "ce" / "s1" / "teachers").glob("*.pt"))
    # resume: finished cells are not trained again; a lost export is made again
    (out / "ce" / "s1" / "export" / "manifest.json").unlink()
    stamp = (out / "ce" / "s1" / "student.pt").stat().st_mtime_ns
    timed = json.loads((out / "latency.json").read_text())  # as a grid timed with 3 rounds, before batch 64: again
    (out / "latency.json").write_text(json.dumps({k: v for k, v in timed.items() if "b64" not in k} | {"rounds": 3}))
    # a cell kept as its record (metrics, export) without its weights is finished too: not trained again
    (out / "recipe" / "s1" / "student.pt").unlink()
    seen = []
    again = compare(recipe, "recipe,ce,plain:avg_kd+dkd", [0, 1], "grid", progress=False, on_cell=seen.append)
    assert not (out / "recipe" / "s1" / "student.pt").exists()
    assert sorted(str(c.relative_to(out)) for c in seen) == sorted(
        f"{row}/s{seed}" for row in ("recipe", "ce", "plain-avg_kd-dkd") for seed in (0, 1))
    assert all(e["img_s_b64"] > 0 for e in again["rows"])
    assert json.loads((out / "latency.json").read_text())["rounds"] == LATENCY_ROUNDS
    assert (out / "ce" / "s1" / "student.pt").stat().st_mtime_ns == stamp
    assert again["rows"][1]["acc"] == report["rows"][1]["acc"]
    # the report alone, from the finished cells; and a row not run shows as missing, not as zero
    only = compare(recipe, "recipe,avg_kd+conf", [0, 1], out, report_only=True)
    assert only["rows"][1]["acc"] == {} and only["rows"][1]["missing_seeds"] == [0, 1]

    # a grid copied elsewhere is the same grid: reported, and continued, with no cell trained again; its
    # cells' records follow it (their paths into OUT now point into the copy)
    import shutil

    moved = tmp_path / "elsewhere" / "grid"
    shutil.copytree(out, moved)
    assert compare(recipe, "recipe,ce", [0, 1], moved, report_only=True)["rows"][1]["acc"] == again["rows"][1]["acc"]
    stamp = (moved / "ce" / "s0" / "metrics.json").stat().st_mtime_ns
    compare(recipe, "recipe,ce", [0, 1], moved, progress=False)
    assert (moved / "ce" / "s0" / "metrics.json").stat().st_mtime_ns == stamp
    assert load_recipe(moved / "ce" / "s0" / "recipe.yaml").teachers[0].weights.startswith(str(moved))
    # but a grid made in its own folder whose cells name another grid's files is not a moved grid
    other = tmp_path / "other"
    shutil.copytree(out, other)
    (other / "grid.json").write_text(json.dumps({"roots": [str(other)]}))
    with pytest.raises(UserError, match="was trained from another recipe"):
        compare(recipe, "recipe,ce", [0, 1], other, report_only=True)
    # a file of the grid that is there but broken is one line naming it, never a cell silently left out
    good = (moved / "ce" / "s1" / "metrics.json").read_text()
    (moved / "ce" / "s1" / "metrics.json").write_text(good[:50])
    for report_only in (True, False):
        with pytest.raises(UserError, match=r"cannot read .*ce/s1/metrics.json"):
            compare(recipe, "recipe,ce", [0, 1], moved, report_only=report_only, progress=False)
    (moved / "ce" / "s1" / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match=r"metrics.json lacks 'student'"):
        compare(recipe, "recipe,ce", [0, 1], moved, report_only=True)
    (moved / "ce" / "s1" / "metrics.json").write_text(good)
    (moved / "latency.json").write_text('{"p50_ms": ')
    with pytest.raises(UserError, match=r"cannot read .*latency.json"):
        compare(recipe, "recipe,ce", [0, 1], moved, report_only=True)


def test_cli_compare_checks_its_outputs_and_an_empty_report_first(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", **TINY)
    before = recipe.read_bytes()
    for flag in ("--json", "--plot"):  # the recipe as an output: refused before any training
        res = run_cli("compare", recipe, "--out", tmp_path / "g", flag, recipe)
        assert res.returncode == 2 and "is the recipe" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert recipe.read_bytes() == before and not (tmp_path / "g").exists()
    res = run_cli("compare", recipe, "--out", tmp_path / "typo", "--report-only")
    assert res.returncode == 2 and "no finished cell in" in res.stderr, res.stderr
    assert not (tmp_path / "typo").exists()


def test_cli_compare_refuses_a_bad_row_before_training(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", **TINY)
    res = run_cli("compare", recipe, "--rows", "recipe,plain:ekd", "--out", tmp_path / "g")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("ekdc: error: --rows: 'plain:ekd'")
    assert not (tmp_path / "g").exists()
    one_teacher = {**TINY, "teachers": TINY["teachers"][:1]}
    res = run_cli("compare", write_recipe(tmp_path / "e.yaml", **one_teacher), "--rows", "recipe,avg_kd+conf",
                  "--seeds", "0", "--out", tmp_path / "g2", "-q")
    assert res.returncode == 2 and "needs at least 2 teachers" in res.stderr
    assert not (tmp_path / "g2" / "teachers").exists()  # refused before the teachers train


def test_a_one_branch_student_that_cannot_be_matched_fails_before_the_teachers(tmp_path, monkeypatch):
    """The equal-MACs student is arithmetic on the recipe: a grid that cannot have it is refused before its
    teachers train (hours on real data), not after."""
    import ekdc.comparison.grid as grid

    trained = []
    monkeypatch.setattr(grid, "_teachers", lambda *a, **k: trained.append(1) or {})

    def unmatched(*a, **k):
        raise UserError("compare: the closest one-branch student has 990,820 MACs against 940,192: more than 5% apart")

    monkeypatch.setattr(grid, "equal_macs_student", unmatched)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", **TINY))
    with pytest.raises(UserError, match="more than 5% apart"):
        compare(recipe, rows="recipe,plain:avg_kd", seeds=[0], out=tmp_path / "g", progress=False)
    assert trained == []


def test_a_dkd_row_takes_dkds_warm_up(tmp_path):
    """+dkd ramps the KD term up over 1/12 of the epochs (DKD's 20 of 240) unless the recipe gives its own
    ramp; a KL row keeps the recipe's; a ramp of one epoch or less is left out (it changes nothing)."""
    from ekdc.comparison.rows import row_recipe
    from ekdc.recipe import recipe_from_dict

    raw = load_recipe(write_recipe(tmp_path / "r.yaml", **TINY)).model_dump(mode="json")

    def kd(row: str, epochs: int, warmup=None) -> dict:
        r = {**raw, "distill": {**raw["distill"], "epochs": epochs}}
        if warmup is not None:
            r["distill"]["kd"] = {**r["distill"]["kd"], "warmup_epochs": warmup}
        cell = recipe_from_dict(row_recipe(r, parse_row(row), None))
        return cell.distill.term_settings()["kd"].model_dump()

    assert kd("avg_kd+dkd", 48)["warmup_epochs"] == 4 and kd("avg_kd+dkd", 48)["loss"] == "dkd"
    assert kd("avg_kd", 48)["warmup_epochs"] == 0
    assert kd("avg_kd+dkd", 48, warmup=7)["warmup_epochs"] == 7 and kd("avg_kd", 48, warmup=7)["warmup_epochs"] == 7
    assert kd("avg_kd+dkd", 12)["warmup_epochs"] == 0  # 1 epoch of 12: full weight from the start either way


def test_a_planned_row_is_one_branch_within_the_recipe_students_latency(tmp_path, monkeypatch):
    import ekdc.plan.candidates as candidates_mod

    # widths of 8, not 4: torch 2.14's oneDNN convolution backward double-frees on 4-channel convolutions with one
    # intra-op thread (gdb: mkldnn_convolution_backward_weights), as pytest -n workers run
    small = {"trunk_width": 8, "trunk_blocks": 1, "branch_widths": [8, 8], "branch_blocks": 1, "block": "basic"}
    huge = {"trunk_width": 64, "trunk_blocks": 2, "branch_widths": [64, 128], "branch_blocks": 2, "block": "basic"}
    monkeypatch.setattr(candidates_mod, "default_candidates", lambda *_: [small, huge])
    # the recipe's student is several times the small one's work: at tens of microseconds, a student only a
    # branch smaller than the recipe's can time slower than it on a busy machine (CI saw 0.088 ms against 0.072)
    heavier = {"trunk_width": 16, "trunk_blocks": 2, "branch_widths": [32, 32], "branch_blocks": 2}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", **{**TINY, "student": heavier}))
    report = compare(recipe, "recipe,planned:avg_kd", [0], tmp_path / "g", progress=False)
    students = json.loads((tmp_path / "g" / "students.json").read_text())
    assert students["recipe_p50_ms"] > 0 and students["planned"]["num_branches"] == 1
    assert students["planned"]["trunk_width"] == 8  # the huge one is slower than the 2-branch student
    planned = report["rows"][1]
    assert planned["num_branches"] == 1 and planned["mode"] == "avg_kd" and set(planned["acc"]) == {"0"}
    # the grid's folder, asked for with another recipe, is refused rather than reported as this one
    other = load_recipe(write_recipe(tmp_path / "o.yaml", **{**TINY, "student": heavier,
                                                               "distill": {**TINY["distill"], "epochs": 2}}))
    with pytest.raises(UserError, match="was trained from another recipe .*distill.epochs"):
        compare(other, "recipe", [0], tmp_path / "g", progress=False)


def test_a_planned_row_of_a_fastnet_recipe_keeps_its_stages(tmp_path, monkeypatch):
    """The equal-latency student of a FastNet recipe is planned in its family, among candidates with as many
    stages as the recipe's student (a 3-stage candidate offered beside them is never timed)."""
    import yaml

    import ekdc.plan.candidates as candidates_mod
    from ekdc.models import widths_between

    offered = [{"widths": [8, 8]}, {"widths": [128, 256]}, {"widths": [8, 8, 8]}]
    monkeypatch.setattr(candidates_mod, "default_candidates", lambda *_: offered)
    path = write_recipe(tmp_path / "r.yaml", **TINY)
    raw = yaml.safe_load(path.read_text())
    raw["student"] = {"arch": "fastnet_student", "widths": [32, 64], "num_branches": 2}  # [8,8] is far faster
    path.write_text(yaml.safe_dump(raw))
    report = compare(load_recipe(path), "planned:avg_kd", [0], tmp_path / "g", progress=False)
    students = json.loads((tmp_path / "g" / "students.json").read_text())
    # the 128/256 is slower; the finer pass times the students between it and [8,8], which may be chosen
    between = [c["widths"] for c in widths_between({"widths": [8, 8]}, {"widths": [128, 256]}, 8, ("widths",))]
    assert {k: v for k, v in students["planned"].items() if k != "widths"} == {"num_branches": 1, "trunk_stages": 1}
    assert students["planned"]["widths"] in [[8, 8], *between]
    (row,) = report["rows"]
    assert row["num_branches"] == 1 and set(row["acc"]) == {"0"}
