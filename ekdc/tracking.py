"""Runs people can watch: TensorBoard event files in the run folder's ``tb/`` and MLflow runs (``tracking:``
in a recipe; under ``torchrun``, rank 0 only).

    tracking: {tensorboard: true, mlflow: true, experiment: my-study}

MLflow follows its own environment (``MLFLOW_TRACKING_URI``; without it a local ``mlruns/`` folder holding
``mlflow.db``: MLflow 3 keeps its file store for old runs only). Logged: the resolved recipe as parameters; every epoch's loss, loss
terms, learning rate, throughput and training accuracy, per stage; each model's validation accuracy at
the end; the final metrics; and, when ``ekdc export`` runs on a tracked run, the exported files as
artifacts. A tracker that fails (a server that is down or refuses a write) is turned off with one
warning and training goes on; ``--resume`` continues the same MLflow run (its id is kept in the run
folder's ``tracking.json``). Both libraries are optional extras: ``pip install 'ekdc[track]'``.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Optional

from . import _io
from .errors import UserError

EXTRA = "pip install 'ekdc[track]'"
DEFAULT_MLFLOW_STORE = Path("mlruns") / "mlflow.db"  # beside the working directory, as mlflow's own mlruns/
STATE_FILE = "tracking.json"


def check_available(cfg) -> None:
    """Before any training: every tracker the recipe turns on can be imported, or one line naming the extra."""
    for on, module, what in ((cfg.tensorboard, "torch.utils.tensorboard", "tensorboard"), (cfg.mlflow, "mlflow", "mlflow")):
        if on:
            try:
                with contextlib.redirect_stderr(io.StringIO()):
                    __import__(module)
            except ImportError:
                raise UserError(f"tracking.{what}: true needs the {what} library, which is not installed here; "
                                f"{EXTRA}") from None


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_path: Path, recipe_raw: dict):
        from torch.utils.tensorboard import (
            SummaryWriter,  # optional extra: imported only where asked for
        )

        self.writer = SummaryWriter(log_dir=str(run_path / "tb"))
        self.writer.add_text("recipe", "```\n" + json.dumps(recipe_raw, indent=1) + "\n```", 0)

    def metrics(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self, status: str = "FINISHED") -> None:
        self.writer.close()


class _MLflow:
    name = "mlflow"

    def __init__(self, run_path: Path, recipe_raw: dict, experiment: Optional[str], resume_id: Optional[str],
                 resume_uri: Optional[str] = None):
        from mlflow.entities import (
            Param,  # optional extra: imported only where asked for
        )
        from mlflow.tracking import MlflowClient

        # a server that is down: MLflow's client otherwise retries for minutes before it gives up
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        logging.getLogger("mlflow").setLevel(logging.ERROR)
        logging.getLogger("alembic").setLevel(logging.ERROR)
        self.uri = resume_uri or tracking_uri()  # a resumed run goes on where it was tracked
        self.client = MlflowClient(tracking_uri=self.uri)  # its own client: no process-wide state is changed
        name = experiment or recipe_raw.get("name", "ekdc")
        found = self.client.get_experiment_by_name(name)
        exp_id = found.experiment_id if found is not None else self.client.create_experiment(
            name, artifact_location=_artifacts_beside(self.uri))
        if resume_id is not None:
            self.run_id = resume_id
            self.client.update_run(resume_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_path.name).info.run_id
            params = [Param(k, v[:6000]) for k, v in _flat(recipe_raw).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters a call
                self.client.log_batch(self.run_id, params=params[i : i + 100])

    def metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def close(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def tracking_uri() -> str:
    """MLflow's own environment (MLFLOW_TRACKING_URI), else a local mlruns/ beside the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    DEFAULT_MLFLOW_STORE.parent.mkdir(exist_ok=True)
    return f"sqlite:///{DEFAULT_MLFLOW_STORE.resolve()}"


def _artifacts_beside(uri: str) -> Optional[str]:
    """A SQLite store's artifacts in a folder beside its database file. MLflow's own default for a database
    store is ./mlruns of whatever directory the run started in, which scatters one experiment's files."""
    if not uri.startswith("sqlite:///"):
        return None  # a server or a file store places its artifacts itself
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "artifacts").as_uri()


class Tracker:
    """The trackers a run asked for, each isolated: one that fails says so once and is dropped."""

    def __init__(self, backends: list, say: Callable[[str], None]):
        self.backends, self.say = backends, say

    def _each(self, what: str, fn) -> None:
        for b in list(self.backends):
            try:
                fn(b)
            except Exception as err:  # noqa: BLE001 - a tracking server's failure must never stop training
                self.backends.remove(b)
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                self.say(f"[yellow]warning:[/yellow] {b.name} tracking stopped ({what}: {first}); training goes on")

    def epoch(self, record: dict) -> None:
        """One epoch's log record: ``<stage>/<key>`` scalars at step ``epoch``."""
        stage = record["stage"]
        values = {f"{stage}/{k}": v for k, v in record.items()
                  if k in ("loss", "train_acc", "lr", "images_per_s") or k.startswith("loss_")}
        self._each("an epoch's metrics", lambda b: b.metrics(values, int(record["epoch"])))

    def final(self, metrics: dict) -> None:
        values = {"val/student_ensemble_acc": metrics["student"]["ensemble_acc"],
                  "val/teacher_ensemble_acc": metrics["teacher_ensemble_acc"], "final/seconds": metrics["seconds"],
                  **{f"val/student_branch_{i}_acc": a for i, a in enumerate(metrics["student"]["branch_acc"])},
                  **{f"val/teacher_{t['name']}_acc": t["acc"] for t in metrics["teachers"]}}
        self._each("the final metrics", lambda b: b.metrics(values, 0))

    def close(self, status: str = "FINISHED") -> None:
        """``status``: FINISHED, FAILED (an error ended the run) or KILLED (interrupted), as MLflow names them."""
        self._each("closing", lambda b: b.close(status))


def _state(run_path: Path) -> dict:
    try:
        return json.loads((run_path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}


def open_tracker(cfg, run_path: Path, recipe_raw: dict, is_main: bool, say: Callable[[str], None]) -> Tracker:
    """The run's tracker (rank 0; elsewhere one that does nothing); a tracker that cannot start warns."""
    backends = []
    if is_main and (cfg.tensorboard or cfg.mlflow):
        state = _state(run_path)
        starters = []
        if cfg.tensorboard:
            starters.append(("tensorboard", lambda: _TensorBoard(run_path, recipe_raw)))
        if cfg.mlflow:
            starters.append(("mlflow", lambda: _MLflow(run_path, recipe_raw, cfg.experiment, state.get("mlflow_run_id"),
                                                       state.get("mlflow_tracking_uri"))))
        for name, start in starters:
            try:
                backends.append(start())
            except Exception as err:  # noqa: BLE001 - a server that is down must not stop training
                first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                say(f"[yellow]warning:[/yellow] {name} tracking could not start ({first}); training goes on untracked")
        ml = next((b for b in backends if b.name == "mlflow"), None)
        if ml is not None:
            _io.write_json(run_path / STATE_FILE, {**state, "mlflow_run_id": ml.run_id, "mlflow_tracking_uri": ml.uri})
    return Tracker(backends, say)


def log_export(run_path: Path, files: list[Path], say: Callable[[str], None]) -> None:
    """``ekdc export`` on a tracked run: the exported files as artifacts of the run's MLflow run."""
    state = _state(run_path)
    if not state.get("mlflow_run_id"):
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=state["mlflow_tracking_uri"])
        with contextlib.redirect_stderr(io.StringIO()):
            for p in files:
                client.log_artifact(state["mlflow_run_id"], str(p), artifact_path="export")
        say(f"logged {len(files)} exported files to MLflow run {state['mlflow_run_id']}")
    except Exception as err:  # noqa: BLE001 - the export is written either way
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        say(f"[yellow]warning:[/yellow] the exported files were not logged to MLflow ({first})")
