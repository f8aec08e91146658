"""Shared fixtures: tiny synthetic recipes and one trained tiny run reused by export tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: each worker (and every process it starts) gets one thread, so N workers on N cores never
    # oversubscribe them; more threads than cores makes torch's OpenMP workers wait on each other, many
    # times slower than one thread each
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"


def tiny_recipe(**over) -> dict:
    """A recipe on synthetic 16x16 data: trains in seconds on a CPU."""
    r = {
        "name": "tiny",
        "seed": 0,
        "precision": "fp32",
        "data": {"dataset": "synthetic", "num_classes": 4, "num_samples": 160, "image_size": 16, "val_fraction": 0.25},
        "teachers": [
            {"arch": "resnet8", "train": {"epochs": 2, "batch_size": 32, "lr": 0.05}},
            {"arch": "wrn_16_2", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}},
        ],
        "student": {"trunk_width": 8, "trunk_blocks": 1, "branch_widths": [8, 16], "branch_blocks": 1},
        "distill": {"epochs": 2, "batch_size": 32, "lr": 0.05, "temperature": 4.0},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(r.get(k), dict):
            r[k] = {**r[k], **v}
        else:
            r[k] = v
    return r


def write_recipe(path: Path, **over) -> Path:
    path.write_text(yaml.safe_dump(tiny_recipe(**over), sort_keys=False))
    return path


def run_cli(*args: str, cwd: Path | None = None, fresh: bool = False) -> subprocess.CompletedProcess:
    """``ekdc ARGS`` as a user runs it: its exit code, stdout and stderr. In this process by default (a fresh
    interpreter costs seconds of imports a call); ``fresh=True`` for what only a new process shows."""
    argv = [*map(str, args)]
    if fresh:
        env = {**os.environ, "COLUMNS": "160", "PYTHONWARNINGS": "ignore"}
        return subprocess.run([sys.executable, "-m", "ekdc", *argv], capture_output=True, text=True, cwd=cwd,
                              timeout=600, env=env)
    import contextlib
    import io
    import traceback
    import warnings

    from ekdc import cli

    out, err, code = io.StringIO(), io.StringIO(), 0
    old_argv, old_cwd, old_width = sys.argv, os.getcwd(), cli.console.width
    try:
        sys.argv = ["ekdc", *argv]
        cli.console.width = 160
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                cli.main()
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            except BaseException:  # what the interpreter does with an uncaught exception: a traceback, exit 1
                traceback.print_exc()
                code = 1
    finally:
        sys.argv, cli.console.width = old_argv, old_width
        os.chdir(old_cwd)
    return subprocess.CompletedProcess(["ekdc", *argv], code, out.getvalue(), err.getvalue())


def torchrun_distill(recipe: Path, out: Path, timeout: int = 600, **popen) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 -m ekdc distill RECIPE --out OUT -q``, one thread a process."""
    import shutil

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    assert torchrun, "torchrun is not installed beside this interpreter"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "ekdc", "distill", str(recipe),
                           "--out", str(out), "-q"], capture_output=True, text=True, env=env, timeout=timeout,
                          **popen)


def ranks_said(stderr: str, tail: int = 3000) -> str:
    """What the ranks themselves printed, without torchrun's own report of a failed child (which names only a
    signal and would push the rank's message out of an assertion's view)."""
    ours = [line for line in stderr.splitlines() if "torch/distributed/elastic" not in line
            and not line.startswith(("Traceback", "  File ", "    ", "torch.distributed.elastic"))]
    return "\n".join(ours)[-tail:]


def kill_9_during(recipe: Path, run: Path, stage: str, epochs: int) -> None:
    """Start ``ekdc distill recipe --out run`` and kill it with SIGKILL once ``stage`` has logged ``epochs``
    epochs; the student must not have been saved yet."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "ekdc", "distill", str(recipe), "--out", str(run), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    log, deadline = run / "log.jsonl", time.time() + 300
    while (not log.exists() or log.read_text().count(f'"{stage}"') < epochs) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "student.pt").exists(), "the run ended before it could be killed"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One trained tiny run (through the library), shared by the export tests."""
    from ekdc import distill, load_recipe

    d = tmp_path_factory.mktemp("tiny_run")
    recipe = load_recipe(write_recipe(d / "tiny.yaml"))
    return distill(recipe, d / "run", progress=False).path


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> tuple[Path, dict]:
    """The tiny run exported with fp16 and int8 (fold chosen by timing)."""
    from ekdc import export

    out = tmp_path_factory.mktemp("tiny_export")
    manifest = export(tiny_run, out, fp16=True, int8=True, calib_images=32)
    return out, manifest
