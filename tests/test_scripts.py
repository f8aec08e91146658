"""The benchmark scripts' own logic (the heavy runs they drive are covered by the CLI tests)."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT, write_recipe


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cell(root, size, mode, seed, acc, branches, exported, teachers=None):
    """A finished cell where ``ekdc compare`` puts it (n<size>/<row>/s<seed>), and its size's teachers run."""
    cell = root / f"n{size}" / mode.replace("_feat", "-feat") / f"s{seed}"
    (cell / "export").mkdir(parents=True)
    teachers = teachers or [{"name": "t1", "arch": "resnet8", "acc": 0.6, "params": 1000, "macs": 5000}]
    (cell / "metrics.json").write_text(json.dumps({
        "student": {"ensemble_acc": acc, "branch_acc": branches, "params": 10, "macs": 100},
        "teachers": teachers, "teacher_ensemble_acc": 0.61, "mode": mode, "seconds": 99}))
    # teacher i trained for 50 + 10 i seconds (once a size), the student for 7 + 8
    (root / f"n{size}" / "teachers").mkdir(exist_ok=True)
    (root / f"n{size}" / "teachers" / "log.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"stage": f"teacher-{t['name']}", "epoch": 1, "seconds": 50 + 10 * i} for i, t in enumerate(teachers)]) + "\n")
    (cell / "log.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"stage": f"student-{mode}", "epoch": 1, "seconds": 7},
        {"stage": f"student-{mode}", "epoch": 2, "seconds": 8}]) + "\n")
    (cell / "export" / "manifest.json").write_text(json.dumps({"files": [{"file": "student.onnx", "accuracy": exported}]}))


def test_limited_data_study_report(tmp_path):
    study = _load("limited_data_study")
    root = tmp_path / "study"
    teachers = [{"name": "t1", "arch": "resnet8", "acc": 0.6, "params": 1000, "macs": 5000},
                {"name": "t2", "arch": "resnet20", "acc": 0.65, "params": 3000, "macs": 15000}]
    _cell(root, 5000, "ce", 0, 0.50, [0.40, 0.45], 0.50, teachers)
    _cell(root, 5000, "ce", 1, 0.52, [0.41, 0.47], 0.52, teachers)
    _cell(root, 5000, "ekd", 0, 0.60, [0.55, 0.58], 0.60, teachers)
    _cell(root, 5000, "ekd", 1, 0.56, [0.62, 0.66], 0.56, teachers)
    (root / "n5000" / "ekd" / "s1" / "export" / "manifest.json").unlink()  # not exported yet
    args = ["--runs-root", str(root), "--sizes", "5000", "--modes", "ce,ekd", "--seeds", "0,1"]

    summary = study.summarise(study.collect(root, [5000], ["ce", "ekd"], [0, 1]), [5000])
    ce, ekd = summary["rows"]
    assert (ce["size"], ce["mode"], ce["n"], ekd["mode"], ekd["n"]) == (5000, "ce", 2, "ekd", 2)
    assert ce["ensemble"]["mean"] == pytest.approx(51.0) and ce["ensemble"]["std"] == pytest.approx(1.41421, abs=1e-4)
    assert ce["best_branch"]["mean"] == pytest.approx(46.0) and ce["best_branch"]["std"] == pytest.approx(1.41421, abs=1e-4)
    assert ce["exported"]["mean"] == pytest.approx(51.0) and ce["exported"]["std"] == pytest.approx(1.41421, abs=1e-4)
    assert ekd["ensemble"]["mean"] == pytest.approx(58.0) and ekd["ensemble"]["std"] == pytest.approx(2.82843, abs=1e-4)
    assert ekd["best_branch"]["mean"] == pytest.approx(62.0) and ekd["best_branch"]["std"] == pytest.approx(5.65685, abs=1e-4)
    # only seed 0 was exported: one value, so no std
    assert (ekd["exported"]["n"], ekd["exported"]["std"]) == (1, None) and ekd["exported"]["mean"] == pytest.approx(60.0)
    assert ce["seconds"] == pytest.approx(15) and ekd["seconds"] == pytest.approx(15)  # student stages: 7 + 8 s

    (ensemble,) = summary["teachers"]
    assert ensemble["size"] == 5000 and ensemble["count"] == 2 and ensemble["acc"] == pytest.approx(61.0)
    assert [t["acc"] for t in ensemble["teachers"]] == [pytest.approx(60.0), pytest.approx(65.0)]
    assert (ensemble["params"], ensemble["macs"]) == (4000, 20000)
    assert [t["seconds"] for t in ensemble["teachers"]] == [pytest.approx(50), pytest.approx(60)]
    assert ensemble["seconds"] == pytest.approx(110)
    assert summary["student"]["ensemble_mac_share"] == [pytest.approx(0.5)]  # 100 MACs against 20,000

    (gap,) = summary["gaps"]  # no avg_kd row, so no gap against it
    assert (gap["mode"], gap["baseline"], gap["gap"]["n"], gap["ahead"]) == ("ekd", "ce", 2, 2)
    assert gap["gap"]["mean"] == pytest.approx(7.0) and gap["gap"]["std"] == pytest.approx(4.24264, abs=1e-4)

    training = summary["training"]
    assert training["student_seconds"] == pytest.approx(4 * 15)
    assert training["teacher_seconds"] == pytest.approx(110)  # the size's teachers, counted once
    assert training["hours"] == pytest.approx((4 * 15 + 110) / 3600)

    docs = tmp_path / "docs"
    study.main([*args, "--docs", str(docs), "--report-only"])
    assert (docs / "results.png").read_bytes()[:4] == b"\x89PNG"
    text = (docs / "RESULTS.md").read_text()
    assert "<!-- reading -->" in text
    # a reading written below the marker survives a rebuild
    (docs / "RESULTS.md").write_text(text.split("<!-- reading -->")[0] + "<!-- reading -->\n## Reading\n\nEKD wins.\n")
    study.main([*args, "--docs", str(docs), "--report-only"])
    assert (docs / "RESULTS.md").read_text().endswith("<!-- reading -->\n## Reading\n\nEKD wins.\n")


def test_limited_data_study_paired_gaps_match_seeds():
    study = _load("limited_data_study")
    cells = lambda *accs: [{"seed": s, "ensemble": a} for s, a in accs]  # noqa: E731
    rows = [{"size": 5000, "mode": "avg_kd", "cells": cells((0, 0.70), (1, 0.72), (2, 0.69))},
            {"size": 5000, "mode": "ekd", "cells": cells((0, 0.71), (2, 0.68))},  # seed 1 not finished
            {"size": 10000, "mode": "ekd", "cells": cells((1, 0.90))}]  # another size never pairs
    gaps = study.paired_gaps(rows, 5000, "ekd", "avg_kd")
    assert [round(g, 6) for g in gaps] == [0.01, -0.01]
    assert study.paired_gaps(rows, 10000, "ekd", "avg_kd") == []
    assert study._mean_std(gaps, signed=True) == "+0.00 ± 1.41"
    assert study._mean_std([-0.0046], signed=True) == "−0.46"


def test_limited_data_study_runs_each_size_as_one_compare_grid(tmp_path, monkeypatch):
    """The study is a thin caller of ``ekdc compare``: one grid a size, its modes as rows, the subset size
    and the caller's overrides in the recipe; teachers given for a size are loaded as they are."""
    study = _load("limited_data_study")
    write_recipe(tmp_path / "r.yaml", teachers=[{"arch": "resnet8"}, {"arch": "resnet8"}])
    calls = []
    monkeypatch.setattr(study, "compare", lambda recipe, rows, seeds, out, **kw: calls.append((recipe, rows, seeds, out)))
    monkeypatch.setattr(study, "report", lambda args: None)
    study.main(["--recipe", str(tmp_path / "r.yaml"), "--runs-root", str(tmp_path / "study"), "--sizes", "10,20",
                "--modes", "ce,ekd_feat,avg_kd_k4", "--seeds", "0,1", "--teachers", f"20={tmp_path / 't'}"])
    assert [(c[1], c[2], c[3].name) for c in calls] == [(["ce", "ekd+feat", "avg_kd+k4"], [0, 1], "n10")] * 1 + \
        [(["ce", "ekd+feat", "avg_kd+k4"], [0, 1], "n20")]
    assert calls[0][0].data.per_class == 1 and calls[1][0].data.per_class == 2
    assert calls[0][0].teachers[1].train is not None  # trained by the grid itself
    t = calls[1][0].teachers[1]
    assert t.weights == str((tmp_path / "t" / "resnet8_1.pt").resolve()) and t.train is None


def test_evidence_json_has_one_writer_that_tags_each_row_by_its_teacher_files(tmp_path):
    """headline.py (full-data rows and the ensemble) and evidence_study.py (limited-data rows) write
    evidence.json through one function: each replaces its own rows; a row is tagged "teachers" only when its
    grid's teacher files are the ensemble's, and every ensemble a kept row names stays on record."""
    ev = _load("evidence_files")
    v1, v2, v3 = {"a": "1"}, {"a": "2"}, {"a": "3"}
    full = lambda files: {"row": "recipe", "per_class": None, "teacher_files": files}  # noqa: E731
    limited = lambda row, files: {"row": row, "per_class": 500, "teacher_files": files}  # noqa: E731
    ev.update_evidence(tmp_path, ev.FULL, [full(v1)], {"val_acc": 0.80, "files": v1})
    data = ev.update_evidence(tmp_path, ev.LIMITED, [limited("ce", v1), limited("avg_kd", None)])
    assert [(f["row"], f["teachers"]) for f in data["files"]] == [("recipe", "teachers"), ("ce", "teachers"),
                                                                 ("avg_kd", "unrecorded_teachers")]
    assert all("teacher_files" not in f for f in data["files"])
    # new teachers: the full rows anew; the limited rows kept name the first ensemble, kept on record
    data = ev.update_evidence(tmp_path, ev.FULL, [full(v2)], {"val_acc": 0.90, "files": v2})
    assert data["earlier_teachers"]["val_acc"] == 0.80 and data["teachers"]["val_acc"] == 0.90
    assert [(f["row"], f["teachers"]) for f in data["files"]] == [
        ("ce", "earlier_teachers"), ("avg_kd", "unrecorded_teachers"), ("recipe", "teachers")]
    # teachers again: the second ensemble is named by no kept row (the full rows are written anew): not kept,
    # and the first stays where the limited rows find it
    data = ev.update_evidence(tmp_path, ev.FULL, [full(v3)], {"val_acc": 0.91, "files": v3})
    assert data["earlier_teachers"]["val_acc"] == 0.80 and "earlier_teachers_2" not in data
    # the grid again on the current teachers: the first ensemble is named by no row any more, and goes
    data = ev.update_evidence(tmp_path, ev.LIMITED, [limited("ce", v3)])
    assert "earlier_teachers" not in data and [f["teachers"] for f in data["files"]] == ["teachers", "teachers"]
    # two generations named at once: each under a key of its own
    data = ev.update_evidence(tmp_path, ev.FULL, [], {"val_acc": 0.95, "files": {"a": "4"}})
    data = ev.update_evidence(tmp_path, ev.FULL, [full({"a": "5"})], {"val_acc": 0.96, "files": {"a": "5"}})
    assert [(f["row"], f["teachers"]) for f in data["files"]] == [("ce", "earlier_teachers"), ("recipe", "teachers")]
    # that ensemble replaced while its row is still named: it takes the next key, the first stays
    ev.update_evidence(tmp_path, ev.FULL, [full({"a": "5"})], {"val_acc": 0.96, "files": {"a": "5"}})
    data = ev.update_evidence(tmp_path, ev.LIMITED, [limited("avg_kd", {"a": "6"})],
                              {"val_acc": 0.97, "files": {"a": "6"}})
    assert [(f["row"], f["teachers"]) for f in data["files"]] == [("recipe", "earlier_teachers_2"),
                                                                 ("avg_kd", "teachers")]
    assert data["earlier_teachers_2"]["val_acc"] == 0.96 and "earlier_teachers" not in data  # 0.91: named by none
    assert json.loads((tmp_path / "evidence.json").read_text()) == data


def test_evidence_rows_of_both_drivers_have_the_same_keys(tmp_path):
    """A client reads every row of evidence.json alike: the headline's full-data rows and the grid's
    limited-data rows come from one builder, and what the headline measured on the file it ships wins."""
    ev = _load("evidence_files")
    entry = {"row": "avg_kd", "mode": "avg_kd", "kd_loss": "kl", "student": "widths [8]", "num_branches": 1,
             "macs": 10, "params": 5, "acc": {"0": 0.5}, "latency_ms": 1.0, "latency_ms_b64": 9.0,
             "img_s_b64": 7.0, "latency_rounds_ms": [1.0], "fold": "padded"}
    limited = ev.file_row(entry, tmp_path, "a.onnx", per_class=500, train_images=5000)
    full = ev.file_row(entry, tmp_path, "b.onnx", per_class=None, train_images=45000, val_acc=0.6, latency_ms=2.0,
                       latency_rounds_ms=None, fold="grouped")
    assert set(limited) == set(full) and {"kd_loss", "student", "params", "latency_ms_b64", "img_s_b64"} <= set(full)
    assert (full["val_acc"], full["latency_ms"], full["fold"], full["img_s_b64"]) == (0.6, 2.0, "grouped", 7.0)
    assert (limited["val_acc"], limited["latency_ms"], limited["per_class"]) == (0.5, 1.0, 500)


def test_evidence_study_schedule_and_convergence_verdict():
    study = _load("evidence_study")
    r = study.grid_recipe(48, [])
    base = study.load_recipe(study.RECIPE)
    assert (r.data.per_class, r.student.num_branches, r.student.model_kwargs()["widths"]) == (500, 3, [64, 72, 80])
    assert r.distill.epochs == 48  # the recipe's warm-up fraction, stretched to the grid's epochs
    assert r.distill.warmup_epochs == pytest.approx(base.distill.warmup_epochs * 48 / base.distill.epochs)
    row = lambda acc: {"rows": [{"row": "avg_kd", "acc": {"0": acc}}]}  # noqa: E731
    lines, conv = study._convergence(row(0.800), row(0.804), 48)
    assert conv["gain_points"] == pytest.approx(0.4) and "converged: twice the epochs gain less than 0.5" in lines[-1]
    lines, conv = study._convergence(row(0.800), row(0.806), 48)
    assert "**not converged**" in lines[-1]
    assert study._convergence(row(0.8), {"rows": []}, 48)[1] == {}


def test_evidence_reading_is_kept_as_written(tmp_path):
    """The hand-written reading below the marker is read back as written (no blank lines gained per rebuild),
    and a page without one has none."""
    study = _load("evidence_study")
    page = tmp_path / "EVIDENCE.md"
    page.write_text("# figures\n\n<!-- reading -->\n## Reading\n\n\nThe branches pay.\n\n- at equal MACs\n")
    kept = study._kept_reading(page)
    assert kept == ["The branches pay.", "", "- at equal MACs"]
    page.write_text("\n".join(["# figures", "<!-- reading -->", "## Reading", "", *kept, ""]))
    assert study._kept_reading(page) == kept
    page.write_text("# figures\n")
    assert study._kept_reading(page) is None


def test_cpu_hours_counts_each_teacher_cache_build_once(tmp_path):
    """The training time a page states: the shipped teachers', every cell's, and a cache that several cells
    read built once."""
    ev = _load("evidence_files")
    shipped = {"teachers": [{"train_seconds": 1800}, {"train_seconds": 1800}]}
    cells = []
    for k, cache in enumerate(["/c/a", "/c/a", "/c/b"]):
        cells.append(tmp_path / f"m{k}.json")
        cells[-1].write_text(json.dumps({"seconds": 360, "teacher_cache": {"path": cache, "build_seconds": 720}}))
    assert ev.cpu_hours(cells, shipped) == pytest.approx((3600 + 3 * 360 + 2 * 720) / 3600)
    assert ev.cpu_hours([], shipped) == pytest.approx(1.0)


needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git")


def _git_repo(root):
    import subprocess
    root.mkdir()
    for args in (["init", "-q"], ["config", "user.email", "t@t"], ["config", "user.name", "t"]):
        subprocess.run(["git", "-C", str(root), *args], check=True)
    (root / "small.txt").write_text("kept\n")
    (root / "d").mkdir()
    (root / "d" / "big.bin").write_bytes(b"x" * 5000)
    subprocess.run(["git", "-C", str(root), "add", "."], check=True)
    subprocess.run(["git", "-C", str(root), "commit", "-q", "-m", "c"], check=True)


@needs_git
def test_gpu_teachers_keeps_big_tracked_files_home_and_restores_the_index(tmp_path):
    """What travels to a device machine is the index's files: the big ones leave it (not the disk) and
    come back; a second slim before a restore is refused."""
    gpu = _load("gpu_teachers")
    repo = tmp_path / "repo"
    _git_repo(repo)
    assert gpu.travel_bytes(repo, []) == 5005
    assert gpu.slim_index(repo, min_bytes=1000) == ["d/big.bin"]
    assert gpu._git(repo, "ls-files").split() == ["small.txt"]
    assert (repo / "d" / "big.bin").stat().st_size == 5000
    assert gpu.travel_bytes(repo, []) == 5  # neither tracked nor untracked-not-ignored
    with pytest.raises(SystemExit, match="already slimmed"):
        gpu.slim_index(repo, min_bytes=1000)
    assert gpu.restore_index(repo) == ["d/big.bin"]
    assert gpu._git(repo, "ls-files").split() == ["d/big.bin", "small.txt"]
    assert gpu._git(repo, "status", "--porcelain") == ""
    assert gpu.EXCLUDE_MARK not in gpu._exclude_file(repo).read_text()
    assert gpu.restore_index(repo) == []


@needs_git
def test_gpu_teachers_restores_staged_content_and_refuses_after_a_commit(tmp_path):
    """A big file's staged (uncommitted) change comes back staged; a commit between slim and restore, which
    recorded the big file as deleted, stops the restore with the command that undoes it."""
    import subprocess

    gpu = _load("gpu_teachers")
    repo = tmp_path / "repo"
    _git_repo(repo)
    (repo / "d" / "big.bin").write_bytes(b"y" * 6000)
    subprocess.run(["git", "-C", str(repo), "add", "d/big.bin"], check=True)
    staged = gpu._git(repo, "ls-files", "-s", "d/big.bin")
    gpu.slim_index(repo, min_bytes=1000)
    gpu.restore_index(repo)
    assert gpu._git(repo, "ls-files", "-s", "d/big.bin") == staged
    assert gpu._git(repo, "status", "--porcelain") == "M  d/big.bin\n"

    gpu.slim_index(repo, min_bytes=1000)
    subprocess.run(["git", "-C", str(repo), "commit", "-q", "-m", "oops"], check=True)
    with pytest.raises(SystemExit, match="HEAD moved since prepare"):
        gpu.restore_index(repo)
    subprocess.run(["git", "-C", str(repo), "reset", "-q", "--soft", "HEAD~1"], check=True)
    assert gpu.restore_index(repo) == ["d/big.bin"]
    assert gpu._git(repo, "ls-files", "-s", "d/big.bin") == staged


def test_gpu_teachers_plans_the_epochs_that_fit():
    gpu = _load("gpu_teachers")
    probe = {"images_per_s": 10000.0, "images": 45000, "overhead_s": 20.0}
    assert gpu.plan_epochs(probe, 320.0, 120) == 53  # 0.8 x 300 s x 10,000 img/s / 45,000
    assert gpu.plan_epochs(probe, 320.0, 40) == 40
    assert gpu.plan_epochs(probe, 15.0, 120) == 0


def test_gpu_teachers_run_then_unpack_gives_runs_ship_teachers_scores(tmp_path):
    """The device-side `run` on a CPU: the probe, the epochs each teacher gets, fp16 weights cut into parts;
    `unpack` puts them back as runs whose recipes read the data here."""
    import torch
    import yaml
    from PIL import Image

    from ekdc.checkpoint import load_teacher

    gpu = _load("gpu_teachers")
    folder, split = tmp_path / "made", tmp_path / "split.zip"  # the zip travels, and is unpacked there
    for part, n in (("train", 12), ("val", 4)):
        for c, colour in (("a", (200, 0, 0)), ("b", (0, 0, 200))):
            (folder / part / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (16, 16), (colour[0] + i, i, colour[2])).save(folder / part / c / f"{i}.png")
    data = {"dataset": "imagefolder", "root": "elsewhere", "image_size": 16}
    gpu.zip_folder(folder, split, {"data": data})
    recipe = tmp_path / "teachers.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "t", "precision": "fp32", "data": data,
        "teachers": [{"arch": "resnet8", "train": {"epochs": 8, "batch_size": 8, "lr": 0.05, "warmup_epochs": 2}},
                     {"arch": "wrn_16_2", "train": {"epochs": 4, "batch_size": 8, "lr": 0.05}}]}))
    out, runs = tmp_path / "out", tmp_path / "runs"
    gpu.main(["run", "--recipe", str(recipe), "--split", str(split), "--runs", str(runs), "--out", str(out),
              "--budget", "240", "--min-epochs", "1", "--max-epochs", "3"])
    summary = json.loads((out / "summary.json").read_text())
    for name in ("resnet8", "wrn_16_2"):
        rec = summary["teachers"][name]
        assert rec["exit"] == 0 and 1 <= rec["epochs"] <= 3 and 0 <= rec["val_acc"] <= 1, rec
        assert rec["probe"]["images"] == 24
    assert summary["teachers"]["resnet8"]["warmup_epochs"] == round(summary["teachers"]["resnet8"]["epochs"] / 4, 2)
    assert summary["parts"] and all((out / p).stat().st_size <= gpu.PART_BYTES for p in summary["parts"])

    home = tmp_path / "home"
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), "data": {**data, "image_size": 32}}))
    with pytest.raises(SystemExit, match="split copied for other data"):
        gpu.main(["unpack", str(out), "--recipe", str(other), "--runs", str(home)])
    gpu.main(["unpack", str(out), "--recipe", str(recipe), "--runs", str(home)])
    assert sorted(p.name for p in home.iterdir()) == ["resnet8", "wrn_16_2"]  # the summary is beside them
    assert json.loads((tmp_path / "home-summary.json").read_text()) == summary
    for name in ("resnet8", "wrn_16_2"):
        run = home / name
        resolved = yaml.safe_load((run / "recipe.yaml").read_text())
        assert resolved["data"]["root"] == "elsewhere" and "val_root" not in resolved["data"]
        assert resolved["teachers"][0]["train"]["epochs"] == summary["teachers"][name]["epochs"]
        logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        assert len(logged) == summary["teachers"][name]["epochs"]
        ck_weights = torch.load(run / "teachers" / f"{name}.pt", weights_only=False)["state_dict"]
        assert all(v.dtype == torch.float16 for v in ck_weights.values() if v.is_floating_point())
        model, _ = load_teacher(run / "teachers" / f"{name}.pt", name)
        assert next(model.parameters()).dtype == torch.float32
        assert (run / "machine.txt").read_text().strip() == summary["machine"]
    assert sorted(p.name for p in (tmp_path / "split" / "val").rglob("*.png")) == sorted(
        p.name for p in (folder / "val").rglob("*.png"))


def test_ship_teachers_adds_a_later_run_to_what_is_shipped(tmp_path):
    """Teachers trained in separate runs ship one at a time: the second run's teacher joins the first's (scored
    again from its shipped file), the ensemble is of both, and a run on another split is refused."""
    import sys

    from tests.conftest import run_cli

    ship = _load("ship_teachers")
    out = tmp_path / "weights"
    for name, arch in (("one", "resnet8"), ("two", "wrn_16_2")):
        recipe = write_recipe(tmp_path / f"{name}.yaml", teachers=[
            {"arch": arch, "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}}])
        assert run_cli("distill", recipe, "--teachers-only", "--out", tmp_path / name, "-q").returncode == 0
    argv = sys.argv
    try:
        sys.argv = ["ship_teachers.py", str(tmp_path / "one"), str(out)]
        ship.main()
        first = json.loads((out / "teachers.json").read_text())
        sys.argv = ["ship_teachers.py", str(tmp_path / "two"), str(out)]
        ship.main()
        both = json.loads((out / "teachers.json").read_text())
        assert [t["name"] for t in both["teachers"]] == ["resnet8", "wrn_16_2"]
        assert both["teachers"][0] == first["teachers"][0]  # the same file, scored the same again
        assert both["runs"] == [str(tmp_path / "one"), str(tmp_path / "two")]
        assert both["ensemble_macs"] == sum(t["macs"] for t in both["teachers"])
        import yaml
        shipped_recipe = yaml.safe_load((out / both["teachers"][1]["recipe"]).read_text())  # what trained it
        assert [t["arch"] for t in shipped_recipe["teachers"]] == ["wrn_16_2"]
        other = write_recipe(tmp_path / "other.yaml", data={"val_fraction": 0.5},
                             teachers=[{"arch": "resnet8", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}}])
        assert run_cli("distill", other, "--teachers-only", "--out", tmp_path / "other", "-q").returncode == 0
        sys.argv = ["ship_teachers.py", str(tmp_path / "other"), str(out)]
        with pytest.raises(SystemExit, match="another split"):
            ship.main()
    finally:
        sys.argv = argv
    assert json.loads((out / "teachers.json").read_text()) == both  # the refused run changed nothing


def test_ship_teachers_replaces_a_teacher_only_where_it_scores_higher_and_keeps_its_earlier_cycles(tmp_path):
    """A second cycle trained on from the shipped file: not shipped where it scores no higher; shipped (here
    with --replace) with the first cycle in its entry, that cycle's recipe kept, and the seconds of both."""
    import sys

    import yaml

    from ekdc import _io
    from tests.conftest import run_cli

    ship = _load("ship_teachers")
    out = tmp_path / "weights"
    first = write_recipe(tmp_path / "one.yaml", teachers=[{"arch": "resnet8", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}}])
    assert run_cli("distill", first, "--teachers-only", "--out", tmp_path / "one", "-q").returncode == 0
    argv = sys.argv
    try:
        sys.argv = ["ship_teachers.py", str(tmp_path / "one"), str(out)]
        ship.main()
        cycle1 = json.loads((out / "teachers.json").read_text())["teachers"][0]
        sha1 = _io.file_sha256(out / "resnet8.pt")
        second = write_recipe(tmp_path / "two.yaml", teachers=[{
            "arch": "resnet8", "weights": str(out / "resnet8.pt"), "backbone_lr_scale": 1.0,
            "train": {"epochs": 1, "batch_size": 32, "lr": 0.01, "val_every": 1}}])
        assert run_cli("distill", second, "--teachers-only", "--out", tmp_path / "two", "-q").returncode == 0

        # the shipped teacher scores higher (as its record says): the second cycle does not replace it
        record = json.loads((out / "teachers.json").read_text())
        record["teachers"][0]["val_acc"] = 1.0
        (out / "teachers.json").write_text(json.dumps(record))
        sys.argv = ["ship_teachers.py", str(tmp_path / "two"), str(out)]
        ship.main()
        assert _io.file_sha256(out / "resnet8.pt") == sha1
        kept = json.loads((out / "teachers.json").read_text())["teachers"]
        assert kept == [cycle1] and sorted(p.name for p in out.iterdir()) == [
            "resnet8.pt", "resnet8.recipe.yaml", "teachers.json"]  # no candidate file left behind

        sys.argv = ["ship_teachers.py", "--replace", str(tmp_path / "two"), str(out)]
        ship.main()
        entry = json.loads((out / "teachers.json").read_text())["teachers"][0]
    finally:
        sys.argv = argv
    assert _io.file_sha256(out / "resnet8.pt") != sha1
    (earlier,) = entry["earlier_cycles"]
    assert earlier["run"] == str(tmp_path / "one") and earlier["val_acc"] == cycle1["val_acc"]
    assert earlier["file_sha256"] == sha1 and earlier["train_seconds"] == cycle1["train_seconds"]
    assert entry["train_seconds"] == pytest.approx(entry["cycle_seconds"] + cycle1["train_seconds"], abs=0.11)
    assert entry["run"] == str(tmp_path / "two") and entry["train"]["lr"] == 0.01
    # the run's own last score: the same weights in fp32 (40 images: fp16 may flip one)
    assert entry["last_val_acc"] == pytest.approx(entry["val_acc"], abs=0.026)
    # both cycles' recipes are kept: the first under its cycle number, the second as the teacher's recipe
    assert yaml.safe_load((out / earlier["recipe"]).read_text())["teachers"][0]["train"]["lr"] == 0.05
    assert yaml.safe_load((out / entry["recipe"]).read_text())["teachers"][0]["train"]["lr"] == 0.01


@needs_git
def test_grid_records_keep_a_cell_then_restore_it_in_a_new_session(tmp_path):
    """A finished cell's record (its small files, and seed 0's timed ONNX file) is kept and committed; its
    weights and checkpoints are not; a new session's empty grid folder gets the record back."""
    import subprocess

    rec = _load("grid_records")
    repo = tmp_path / "repo"
    _git_repo(repo)
    grid, store = tmp_path / "grid", repo / "records" / "n500"
    for seed in (0, 1):
        cell = grid / "ce" / f"s{seed}"
        (cell / "export").mkdir(parents=True)
        (cell / "ckpt").mkdir()
        for name in ("recipe.yaml", "metrics.json", "log.jsonl", "export/manifest.json", "export/student.onnx",
                     "student.pt", "ckpt/student-ce.pt"):
            (cell / name).write_text(f"{seed} {name}")
    (grid / "students.json").write_text("{}")
    (grid / "teacher_cache").mkdir()
    (grid / "teacher_cache" / "outputs.bin").write_text("big")
    written = rec.keep_cell(grid, grid / "ce" / "s0", store) + rec.keep_cell(grid, grid / "ce" / "s1", store)
    kept = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())
    assert kept == ["ce/s0/export/manifest.json", "ce/s0/export/student.onnx", "ce/s0/log.jsonl", "ce/s0/metrics.json",
                    "ce/s0/recipe.yaml", "ce/s1/export/manifest.json", "ce/s1/log.jsonl", "ce/s1/metrics.json",
                    "ce/s1/recipe.yaml", "students.json"]
    assert len(written) == 10 and rec.keep_cell(grid, grid / "ce" / "s0", store) == []  # unchanged: none written
    (repo / "small.txt").write_text("changed and staged, not the grid's")
    subprocess.run(["git", "-C", str(repo), "add", "small.txt"], check=True)
    assert rec.commit(store, "cells", repo=repo)
    git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], capture_output=True, text=True,  # noqa: E731
                                    check=True).stdout
    log = git("show", "--stat", "--format=%s", "HEAD")
    assert log.startswith("cells") and "small.txt" not in log and "ce/s1/metrics.json" in log
    assert git("diff", "--cached", "--name-only").split() == ["small.txt"]  # still staged, for its owner
    assert not rec.commit(store, "nothing new", repo=repo)
    (store / "latency.json").write_text("kept after a commit that failed")
    assert rec.commit(store, "the next cell", repo=repo)  # what an earlier commit missed goes in with the next
    fresh = tmp_path / "next-session" / "grid"
    assert rec.restore(store, fresh) == 2 and (fresh / "latency.json").is_file()
    assert (fresh / "ce" / "s1" / "metrics.json").read_text() == "1 metrics.json"
    assert not (fresh / "ce" / "s0" / "student.pt").exists() and (fresh / "ce" / "s0" / "export" / "student.onnx").is_file()
    (fresh / "ce" / "s1" / "metrics.json").write_text("newer")
    assert rec.restore(store, fresh) == 0 and (fresh / "ce" / "s1" / "metrics.json").read_text() == "newer"
    assert not (fresh / "teacher_cache").exists()  # keep_cell keeps no cache


def test_grid_records_keep_a_teacher_cache_being_built(tmp_path):
    """keep_cache copies a grid's teacher-output caches, partial ones too, without the build's lock, and each
    done map before the outputs it vouches for (a copy taken mid-build never marks a chunk whose outputs it
    lacks); restore puts them back for the build to resume."""
    rec = _load("grid_records")
    grid, store = tmp_path / "grid", tmp_path / "records" / "rows"
    cache = grid / "teacher_cache" / "0123abcd"
    cache.mkdir(parents=True)
    for name in ("key.json", "views.npy", "logits.f16", "done", "seconds", ".lock"):
        (cache / name).write_text(name)
    kept = [str(p.relative_to(store)) for p in rec.keep_cache(grid, store)]
    assert kept[0] == "teacher_cache/0123abcd/done" and len(kept) == 5
    assert sorted(kept[1:]) == [f"teacher_cache/0123abcd/{n}" for n in ("key.json", "logits.f16", "seconds", "views.npy")]
    (cache / "complete.json").write_text("{}")  # the build finished: its mark is copied before anything else
    (cache / "done").write_text("all")
    assert [p.name for p in rec.keep_cache(grid, store)] == ["complete.json", "done"]
    assert rec.keep_cache(grid, store) == [] and rec.keep_cache(tmp_path / "no-grid", store) == []
    fresh = tmp_path / "next-session" / "grid"
    rec.restore(store, fresh)
    back = fresh / "teacher_cache" / "0123abcd"
    assert sorted(p.name for p in back.iterdir()) == ["complete.json", "done", "key.json", "logits.f16", "seconds",
                                                      "views.npy"] and (back / "done").read_text() == "all"


def test_shipped_teachers_is_the_record_of_exactly_the_recipes_teachers(tmp_path):
    """The drivers' teacher table and CPU time come from the weights folder's teachers.json: refused when it
    records other teachers than the recipe distils from (a folder shipped into one teacher at a time)."""
    from ekdc import load_recipe

    ev = _load("evidence_files")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "teachers.json").write_text(json.dumps({"teachers": [{"file": "a.pt"}, {"file": "b.pt"}]}))
    both = [{"arch": "resnet8", "weights": str(tmp_path / "w" / n)} for n in ("b.pt", "a.pt")]
    folder, record = ev.shipped_teachers(load_recipe(write_recipe(tmp_path / "r.yaml", teachers=both)))
    assert folder == tmp_path / "w" and len(record["teachers"]) == 2
    with pytest.raises(SystemExit, match="records the teachers"):
        ev.shipped_teachers(load_recipe(write_recipe(tmp_path / "r1.yaml", teachers=both[:1])))
    with pytest.raises(SystemExit, match="in one folder"):
        ev.shipped_teachers(load_recipe(write_recipe(tmp_path / "r2.yaml", teachers=[
            both[0], {"arch": "resnet8", "train": {"epochs": 1}}])))


def test_headline_findings_are_computed_from_the_table():
    """The headline's answers (kept accuracy, KD over labels, branches at equal MACs and equal latency) come
    from its table's rows, so that a rebuild rewrites them; an unfinished row leaves its answer out."""
    hl = _load("headline")
    row = lambda model, acc, macs, ms=1.0, b1=1.0, b64=1.0: {  # noqa: E731
        "model": model, "accuracy": acc, "macs": macs, "p50_ms_b1": ms, "speedup_b1": b1, "speedup_b64": b64,
        "gap_points": 100 * (acc - 0.92)}
    rows = [row("student fp32", 0.905, 100e6, 0.5, 8.0, 6.0), row("student int8", 0.903, 100e6, 0.2, 20.0, 15.0),
            row("ce student fp32", 0.900, 100e6), row(hl._branch_label("avg_kd"), 0.910, 101e6, 0.7),
            row(hl._branch_label("planned:avg_kd"), 0.912, 150e6, 0.69), row("teacher ensemble", 0.92, 900e6, 4.0)]
    text = "\n".join(hl._findings({"rows": rows}))
    assert "(-1.50 points) at 1/9.0 of its MACs, 8.0x its speed at batch 1" in text and "is met." in text
    assert "+0.50 points (90.50% against 90.00%)" in text  # KD over ce
    assert "int8:** 90.30% (-0.20 against fp32), 2.50x the fp32 file's speed at batch 1" in text
    assert "Equal MACs:** three branches (101.0M MACs) against the one-branch student (100.0M), both `avg_kd`: +0.50" in text
    assert "Equal latency:** three branches against the one branch `ekdc plan` picked for their latency (150.0M MACs; " \
           "0.69 against 0.70 ms at batch 1 here): -0.20 points." in text
    assert "EKD's objective" not in text  # the ekd row has not finished
    assert "DKD" not in text  # nor has the DKD row
    text = "\n".join(hl._findings({"rows": [*rows, row("recipe+dkd student fp32", 0.9085, 100e6)]}))
    assert "**DKD** (the same student and schedule, DKD with its warm-up instead of KL): +0.35 points (90.85% against " \
           "90.50%)." in text
    assert "the recipe's one branch" not in text  # 0.5 ms against 0.7: not the same latency
    rows[0] = row("student fp32", 0.905, 100e6, 0.69, 8.0, 6.0)  # as fast as the three branches: a second answer
    assert "runs at 0.69 ms too (within 5% of the three branches' 0.70 ms): three branches against it, +0.50" in \
        "\n".join(hl._findings({"rows": rows}))
    rows[0] = row("student fp32", 0.899, 100e6)  # 2.1 points behind
    assert "**not met**" in "\n".join(hl._findings({"rows": rows}))
    rows[0] = row("student fp32", 0.91, 200e6)  # close, but more than a fifth of the MACs
    assert "**not met**" in "\n".join(hl._findings({"rows": rows}))


def test_the_validation_split_is_listed_for_clients_that_have_only_the_files(tmp_path):
    """split_of writes the validation files beside evidence.json in sha256sum's format, paths under the data
    folder, in the order ekdc scores them: exactly the split ekdc draws, and the list's digest in the entry."""
    import hashlib

    from PIL import Image

    from ekdc.data.splits import index_splits
    from ekdc.recipe import DataConfig

    ev = _load("evidence_files")
    root = tmp_path / "data"
    for c in ("cat", "dog", "owl"):
        (root / c).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (8, 8), (i * 40, len(c) * 20, 0)).save(root / c / f"{i} x.png")
    data = DataConfig(dataset="imagefolder", root=str(root), image_size=8, val_per_class=2, split_seed=3)
    split = ev.split_of(data, tmp_path / "out")
    listing = (tmp_path / "out" / split["val_files"]).read_text()
    assert split["val_files_sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert (split["val_per_class"], split["split_seed"]) == (2, 3)
    part = index_splits(data).val
    expected = [str(Path(part.source.files[i]).relative_to(root).as_posix()) for i in part.positions]
    rows = [line.split("  ", 1) for line in listing.splitlines()]
    assert [r[1] for r in rows] == expected and len(rows) == 6  # "0 x.png": a name with a space stays whole
    assert sorted(r[1].split("/")[0] for r in rows) == ["cat", "cat", "dog", "dog", "owl", "owl"]
    for digest, rel in rows:
        assert digest == hashlib.sha256((root / rel).read_bytes()).hexdigest()
    other = ev.split_of(DataConfig(dataset="imagefolder", root=str(root), image_size=8, val_per_class=2, split_seed=4),
                        tmp_path / "out")
    assert other["val_files_sha256"] != split["val_files_sha256"]  # another seed, another draw, another list


def test_the_shipped_evidence_json_describes_its_files_as_they_are():
    """docs/evidence/ is read elsewhere, by clients that have only the files: every row's file is there, its
    MACs and parameters are the file's own (a padded fold counts its zeros), every key is described, the
    split is named, and teachers.onnx says what it stores (fp16 weights) behind float32 I/O."""
    import onnx

    from ekdc.onnx_graph.cost import count_params_macs

    folder = ROOT / "docs" / "evidence"
    data = json.loads((folder / "evidence.json").read_text())
    assert data["split"]["val_per_class"] and "split_seed" in data["split"] and "fields" in data
    described = {k.split("[].")[-1] for k in data["fields"]}
    for entry in [*data["files"], data["teachers"]]:
        model = onnx.load(str(folder / entry["onnx"]))
        params, macs, _ = count_params_macs(model)
        assert (entry["onnx_macs"], entry["onnx_params"]) == (macs, params), entry["onnx"]
        assert entry["onnx_bytes"] == (folder / entry["onnx"]).stat().st_size
        assert entry["onnx_macs"] >= entry["macs"]  # padding adds zeros, never removes work
        for io in (*model.graph.input, *model.graph.output):
            assert io.type.tensor_type.elem_type == onnx.TensorProto.FLOAT, (entry["onnx"], io.name)
    for row in data["files"]:
        assert {"row", "onnx", "val_acc", "macs", "onnx_macs", "per_class", "train_images"} <= set(row)
        assert {k for k in row if k not in ("teachers",)} <= described | {"mode", "kd_loss", "student", "num_branches",
                                                                          "seed", "params", "latency_rounds_ms",
                                                                          "latency_ms_b64", "img_s_b64", "fold",
                                                                          "onnx_bytes"}
    meta = {p.key: p.value for p in onnx.load(str(folder / "teachers.onnx"), load_external_data=False).metadata_props}
    assert meta["ekdc.precision"] == "fp16"
    for key in set(data["teachers"]) - {"files"}:  # the ensemble's keys are described too
        assert key in data["fields"]["teachers"], key
    # the validation files a client scores on: listed, the list's digest recorded, 500 a class of ekdc.classes
    import hashlib
    from collections import Counter

    listing = (folder / data["split"]["val_files"]).read_text()
    assert hashlib.sha256(listing.encode()).hexdigest() == data["split"]["val_files_sha256"]
    per_class = Counter(line.split("  ", 1)[1].split("/")[0] for line in listing.splitlines())
    assert set(per_class) == set(json.loads(meta["ekdc.classes"]))
    assert set(per_class.values()) == {data["split"]["val_per_class"]}


def test_a_shipped_recipe_names_files_in_the_checkout_relative_to_it(tmp_path):
    import yaml

    ship = _load("ship_teachers")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text(yaml.safe_dump({
        "data": {"root": str(ROOT / "data")},
        "teachers": [{"arch": "wrn_16_4", "weights": str(ROOT / "weights" / "cifar10-large" / "wrn_16_4.pt")},
                     {"arch": "vgg13", "weights": str(tmp_path / "elsewhere.pt")}]}))
    shipped = yaml.safe_load(ship._ship_recipe(tmp_path / "run", tmp_path / "r.yaml").read_text())
    assert shipped["data"]["root"] == "data"
    assert [t["weights"] for t in shipped["teachers"]] == ["weights/cifar10-large/wrn_16_4.pt", str(tmp_path / "elsewhere.pt")]


FAKE_AIRBENCH = '''
import torch
hyp = {"opt": {"train_epochs": 9.9}}
class Loader:
    def __init__(self, gpu=0):
        self.images = torch.zeros(4, 3, 2, 2, dtype=torch.uint8)
        data = torch.load(PATH, map_location=torch.device(gpu))
        self.images = self.images.half() / 255
def make_net():
    net = torch.nn.Linear(2, 2)
    net = net.half().cuda()
    return net
def timed():
    starter = torch.cuda.Event(enable_timing=True)
    ender = torch.cuda.Event(enable_timing=True)
    starter.record(); ender.record()
    torch.cuda.synchronize()
    return starter.elapsed_time(ender)
'''


def test_airbench_reference_runs_airbench_on_the_cpu_and_refuses_another_snapshot(tmp_path):
    ref = _load("airbench_reference")
    repo = tmp_path / "airbench"
    (repo / "legacy").mkdir(parents=True)
    (repo / "legacy" / "airbench94.py").write_text(FAKE_AIRBENCH)
    torch_ = pytest.importorskip("torch")
    torch_.save({"x": 1}, tmp_path / "d.pt")
    ns = ref.load_airbench(repo)
    ns["PATH"] = str(tmp_path / "d.pt")
    # every CUDA and fp16 call is gone: these run on a machine without a GPU, in fp32
    assert ns["make_net"]().weight.dtype == torch_.float32
    assert ns["Loader"]().images.dtype == torch_.float32
    assert ns["timed"]() >= 0
    (repo / "legacy" / "airbench94.py").write_text(FAKE_AIRBENCH.replace("net = net.half().cuda()", "net = net.cuda()"))
    with pytest.raises(SystemExit, match="has no 'net = net.half"):
        ref.load_airbench(repo)


def test_airbench_reference_page_puts_the_run_beside_the_published_figure(tmp_path):
    ref = _load("airbench_reference")
    result = {"runs": [{"run": 0, "tta0": 0.88, "tta1": 0.89, "tta2": 0.9001, "seconds": 10.0, "epochs": 9.9},
                       {"run": 1, "tta0": 0.86, "tta1": 0.87, "tta2": 0.8801, "seconds": 10.0, "epochs": 9.9}],
              "images": {"train": 45000, "val": 5000}, "machine": "m", "command": "python experiments/x.py"}
    page = ref.write_page(result, tmp_path, "ignored")
    assert "| airbench94 on ekdc's split (run 1) | 9.9 | 45,000 | 86.00% | 87.00% | 88.01% | 10 |" in page
    assert "scores 5.00 points under its published figure" in page  # 94.01 against the mean of 90.01 and 88.01
    assert json.loads((tmp_path / "airbench-reference.json").read_text())["published"]["tta2"] == 0.9401


def test_soft_targets_reads_only_finished_chunks_and_scores_them(tmp_path):
    """experiments/soft_targets.py: the accuracies and probabilities of a hand-made cache, over the images
    of its finished chunks only (a build still running has zeros elsewhere)."""
    import numpy as np

    mod = _load("soft_targets")
    n, k, m, c = 300, 2, 2, 3  # two chunks of 256: the first finished, the second not
    labels = np.arange(n) % c
    odd = np.arange(n) % 2 == 1
    logits = np.zeros((n, k, m, c), np.float16)
    logits[np.arange(n), :, 0, labels] = 4.0  # teacher 0: always right, sure
    logits[np.arange(n), :, 1, np.where(odd, (labels + 1) % c, labels)] = np.where(odd, 2.0, 4.0)[:, None]
    folder = tmp_path / "cache"  # teacher 1: right on even images; on odd ones wrong, less sure
    folder.mkdir()
    logits.tofile(folder / "logits.f16")
    (folder / "done").write_bytes(bytes([1, 0]))
    (folder / "key.json").write_text(json.dumps({"layout": {"images": n, "views": k, "teachers": m, "classes": c}}))
    images = mod.finished_images(folder)
    assert images.sum() == 256 and images[:256].all()
    s = mod.cache_stats(folder, labels, images)
    assert s["images"] == 256 and s["views"] == 512
    assert s["teacher_acc"] == pytest.approx([1.0, 0.5])
    sure, other = np.exp(4.0) / (np.exp(4.0) + 2), 1 / (np.exp(4.0) + 2)  # a logit of 4 against two of 0
    unsure, rest = np.exp(2.0) / (np.exp(2.0) + 2), 1 / (np.exp(2.0) + 2)  # a logit of 2
    # even images: both teachers give (sure, other, other); odd ones: the mean with teacher 1's wrong answer
    assert s["ensemble_acc"] == pytest.approx(1.0)  # (sure + rest) / 2 = 0.54 beats (other + unsure) / 2 = 0.40
    assert s["mean_p_true"] == pytest.approx((sure + (sure + rest) / 2) / 2, abs=1e-3)
    assert s["mean_p_runner_up"] == pytest.approx((other + (other + unsure) / 2) / 2, abs=1e-3)
