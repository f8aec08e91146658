"""A standard output that stops taking output (a closed pipe, a full disk under a redirect) stops the
output, not the command: the run's files are whole, no traceback, one note (none for a closed pipe)."""
import subprocess
import sys

from conftest import ROOT, write_recipe


def test_a_full_disk_under_the_redirect_does_not_stop_the_training(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml")
    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-m", "ekdc", "distill", str(recipe), "--out", str(tmp_path / "run")],
                             stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert (tmp_path / "run" / "student.pt").is_file()
    assert res.stderr.strip().splitlines()[-1].startswith("ekdc: note: standard output stopped")


def test_a_closed_pipe_is_silent(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ekdc", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    proc.stdout.close()  # what `| head -1` does, here before ekdc has written anything
    err = proc.stderr.read()
    assert proc.wait() == 0 and err.strip() == "", err


def test_a_command_started_with_stdout_closed_runs():
    """A daemon, or `ekdc ... >&-`: Python has no sys.stdout at all; the command runs and writes nothing."""
    res = subprocess.run(f"{sys.executable} -m ekdc models >&-", shell=True, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
