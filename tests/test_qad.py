"""Quantization-aware distillation (``ekdc export --int8 --qad``): a ModelOpt QDQ file that runs in ONNX
Runtime under the contract, whose manifest figures are its own, and that is never PTQ in disguise."""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest

from ekdc import UserError, export
from ekdc.contract import META_QUANTIZATION, ort_session, top1
from ekdc.data import index_splits
from ekdc.deploy.onnx import run_session
from ekdc.deploy.qad import QADSettings
from ekdc.onnx_graph import inspect_model
from ekdc.run import RunDir

from conftest import run_cli

pytest.importorskip("modelopt.torch.quantization", reason="QAD's tests need nvidia-modelopt (pip install 'ekdc[qad]')")


def _zero_point_types(path) -> set[int]:
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    consts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Constant"}
    types = set()
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2:
            zp = n.input[2]
            if zp in inits:
                types.add(inits[zp].data_type)
            elif zp in consts:
                types.add(consts[zp].attribute[0].t.data_type)
    return types


@pytest.fixture(scope="module")
def qad_export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("qad")
    manifest = export(tiny_run, out, int8=True, qad=QADSettings(epochs=1), calib_images=32, fold_mode="grouped",
                      teachers=False)
    return out, manifest


def test_qad_file_runs_passes_the_contract_and_reports_its_own_accuracy(tiny_run, qad_export):
    out, manifest = qad_export
    entry = next(f for f in manifest["files"] if f["file"] == "student.int8.onnx")
    q = entry["quantization"]
    assert (q["method"], q["tool"], q["epochs"], q["kd_loss"], q["calibration_images"]) == \
        ("qad", "nvidia-modelopt", 1, "kl", 32)
    assert len(q["loss_per_epoch"]) == 1 and q["teachers"] == 2
    info = inspect_model(out / "student.int8.onnx")  # the contract: images/logits, metadata, dynamic batch
    assert info.precision == "int8" and info.classes == manifest["classes"] and info.fixed_batch is None
    assert json.loads(info.metadata[META_QUANTIZATION])["method"] == "qad"
    x, y = index_splits(RunDir(tiny_run).recipe().data).take("val")
    logits = run_session(ort_session(out / "student.int8.onnx"), x)
    assert entry["accuracy"] == pytest.approx(top1(logits, y.numpy()))  # the file's own figure
    fp32 = run_session(ort_session(out / "student.onnx"), x)
    assert entry["parity"]["argmax_agreement"] == pytest.approx(float((fp32.argmax(1) == logits.argmax(1)).mean()))


def _int8_weights(path) -> list[np.ndarray]:
    from onnx import numpy_helper

    return [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]


def _optimized_ops(path, tmp_path) -> set[str]:
    """The op types ONNX Runtime's CPU provider runs after its graph optimisations (its saved optimized graph)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return {n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node}


def test_qad_is_never_ptq_in_disguise(tiny_run, qad_export, tmp_path):
    out, manifest = qad_export
    ptq = export(tiny_run, tmp_path / "ptq", int8=True, calib_images=32, fold_mode="grouped", teachers=False)
    assert next(f for f in ptq["files"] if f["file"] == "student.int8.onnx")["quantization"]["method"] == "ptq"
    # both files in ONNX Runtime's form, but QAD's weights are its fine-tuned ones, not the fp32 student's
    qad_w, ptq_w = _int8_weights(out / "student.int8.onnx"), _int8_weights(tmp_path / "ptq" / "student.int8.onnx")
    assert len(qad_w) == len(ptq_w) > 0 and any((a != b).any() for a, b in zip(qad_w, ptq_w))
    # ModelOpt's own file (for TensorRT) quantises activations symmetrically to int8; ONNX Runtime's to uint8
    assert _zero_point_types(out / "student.int8.tensorrt.onnx") == {onnx.TensorProto.INT8}
    assert onnx.TensorProto.UINT8 in _zero_point_types(out / "student.int8.onnx")
    forms = {f["file"]: f["quantization"]["form"].split(":")[0] for f in manifest["files"] if "quantization" in f}
    assert forms == {"student.int8.onnx": "onnxruntime-qdq", "student.int8.tensorrt.onnx": "tensorrt-qdq"}


def test_the_qad_file_runs_as_int8_on_onnx_runtime(qad_export, tmp_path):
    """ONNX Runtime fuses the QAD file's convolutions into QLinearConv (int8 kernels), not float Conv between
    Q/DQ pairs as it runs ModelOpt's file."""
    out, _ = qad_export
    ops = _optimized_ops(out / "student.int8.onnx", tmp_path)
    assert "QLinearConv" in ops and "Conv" not in ops and "FusedConv" not in ops
    assert "QLinearConv" not in _optimized_ops(out / "student.int8.tensorrt.onnx", tmp_path)


def test_qad_labels_only_and_refusals(tiny_run, tmp_path, monkeypatch):
    m = export(tiny_run, tmp_path / "labels", int8=True, qad=QADSettings(epochs=1, teachers=False), calib_images=16,
               fold_mode="grouped", teachers=False)
    q = next(f for f in m["files"] if f["file"] == "student.int8.onnx")["quantization"]
    assert q["method"] == "qat_labels" and q["kd_loss"] is None and q["teachers"] == 0
    res = run_cli("export", tiny_run, "--out", tmp_path / "x", "--qad")
    assert res.returncode == 2 and res.stderr.strip().endswith("--qad makes the int8 file: add --int8")
    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)  # as if ModelOpt were not installed
    with pytest.raises(UserError, match=r"pip install 'ekdc\[qad\]'"):
        export(tiny_run, tmp_path / "y", int8=True, qad=QADSettings(epochs=1))
    assert not (tmp_path / "y" / "student.onnx").exists()  # refused before anything was written
    assert np.isfinite(q["lr"])


def test_qad_trains_with_the_runs_objective_dkd_included(tmp_path):
    """A ``loss: dkd`` run's QAD is DKD against the teachers' mean (the folded graph's one output), trained
    by the one training loop: its epochs are in the run's log."""
    from ekdc import distill
    from ekdc.recipe import recipe_from_dict
    from ekdc.training.qad_stage import folded_objective

    from conftest import tiny_recipe

    raw = tiny_recipe(mode="ekd")
    raw["distill"] = {**raw["distill"], "kd": {"loss": "dkd", "alpha": 1.0, "beta": 4.0}, "weights": {"feat": 1.0}}
    recipe = recipe_from_dict(raw)
    obj = folded_objective(recipe, epochs=1, teachers=True)
    kd = next(s for t, _, s in obj.active if t.name == "kd")
    assert obj.mode == "avg_kd" and (kd.loss, kd.beta) == ("dkd", 4.0) and "feat" not in obj.weights
    run = distill(recipe, tmp_path / "run", progress=False)
    m = export(run.path, tmp_path / "out", int8=True, qad=QADSettings(epochs=1), calib_images=16,
               fold_mode="grouped", teachers=False)
    q = next(f for f in m["files"] if f["file"] == "student.int8.onnx")["quantization"]
    assert q["kd_loss"] == "dkd" and q["objective"]["mode"] == "avg_kd"
    log = [json.loads(line) for line in run.log_path.read_text().splitlines()]
    qad = [r for r in log if str(r.get("stage", "")).startswith("qad-")]
    assert [r["epoch"] for r in qad] == [1] and qad[0]["loss_kd"] > 0
    assert not list(run.ckpt_dir.glob("qad-*.pt"))  # a finished QAD leaves no stage checkpoint


@pytest.mark.slow
def test_qad_resumes_after_kill_9(tiny_run, tmp_path):
    import shutil
    import subprocess
    import time

    run = tmp_path / "run"  # a copy: the QAD stage writes into the run folder it exports
    shutil.copytree(tiny_run, run)
    ckpts = RunDir(run).ckpt_dir
    cmd = [sys.executable, "-m", "ekdc", "export", str(run), "--out", str(tmp_path / "out"), "--int8", "--qad",
           "--qad-epochs", "3", "--no-teachers", "--calib", "16", "--fold", "grouped"]  # one layout: the same stage
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not list(ckpts.glob("qad-*.pt")) and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no clean-up at all
    proc.wait()
    assert list(ckpts.glob("qad-*.pt")), "QAD wrote no stage checkpoint before the kill"
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert "resumed qad-" in res.stdout
    assert not list(ckpts.glob("qad-*.pt")) and (tmp_path / "out" / "student.int8.onnx").is_file()


def test_bench_notes_a_tensorrt_form_int8_file_timed_on_onnx_runtime():
    """QAD's student.int8.tensorrt.onnx runs its convolutions in float on ONNX Runtime: bench says so where it
    times it there, and says nothing on TensorRT or for ONNX Runtime's own int8 form."""
    import json
    from types import SimpleNamespace

    from ekdc.benchmark.runner import tensorrt_form_notes
    from ekdc.contract import META_QUANTIZATION

    def entry(name, form):
        meta = {META_QUANTIZATION: json.dumps({"method": "qad", "form": form})} if form else {}
        return SimpleNamespace(name=name, info=SimpleNamespace(metadata=meta))

    entries = [entry("student.int8.tensorrt.onnx", "tensorrt-qdq: ..."), entry("student.int8.onnx", "onnxruntime-qdq: ..."),
               entry("student.onnx", None)]
    notes = tensorrt_form_notes(entries, "cpu")
    assert len(notes) == 1 and notes[0].startswith("note: student.int8.tensorrt.onnx is int8 in TensorRT's Q/DQ form")
    assert tensorrt_form_notes(entries, "tensorrt") == []
