"""End-to-end `ekdc distill` through the CLI, and its user-facing failures."""
import json

import pytest
import torch

from tests.conftest import run_cli, tiny_recipe, write_recipe


# long enough to learn the synthetic classes (their templates are far apart): 6 epochs reach 100% here
LEARNS = dict(
    data={"num_samples": 320, "augment": True}, precision="auto",
    teachers=[{"arch": "resnet8", "train": {"epochs": 8, "batch_size": 32, "lr": 0.05}},
              {"arch": "wrn_16_2", "train": {"epochs": 8, "batch_size": 32, "lr": 0.05}}],
    distill={"epochs": 8, "batch_size": 32, "lr": 0.05},
)


def test_distill_end_to_end(tmp_path):
    recipe = write_recipe(tmp_path / "tiny.yaml", **LEARNS)
    res = run_cli("distill", recipe, "--runs", tmp_path / "runs", "--set", "distill.weights.feat=0.5", "-q")
    assert res.returncode == 0, res.stderr
    run = tmp_path / "runs" / "tiny"
    assert "validation metrics" in res.stdout and "teacher ensemble" in res.stdout
    for f in ("recipe.yaml", "student.pt", "log.jsonl", "metrics.json", "teachers/resnet8.pt", "teachers/wrn_16_2.pt"):
        assert (run / f).is_file(), f
    assert not (run / "ckpt").exists()  # in-progress checkpoints are gone once every stage finished
    m = json.loads((run / "metrics.json").read_text())
    s = m["student"]
    # what the run must achieve: chance is 25%; the student learns the classes, as its teachers do
    assert s["ensemble_acc"] >= 0.9 and m["teacher_ensemble_acc"] >= 0.9, m
    assert len(s["branch_acc"]) == 2 and s["params"] > 0 and s["macs"] > 0
    assert [t["name"] for t in m["teachers"]] == ["resnet8", "wrn_16_2"]
    assert all(set(t) >= {"name", "arch", "acc", "params", "macs"} for t in m["teachers"])
    assert m["mode"] == "ekd" and m["seconds"] > 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    student_epochs = [r for r in log if r.get("stage") == "student-ekd"]
    assert len(student_epochs) == 8 and "loss_feat" in student_epochs[0] and "loss_kd" in student_epochs[0]
    ck = torch.load(run / "student.pt", weights_only=True)
    assert not any(k.startswith("adapters.") for k in ck["state_dict"])  # training-only parts dropped
    # a second run never overwrites the first
    res2 = run_cli("distill", recipe, "--runs", tmp_path / "runs", "-q", "--set", "mode=ce")
    assert res2.returncode == 0, res2.stderr
    assert json.loads((tmp_path / "runs" / "tiny-2" / "metrics.json").read_text())["mode"] == "ce"


def test_teacher_checkpoint_reuse_and_checks(tmp_path, tiny_run):
    ckpt = tiny_run / "teachers" / "resnet8.pt"
    raw = tiny_recipe()
    raw["teachers"][0]["checkpoint"] = str(ckpt)
    raw["teachers"][1]["checkpoint"] = str(tiny_run / "teachers" / "wrn_16_2.pt")
    import yaml

    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(raw))
    res = run_cli("distill", p, "--out", tmp_path / "reuse", "-q", "--set", "distill.epochs=1")
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "reuse" / "teachers" / "resnet8.pt").exists()  # loaded, not trained
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    cases = [
        (["teachers.0.arch=resnet20"], "holds a 'resnet8', not the 'resnet20'"),  # wrong architecture
        (["data.num_classes=5"], "trained for 4 classes, but the data has 5"),  # class count differs from the data's
        ([f"teachers.0.checkpoint={bad}"], "corrupt"),
        ([f"teachers.0.checkpoint={tmp_path}/missing.pt"], "not found"),
    ]
    for i, (sets, words) in enumerate(cases):
        res = run_cli("distill", p, "--out", tmp_path / f"x{i}", *[a for s in sets for a in ("--set", s)])
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1 and words in lines[0], (sets, res.stderr)


@pytest.mark.parametrize("args, words", [
    (["distill", "nope.yaml"], "recipe not found: nope.yaml"),
    (["distill", "{recipe}", "--set", "distill.epochs=-1"], "distill.epochs"),
    (["distill", "{recipe}", "--set", "distill.temperature=0"], "distill.temperature: must be > 0"),
    (["distill", "{recipe}", "--set", "distill.temperature=inf"], "distill.temperature: must be a finite number"),
    (["distill", "{recipe}", "--set", "student.num_branches=3"], "num_branches is 3"),
    (["distill", "{recipe}", "--set", "distill.temprature=2"], "did you mean 'temperature'"),
    (["distill", "{recipe}", "--set", "data.dataset=imagefolder", "--set", "data.root=/nonexistent"],
     "folder not found: /nonexistent"),
    pytest.param(["distill", "{recipe}", "--set", "device=cuda"], "no CUDA GPU",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")),
    (["distill", "{recipe}", "--set", "mode=ce", "--set", "distill.weights.ce=0", "--set", "distill.weights.ens=0"],
     "every term mode 'ce' trains on is 0"),
    (["distill", "{recipe}", "--out", "/proc/ekdc-not-writable"], "not writable"),
    (["distill", "{recipe}", "--resume", "--out", "{tmp}/never-ran"], "no run to resume"),
])
def test_bad_input_one_line_exit_2(tmp_path, args, words):
    recipe = write_recipe(tmp_path / "r.yaml")
    args = [a.format(recipe=recipe, tmp=tmp_path) for a in args]
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert words in lines[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_trains(tmp_path):
    res = run_cli("distill", write_recipe(tmp_path / "r.yaml"), "--set", "device=cuda", "--out", tmp_path / "run", "-q")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["device"].startswith("cuda")


def test_existing_out_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    res = run_cli("distill", write_recipe(tmp_path / "r.yaml"), "--out", out)
    assert res.returncode == 2 and "already holds files" in res.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_no_file_that_is_not_a_torch_save_escapes_as_a_traceback(tmp_path):
    """torch.load reads a file's first bytes as pickle opcodes, so a text or damaged file fails with whatever
    exception those bytes trigger (KeyError, IndexError, struct.error, ...): every first byte is tried."""
    from ekdc._io import load_checkpoint
    from ekdc.errors import UserError
    from ekdc.teachers.weights import read_weights

    bad = tmp_path / "bad.pt"
    for first in range(256):
        bad.write_bytes(bytes([first]) + b"rror: not a weight file\n")
        for read in (lambda: load_checkpoint(bad, "teachers.0.checkpoint"),
                     lambda: read_weights(bad, "teachers.0.weights")):
            with pytest.raises(UserError, match="corrupt|not an ekdc checkpoint|holds a"):
                read()


def test_version_names_ekdc_and_its_runtime():
    import onnxruntime

    res = run_cli("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("ekdc 0.1.0 (torch ") and f"onnxruntime {onnxruntime.__version__}" in res.stdout
