"""The run folder: one process trains into it at a time, and a failed write loses nothing."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ekdc.run import RunDir, RunLock, claim_new_run
from tests.conftest import ROOT, run_cli, torchrun_distill, write_recipe


def _holder_process(path) -> subprocess.Popen:
    """A separate process that takes the run folder's lock and keeps it until killed."""
    code = ("import sys, time; from ekdc.run import RunDir, RunLock; lock = RunLock(RunDir(sys.argv[1])).acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_is_refused_naming_the_holder(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    holder = _holder_process(run)
    try:
        res = run_cli("distill", tiny_run.parent / "tiny.yaml", "--out", run, "--resume")
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert f"is in use by process {holder.pid}" in lines[0] and str(run) in lines[0]
        # export only reads: the lock does not block it
        res = run_cli("export", run, "--out", tmp_path / "export", "--fold", "grouped", "--parity-images", "8")
        assert res.returncode == 0, res.stderr
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_process_does_not_block(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    holder = _holder_process(run)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (run / ".lock").read_text().strip() == str(holder.pid)  # the file stays; its lock died with the process
    res = run_cli("distill", tiny_run.parent / "tiny.yaml", "--out", run, "--resume", "-q")
    assert res.returncode == 0, res.stderr
    assert not (run / ".lock").exists()  # released and removed at the end


def test_new_runs_started_together_get_their_own_folders(tmp_path):
    first, lock1 = claim_new_run(tmp_path, "exp")
    second, lock2 = claim_new_run(tmp_path, "exp")  # the first folder is still empty, but taken
    try:
        assert first.path.name == "exp" and second.path.name == "exp-2"
        assert RunLock(first).try_acquire() == str(os.getpid())
    finally:
        lock1.release()
        lock2.release()
    (first.path / "student.pt").write_bytes(b"x")
    third, lock3 = claim_new_run(tmp_path, "exp")
    lock3.release()
    assert third.path.name == "exp-2"  # an empty numbered folder is reused; one with files never is


def _limit_file_size(limit: int):
    def preexec():
        # a full disk, simulated: writes past `limit` bytes fail with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_log_never_keeps_a_torn_line(tmp_path):
    run = RunDir(tmp_path)
    run.append_log({"epoch": 1})
    size = run.log_path.stat().st_size
    code = ("import sys; from ekdc.run import RunDir; from ekdc.errors import UserError\n"
            "try:\n    RunDir(sys.argv[1]).append_log({'epoch': 2, 'pad': 'x' * 500})\n"
            "except UserError as e:\n    print(e); sys.exit(2)\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         preexec_fn=_limit_file_size(size + 40))
    assert res.returncode == 2 and f"cannot write {run.log_path}" in res.stdout, (res.stdout, res.stderr)
    assert run.log_path.stat().st_size == size  # the part that was written was cut off again
    # a kill in the middle of a write leaves a torn line; the next run drops it before appending
    with open(run.log_path, "a") as fh:
        fh.write('{"epoch": 2, "los')
    run.repair_log()
    run.append_log({"epoch": 2})
    assert [json.loads(line)["epoch"] for line in run.log_path.read_text().splitlines()] == [1, 2]


# the first teacher's checkpoints fit under the limit, the second's do not
FULL_DISK_RECIPE = dict(teachers=[{"arch": "resnet8", "train": {"epochs": 2, "batch_size": 32, "lr": 0.05}},
                                  {"arch": "wrn_16_2", "train": {"epochs": 2, "batch_size": 32, "lr": 0.05}}])
FULL_DISK_LIMIT = 2_000_000  # bytes: resnet8's stage checkpoint is about 0.6 MB, wrn_16_2's about 5.5 MB


def test_full_disk_ends_in_one_line_and_resume_continues(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", **FULL_DISK_RECIPE)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-m", "ekdc", "distill", str(recipe), "--out", str(run), "-q"],
                         capture_output=True, text=True, env=env, cwd=ROOT, preexec_fn=_limit_file_size(FULL_DISK_LIMIT),
                         timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert f"cannot write {run / 'ckpt' / 'teacher-wrn_16_2.pt'}" in lines[0] and "--resume" in lines[0]
    assert (run / "teachers" / "resnet8.pt").is_file()  # the last good checkpoint is intact
    assert not [p for p in run.rglob("*.tmp")]  # no half-written file
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]  # every line whole
    assert [r["epoch"] for r in log if r.get("stage") == "teacher-resnet8"] == [1, 2]
    # space freed: --resume finishes the run without training the first teacher again
    res = run_cli("distill", recipe, "--out", run, "--resume", "-q")
    assert res.returncode == 0, res.stderr
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log if r.get("stage") == "teacher-resnet8"] == [1, 2]
    assert (run / "metrics.json").is_file()


@pytest.mark.slow
def test_full_disk_under_torchrun_stops_every_rank(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", device="cpu", **FULL_DISK_RECIPE)
    t0 = time.time()
    res = torchrun_distill(recipe, tmp_path / "ddp", timeout=300, preexec_fn=_limit_file_size(FULL_DISK_LIMIT))
    assert res.returncode != 0 and time.time() - t0 < 300
    assert "cannot write" in res.stderr and "teacher-wrn_16_2.pt" in res.stderr
    assert "rank 0 failed to write" in res.stderr  # the other rank stopped too, rather than waiting


def test_ctrl_c_ends_in_one_line_and_resume_continues(tmp_path):
    from tests.test_hardening import RESUME_RECIPE, _student_epochs

    # 30 short student epochs: a margin for the signal on a loaded machine (with 6, a test process that waited
    # for a core a second too long once sent it after the run had finished)
    recipe = write_recipe(tmp_path / "r.yaml", **{**RESUME_RECIPE, "distill": {**RESUME_RECIPE["distill"], "epochs": 30}})
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "ekdc", "distill", str(recipe), "--out", str(run), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    deadline = time.time() + 300
    while _student_epochs(run) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and "interrupted" in lines[0], err
    assert not (run / ".lock").exists() and not list(run.rglob("*.tmp"))
    res = run_cli("distill", recipe, "--out", run, "--resume", "-q")
    assert res.returncode == 0, res.stderr
    assert (run / "metrics.json").is_file()
