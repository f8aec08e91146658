"""Tracking: TensorBoard's event files and MLflow's runs read back with their own readers; a tracking
server that is down leaves the run intact; --resume continues the same MLflow run."""
from __future__ import annotations

import json
import sys

import pytest

from ekdc import UserError, distill, export
from ekdc.recipe import recipe_from_dict

from conftest import tiny_recipe

pytest.importorskip("mlflow", reason="tracking tests need the track extra (pip install 'ekdc[track]')")
pytest.importorskip("tensorboard", reason="tracking tests need the track extra (pip install 'ekdc[track]')")


def _recipe(**tracking):
    raw = tiny_recipe(teachers=[{"arch": "resnet8", "train": {"epochs": 2, "batch_size": 32, "lr": 0.05}}])
    raw["tracking"] = tracking
    return recipe_from_dict(raw)


def test_tensorboard_scalars_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = distill(_recipe(tensorboard=True), tmp_path / "run", progress=False)
    acc = EventAccumulator(str(run.path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"teacher-resnet8/loss", "student-ekd/loss", "student-ekd/loss_kd", "student-ekd/lr",
            "student-ekd/images_per_s", "val/student_ensemble_acc"} <= set(tags)
    assert [e.step for e in acc.Scalars("student-ekd/loss")] == [1, 2]
    logged = [json.loads(line) for line in run.log_path.read_text().splitlines() if '"student-ekd"' in line]
    assert [round(e.value, 4) for e in acc.Scalars("student-ekd/loss")] == [round(r["loss"], 4) for r in logged]
    assert acc.Scalars("val/student_ensemble_acc")[0].value == pytest.approx(run.metrics()["student"]["ensemble_acc"])


def test_mlflow_run_params_metrics_resume_and_export_artifacts(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store' / 'ml.db'}"
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land in the directory the run was started from
    recipe = _recipe(mlflow=True, experiment="tests")
    distill(recipe, tmp_path / "run", progress=False, teachers_only=True)
    run_id = json.loads((tmp_path / "run" / "tracking.json").read_text())["mlflow_run_id"]
    run = distill(recipe, tmp_path / "run", resume=True, progress=False)  # the same MLflow run goes on
    assert json.loads((run.path / "tracking.json").read_text())["mlflow_run_id"] == run_id
    client = MlflowClient(tracking_uri=uri)
    r = client.get_run(run_id)
    assert r.data.params["mode"] == "ekd" and r.data.params["distill.temperature"] == "4.0"
    assert len(client.get_metric_history(run_id, "teacher-resnet8/loss")) == 2
    assert len(client.get_metric_history(run_id, "student-ekd/loss")) == 2
    assert r.data.metrics["val/student_ensemble_acc"] == pytest.approx(run.metrics()["student"]["ensemble_acc"])
    export(run.path, tmp_path / "export", teachers=False)
    assert {a.path for a in client.list_artifacts(run_id, "export")} >= {"export/student.onnx", "export/manifest.json"}
    assert (tmp_path / "store" / "artifacts").is_dir() and not any(cwd.iterdir())


def test_a_tracking_server_that_is_down_leaves_the_run_intact(tmp_path, monkeypatch, capsys):
    from rich.console import Console

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    run = distill(_recipe(mlflow=True, tensorboard=True), tmp_path / "run", progress=False, console=Console())
    assert run.finished
    epochs = [json.loads(line) for line in run.log_path.read_text().splitlines() if '"stage"' in line]
    assert [r["epoch"] for r in epochs] == [1, 2, 1, 2]  # every epoch of both stages trained and logged
    out = capsys.readouterr().out
    assert "mlflow tracking could not start" in out and "training goes on untracked" in out
    assert (run.path / "tb").is_dir()  # the other tracker kept working


def test_a_tracker_without_its_library_is_one_line_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(UserError, match=r"tracking.mlflow: true needs the mlflow library.*pip install 'ekdc\[track\]'"):
        distill(_recipe(mlflow=True), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
