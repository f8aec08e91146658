"""distill.teacher_runtime: frozen PyTorch teachers on the CPU run in ONNX Runtime, checked against PyTorch."""
from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import torch.nn as nn

from ekdc.distillation.distiller import Distiller
from ekdc.losses import Objective
from ekdc.models import create_model
from ekdc.recipe import TeacherConfig, recipe_from_dict
from ekdc.teachers import DataInfo, Preprocess, Teacher, trainable_teacher
from ekdc.teachers.ort_runner import CHECKS, SPOT_CHECK_EVERY, OrtTeacher, runs_in_ort
from tests.conftest import run_cli, tiny_recipe

INFO = DataInfo(["a", "b", "c", "d"], 16, [0.5, 0.5, 0.5], [0.25, 0.25, 0.25])


def _teacher(tta: str = "none", class_index=None) -> Teacher:
    torch.manual_seed(0)
    t = trainable_teacher(TeacherConfig(arch="resnet8"), 0, INFO)
    return Teacher(t.model, t.pre, name="resnet8", arch="resnet8", source="ekdc", head=t.head, tta=tta,
                   class_index=class_index)


def _plain(net: nn.Module, name: str, source: str = "ekdc") -> Teacher:
    """``net`` as a teacher of [0,1] images at 16 px, without normalisation."""
    return Teacher(net, Preprocess(16, [0, 0, 0], [1, 1, 1]), name=name, arch=name, source=source)


def _eager(teacher: Teacher, pixels: torch.Tensor, features: bool):
    with torch.inference_mode():
        return teacher.forward_with_features(pixels) if features else (teacher(pixels), None)


@pytest.mark.parametrize("features,tta,class_index", [(False, "none", None), (True, "flip", None),
                                                      (False, "none", [3, 2, 1, 0])])
def test_onnx_runtime_gives_what_pytorch_gives_after_its_checks(features, tta, class_index):
    teacher = _teacher(tta, class_index)
    runner = OrtTeacher(teacher, features, threads=1)
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(n, 3, 16, 16, generator=g) for n in (7, 5, 3, 9)]  # the export saw 2 images
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback: a warning here fails the test
        outs = [runner(b) for b in batches]
    assert runner.fallback_reason is None and runner.calls == 4 and runner._session is not None
    for b, (logits, feats) in zip(batches, outs):
        want_logits, want_feats = _eager(teacher, b, features)
        assert logits.shape == (len(b), 4) and not logits.is_inference()  # ONNX Runtime's, checked batches too
        assert torch.allclose(logits, want_logits, atol=1e-4, rtol=1e-4)
        assert (feats is None) == (not features)
        if features:
            assert feats.shape == want_feats.shape and torch.allclose(feats, want_feats, atol=1e-4, rtol=1e-4)
    # after its checks the runner no longer calls PyTorch: a teacher changed now shows the graph is ONNX's
    with torch.no_grad():
        teacher.model.fc.bias.add_(100.0)
    assert not torch.allclose(runner(batches[0])[0], _eager(teacher, batches[0], features)[0], atol=1.0)


class _InputDependent(nn.Module):
    """A net whose Python branch depends on the values of its input: a trace freezes the branch it saw."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        pooled = x.mean((2, 3))
        return self.fc(pooled) if float(pooled.mean()) > 0.5 else -self.fc(pooled)


def test_a_teacher_whose_graph_differs_runs_in_pytorch_with_a_warning():
    teacher = _plain(_InputDependent(), "odd")
    runner = OrtTeacher(teacher, False, threads=1)
    bright, dark = torch.full((4, 3, 16, 16), 0.9), torch.full((4, 3, 16, 16), 0.1)
    assert torch.allclose(runner(bright)[0], _eager(teacher, bright, False)[0], atol=1e-5)  # traced on this branch
    with pytest.warns(UserWarning, match=r"teacher odd runs in PyTorch, not ONNX Runtime: its ONNX logits differ"):
        logits, _ = runner(dark)  # the second check finds the frozen branch
    assert torch.allclose(logits, _eager(teacher, dark, False)[0]) and runner.fallback_reason
    assert torch.allclose(runner(bright)[0], _eager(teacher, bright, False)[0])  # PyTorch from now on


def test_a_spot_check_later_on_catches_a_teacher_that_drifts_from_its_graph():
    teacher = _teacher()
    runner = OrtTeacher(teacher, False, threads=1)
    x = torch.rand(2, 3, 16, 16)
    for _ in range(CHECKS):
        runner(x)
    with torch.no_grad():
        teacher.model.fc.bias.add_(100.0)  # as a graph that froze some branch would, PyTorch now says otherwise
    for _ in range(SPOT_CHECK_EVERY - CHECKS):  # unchecked: ONNX Runtime's answer
        assert not torch.allclose(runner(x)[0], _eager(teacher, x, False)[0], atol=1.0)
    assert runner.fallback_reason is None
    with pytest.warns(UserWarning, match="its ONNX logits differ from PyTorch's"):
        logits, _ = runner(x)  # call 100: checked
    assert torch.allclose(logits, _eager(teacher, x, False)[0])


class _BatchBaked(nn.Module):
    """A net whose trace bakes in the batch size of the export (two images)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))[torch.arange(int(x.shape[0]))]


def test_a_graph_that_froze_the_batch_size_falls_back_and_a_failing_run_too():
    teacher = _plain(_BatchBaked(), "baked")
    runner = OrtTeacher(teacher, False, threads=1)
    x = torch.rand(7, 3, 16, 16)
    with pytest.warns(UserWarning, match=r"teacher baked runs in PyTorch, not ONNX Runtime: (its ONNX logits are "
                                         r"\[2, 4\] where PyTorch's are \[7, 4\]|ONNX Runtime cannot run it)"):
        logits, _ = runner(x)
    assert logits.shape == (7, 4)
    # ONNX Runtime failing on a later batch (memory, a shape): that batch and the rest run in PyTorch
    runner = OrtTeacher(_teacher(), False, threads=1)
    for _ in range(CHECKS):
        runner(x)

    def broken(*_a, **_k):
        raise RuntimeError("bad allocation")

    runner._session.run = broken
    with pytest.warns(UserWarning, match=r"ONNX Runtime cannot run it on \[7, 3, 16, 16\] \(bad allocation\)"):
        logits, _ = runner(x)
    assert torch.allclose(logits, _eager(runner.teacher, x, False)[0]) and runner.fallback_reason


class _NoExport(nn.Module):
    def forward(self, x):
        return torch.from_numpy(x.mean((2, 3)).numpy().repeat(2, axis=1)[:, :4].copy())


def test_a_teacher_that_does_not_export_runs_in_pytorch_with_a_warning(monkeypatch):
    import ekdc.teachers.ort_runner as ort_runner

    def refuse(*_a, **_k):
        raise RuntimeError("Unsupported: an op ONNX lacks\nmore lines")

    monkeypatch.setattr(ort_runner.torch.onnx, "export", refuse)
    teacher = _plain(_NoExport(), "np")
    runner = OrtTeacher(teacher, False, threads=1)
    x = torch.rand(3, 3, 16, 16)
    with pytest.warns(UserWarning, match=r"teacher np runs in PyTorch, not ONNX Runtime: it does not export to ONNX "
                                         r"\(Unsupported: an op ONNX lacks\)"):
        logits, _ = runner(x)
    assert logits.shape == (3, 4) and runner.fallback_reason and runner._session is None
    said: list[str] = []  # in a run, the line goes to the run's console, once, not to Python's warnings
    runner = OrtTeacher(teacher, False, threads=1, say=said.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner(x), runner(x)
    assert said == ["[yellow]warning:[/yellow] teacher np runs in PyTorch, not ONNX Runtime: it does not export to "
                    "ONNX (Unsupported: an op ONNX lacks)"]


def test_which_teachers_onnx_runtime_runs():
    teacher, x = _teacher(), torch.rand(2, 3, 16, 16)
    assert runs_in_ort(teacher, x)
    assert not runs_in_ort(teacher, x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 autocast: PyTorch's kernels are the fast path
        assert not runs_in_ort(teacher, x)
    onnx_teacher = _plain(nn.Identity(), "f", source="onnx")
    assert not runs_in_ort(onnx_teacher, x)  # already ONNX Runtime's


@pytest.mark.parametrize("runtime", ["auto", "torch"])
def test_the_distiller_runs_teachers_where_the_recipe_says(runtime):
    recipe = recipe_from_dict(tiny_recipe(distill={"teacher_runtime": runtime}))
    assert recipe.distill.teacher_runtime == runtime
    teachers = [_teacher(), _teacher("flip")]
    student = create_model("ekd_student", num_classes=4, num_branches=2)
    distiller = Distiller(student, teachers, Objective.from_recipe(recipe), teacher_runtime=runtime)
    x = torch.rand(6, 3, 16, 16)
    for _ in range(CHECKS + 1):
        logits, _ = distiller.teacher_targets(x)
    assert len(distiller._ort) == (2 if runtime == "auto" else 0)
    assert all(r.fallback_reason is None and r._session is not None for r in distiller._ort.values())
    want = torch.stack([_eager(t, x, False)[0] for t in teachers])
    assert logits.shape == (2, 6, 4) and torch.allclose(logits, want, atol=1e-4, rtol=1e-4)


def test_teacher_runtime_is_a_recipe_choice_of_two():
    with pytest.raises(Exception, match="teacher_runtime"):
        recipe_from_dict(tiny_recipe(distill={"teacher_runtime": "tensorrt"}))


def test_a_started_run_may_resume_with_the_other_teacher_runtime(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    res = run_cli("distill", tiny_run.parent / "tiny.yaml", "--out", run, "--resume", "-q",
                  "--set", "distill.teacher_runtime=torch")  # the way out of a runtime that misbehaves
    assert res.returncode == 0, res.stderr
    res = run_cli("distill", tiny_run.parent / "tiny.yaml", "--out", run, "--resume", "-q",
                  "--set", "distill.temperature=2")  # a change of result is still refused
    assert res.returncode == 2 and "the recipe differs" in res.stderr and "distill.temperature" in res.stderr
