"""Crash safety and scale-out: kill -9 and --resume, divergence, torchrun with 2 CPU processes."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import ranks_said, run_cli, torchrun_distill, write_recipe

# long enough that a kill lands mid-training, short enough for CI
RESUME_RECIPE = dict(
    data={"num_samples": 480, "augment": True},
    teachers=[{"arch": "resnet8", "train": {"epochs": 3, "batch_size": 32, "lr": 0.05}}],
    student={"trunk_width": 8, "branch_widths": [8, 16]},
    distill={"epochs": 6, "batch_size": 32, "lr": 0.05},
)


def _student_epochs(run) -> int:
    log = run / "log.jsonl"
    if not log.exists():
        return 0
    return sum('"stage": "student-ekd"' in line for line in log.read_text().splitlines())


@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_run(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", **RESUME_RECIPE)
    # reference: one uninterrupted run
    ref = run_cli("distill", recipe, "--out", tmp_path / "ref", "-q")
    assert ref.returncode == 0, ref.stderr
    # the same run, killed with SIGKILL after its second student epoch
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "ekdc", "distill", str(recipe), "--out", str(run), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while _student_epochs(run) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "student.pt").exists() and (run / "ckpt" / "student-ekd.pt").exists()
    assert (run / "teachers" / "resnet8.pt").exists()
    done_before = _student_epochs(run)
    saved_epoch = torch.load(run / "ckpt" / "student-ekd.pt", weights_only=True)["epoch"]
    assert saved_epoch >= 2  # each epoch is checkpointed before it is logged
    res = run_cli("distill", recipe, "--out", run, "--resume", "-q")
    assert res.returncode == 0, res.stderr
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    teacher_epochs = [r["epoch"] for r in log if r.get("stage") == "teacher-resnet8"]
    assert teacher_epochs == [1, 2, 3]  # the finished teacher stage was not retrained
    student_epochs = [r["epoch"] for r in log if r.get("stage") == "student-ekd"]
    # training continues after the last checkpointed epoch: the one running at the kill is redone,
    # no checkpointed one is
    assert student_epochs[done_before:] == list(range(saved_epoch + 1, 7))
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    # Same seed, fp32, CPU: data order and augmentation are functions of (seed, epoch) and the
    # checkpoint restores weights, optimiser, scheduler and RNG, so the resumed run retraces the
    # uninterrupted one. Accuracies are compared with a tolerance of one validation image, for
    # kernels that may sum in another order after a restart.
    one_image = 1.0 / b["val_images"] + 1e-9
    assert abs(a["student"]["ensemble_acc"] - b["student"]["ensemble_acc"]) <= one_image
    assert all(abs(x - y) <= one_image for x, y in zip(a["student"]["branch_acc"], b["student"]["branch_acc"]))
    assert abs(a["teacher_ensemble_acc"] - b["teacher_ensemble_acc"]) <= one_image
    # resuming a finished run changes nothing and retrains nothing
    res = run_cli("distill", recipe, "--out", run, "--resume", "-q")
    assert res.returncode == 0 and json.loads((run / "metrics.json").read_text())["student"] == b["student"]


def test_resume_refuses_a_different_recipe(tmp_path, tiny_run):
    shutil.copytree(tiny_run, tmp_path / "run")
    res = run_cli("distill", tiny_run.parent / "tiny.yaml", "--out", tmp_path / "run", "--resume",
                  "--set", "distill.temperature=2")
    assert res.returncode == 2 and "differs" in res.stderr and "distill.temperature" in res.stderr


def test_a_damaged_teacher_on_resume_names_the_way_back(tmp_path, tiny_run):
    """A teacher file cut short (a copy that ended early) is named with what to do: delete it, and --resume
    trains that teacher again; doing so finishes the run."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    teacher = next((run / "teachers").glob("*.pt"))
    teacher.write_bytes(teacher.read_bytes()[:100])
    res = run_cli("distill", tiny_run.parent / "tiny.yaml", "--out", run, "--resume", "-q")
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"{teacher} is corrupt" in lines[0] and f"delete it, and --resume trains teacher {teacher.stem} again" in lines[0]
    teacher.unlink()
    res = run_cli("distill", tiny_run.parent / "tiny.yaml", "--out", run, "--resume", "-q")
    assert res.returncode == 0, res.stderr
    assert teacher.exists()


def test_divergence_stops_with_stage_and_epoch(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", teachers=[{"arch": "resnet8", "train": {
        "epochs": 4, "batch_size": 16, "lr": 1.0e+12, "warmup_epochs": 0}}])
    res = run_cli("distill", recipe, "--out", tmp_path / "run", "-q")
    assert res.returncode == 2, res.stderr
    line = res.stderr.strip().splitlines()
    assert len(line) == 1 and "training diverged: teacher-resnet8 loss is" in line[0] and "in epoch" in line[0]
    assert "start a new run with a lower teachers.N.train.lr" in line[0]
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", device="cpu", distill={"epochs": 2, "batch_size": 16, "lr": 0.05,
                                                                       "weights": {"feat": 0.5}})
    res = torchrun_distill(recipe, tmp_path / "ddp")
    assert res.returncode == 0, ranks_said(res.stderr)
    run = tmp_path / "ddp"
    m = json.loads((run / "metrics.json").read_text())
    assert m["world_size"] == 2 and len(m["student"]["branch_acc"]) == 2
    for f in ("recipe.yaml", "student.pt", "teachers/resnet8.pt", "teachers/wrn_16_2.pt"):
        assert (run / f).is_file()
    # only rank 0 writes: one log line per epoch, not two
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r.get("stage") == "student-ekd"] == [1, 2]
    # batch_size is the global batch: 2 processes of 8 images take the steps one process of 16 takes
    # (120 training images: 7 full batches an epoch), not 2 x 16 in half the steps
    student = [r for r in log if r.get("stage") == "student-ekd"]
    assert m["train_images"] == 120 and all((r["steps"], r["images"]) == (7, 112) for r in student), student
    assert sorted(p.name for p in run.iterdir()) == ["data.json", "log.jsonl", "metrics.json", "recipe.yaml", "student.pt",
                                                     "teachers"]


def test_a_failed_export_or_shard_leaves_no_empty_folder_it_made(tiny_run, tmp_path, monkeypatch):
    """export and data shard make their output folder (and its parents) first: when they fail after that (a
    full disk, a corrupt checkpoint found late), the folders they made go again if still empty; a folder the
    user had stays."""
    from PIL import Image

    from ekdc import UserError, export
    from ekdc.data import shard_writer
    from ekdc.deploy import export as export_mod

    def fail(*a, **k):
        raise UserError("cannot write: No space left on device")

    monkeypatch.setattr(export_mod.checkpoint, "load_student", fail)
    with pytest.raises(UserError, match="No space left"):
        export(tiny_run, tmp_path / "new" / "export")
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(UserError):
        export(tiny_run, tmp_path / "mine")
    assert (tmp_path / "mine").is_dir()  # the user's own folder is never removed

    for c in ("a", "b"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 90, ord(c), 0)).save(tmp_path / "img" / c / f"{i}.png")
    monkeypatch.setattr(shard_writer, "_write_tars", fail)
    with pytest.raises(UserError, match="No space left"):
        shard_writer.write_shards(tmp_path / "img", tmp_path / "shards" / "v1")
    assert not (tmp_path / "shards").exists()
