"""Plugins: a package installed beside ekdc adds a student family, a loss term, a data set and a teacher
architecture through entry points, and ``ekdc distill`` / ``ekdc export`` use them with no edit to ekdc.

The package is installed the way pip lays one out (a module and its ``.dist-info`` with
``entry_points.txt`` on the path), into a folder the test's ekdc processes see through PYTHONPATH."""
import json
import textwrap

import pytest
import yaml

from conftest import run_cli, tiny_recipe
from conftest import write_recipe as write_recipe_

PLUGIN = '''
import torch
import torch.nn as nn
import torch.nn.functional as F

from ekdc.data import register_dataset
from ekdc.data.registry import Sources
from ekdc.data.sources import TensorSource
from ekdc.losses import register_term
from ekdc.models import register_model, register_student
from ekdc.models.layers import FeatureClassifier
from ekdc.models.student import BranchOutputs


@register_dataset("tiny_stripes")
def tiny_stripes(cfg):
    """Red against blue noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(0)
    n, s = cfg.num_samples, cfg.image_size
    labels = torch.arange(n) % 2
    x = 0.5 * torch.rand(n, 3, s, s, generator=g)
    x[:, 0] += 0.5 * (labels == 0).float().view(-1, 1, 1)
    x[:, 2] += 0.5 * (labels == 1).float().view(-1, 1, 1)
    return Sources(TensorSource((x * 255).round().to(torch.uint8), labels.numpy(), ["red", "blue"]))


@register_term("logit_l2", matches="the branch logits' mean square (a toy regulariser)", needs=())
def logit_l2(x, _settings=None):
    return x.out.logits.float().pow(2).mean()


class TinyTeacher(FeatureClassifier):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.num_features = 8
        self.fc = nn.Linear(8, num_classes)

    def forward_features(self, x):
        return F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1)


@register_model
def tiny_teacher(num_classes=10):
    return TinyTeacher(num_classes)


class _Folded(nn.Module):
    def __init__(self, s):
        super().__init__()
        n = s.num_branches
        self.conv = nn.Conv2d(3, 8 * n, 3, padding=1)
        self.fc = nn.Linear(8 * n, s.num_classes)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat([b.weight for b in s.branches]))
            self.conv.bias.copy_(torch.cat([b.bias for b in s.branches]))
            self.fc.weight.copy_(torch.cat([h.weight for h in s.heads], 1) / n)
            self.fc.bias.copy_(torch.stack([h.bias for h in s.heads]).mean(0))

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


class TinyStudent(nn.Module):
    fold_layouts = ("grouped",)

    def __init__(self, num_classes, num_branches=1):
        super().__init__()
        self.config = {"num_branches": num_branches}
        self.num_branches, self.num_classes, self.num_features = num_branches, num_classes, 8
        self.branches = nn.ModuleList(nn.Conv2d(3, 8, 3, padding=1) for _ in range(num_branches))
        self.heads = nn.ModuleList(nn.Linear(8, num_classes) for _ in range(num_branches))
        self.adapters = None

    def set_adapters(self, dims):
        self.adapters = nn.ModuleList(nn.Linear(8, d) for d in dims)

    def forward(self, x, return_branches=False):
        feats = [F.adaptive_avg_pool2d(F.relu(b(x)), 1).flatten(1) for b in self.branches]
        logits = torch.stack([h(f) for h, f in zip(self.heads, feats)])
        if not return_branches:
            return logits.mean(0)
        return BranchOutputs(logits, torch.stack(feats), None)

    def fold(self, layout):
        return _Folded(self)


@register_student
def tiny_student(num_classes=10, **kw):
    return TinyStudent(num_classes, **kw)
'''


def _install(site):
    """The package 'ekdc-tinyplug' as pip would install it into ``site``."""
    site.mkdir()
    (site / "tinyplug.py").write_text(PLUGIN)
    info = site / "ekdc_tinyplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ekdc-tinyplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [ekdc.datasets]
        stripes = tinyplug
        [ekdc.models]
        tiny = tinyplug
        [ekdc.students]
        tiny = tinyplug
        [ekdc.terms]
        logit_l2 = tinyplug
        """))


@pytest.mark.slow
def test_an_installed_plugin_extends_distill_and_export(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _install(site)
    raw = tiny_recipe(mode="avg_kd")
    raw["data"] = {"dataset": "tiny_stripes", "num_samples": 96, "image_size": 8, "val_fraction": 0.25}
    raw["teachers"] = [{"arch": "tiny_teacher", "train": {"epochs": 2, "batch_size": 16, "lr": 0.1}}]
    raw["student"] = {"arch": "tiny_student", "num_branches": 2}
    raw["distill"] = {**raw["distill"], "epochs": 4, "batch_size": 16, "lr": 0.2, "weights": {"logit_l2": 0.01}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))

    # without the package: one line naming what is unknown
    res = run_cli("distill", recipe, "--out", tmp_path / "nope", fresh=True)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "unknown" in res.stderr

    monkeypatch.setenv("PYTHONPATH", str(site))
    res = run_cli("distill", recipe, "--out", tmp_path / "run", "-q", fresh=True)
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["student"]["arch"] == "tiny_student" and m["student"]["ensemble_acc"] > 0.9
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["loss_logit_l2"] > 0 for r in log if r.get("stage") == "student-avg_kd"] == [True] * 4
    used = json.loads((tmp_path / "run" / "plugins.json").read_text())["plugins"]
    assert used[0]["distribution"] == "ekdc-tinyplug" and used[0]["uses"] == {
        "datasets": ["tiny_stripes"], "models": ["tiny_teacher"], "students": ["tiny_student"], "terms": ["logit_l2"]}
    res = run_cli("export", tmp_path / "run", "--out", tmp_path / "export", fresh=True)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert manifest["files"][0]["parity"]["max_rel_diff"] < 1e-4

    # `ekdc models` lists and finds the plugin's architecture
    res = run_cli("models", "--filter", "tiny_", fresh=True)
    assert res.returncode == 0 and "tiny_teacher" in res.stdout, res.stdout + res.stderr

    # the package gone: export and distill --resume say which plugin the run needs, in one line
    monkeypatch.delenv("PYTHONPATH")
    for res in (run_cli("export", tmp_path / "run", "--out", tmp_path / "export2", fresh=True),
                run_cli("distill", recipe, "--out", tmp_path / "run", "--resume", fresh=True)):
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert "this run used plugin ekdc-tinyplug 0.1" in lines[0] and "install it" in lines[0]


BROKEN_STUDENTS = """

class WrongShape(TinyStudent):  # one logit where there are two classes
    def forward(self, x, return_branches=False):
        out = super().forward(x, return_branches)
        return out[..., :1] if not return_branches else BranchOutputs(out.logits[..., :1], out.features, None)


class WrongFold(TinyStudent):  # trains fine; its deploy-time form computes something else
    def fold(self, layout):
        return nn.Sequential(_Folded(self), nn.Tanh())


@register_student
def tiny_wrongshape(num_classes=10, **kw):
    return WrongShape(num_classes, **kw)


@register_student
def tiny_wrongfold(num_classes=10, **kw):
    return WrongFold(num_classes, **kw)
"""


@pytest.mark.slow
def test_a_plugin_student_that_breaks_the_protocol_is_named_with_its_package(tmp_path, monkeypatch):
    """A plugin student whose outputs have the wrong shape is refused before any teacher trains; one whose
    fold() computes something else is refused at export, naming the package (not 'a bug in ekdc'), with
    nothing written. Both one line, exit 2."""
    site = tmp_path / "site"
    _install(site)
    (site / "tinyplug.py").write_text(PLUGIN + BROKEN_STUDENTS)
    monkeypatch.setenv("PYTHONPATH", str(site))
    raw = tiny_recipe(mode="avg_kd")
    raw["data"] = {"dataset": "tiny_stripes", "num_samples": 48, "image_size": 8, "val_fraction": 0.25}
    raw["teachers"] = [{"arch": "tiny_teacher", "train": {"epochs": 1, "batch_size": 16, "lr": 0.1}}]
    raw["distill"] = {**raw["distill"], "epochs": 1, "batch_size": 16}
    for arch in ("tiny_wrongshape", "tiny_wrongfold"):
        raw["student"] = {"arch": arch, "num_branches": 2}
        (tmp_path / f"{arch}.yaml").write_text(yaml.safe_dump(raw))
    res = run_cli("distill", tmp_path / "tiny_wrongshape.yaml", "--out", tmp_path / "ws", fresh=True)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert ("student 'tiny_wrongshape' (plugin ekdc-tinyplug) returns model(x) of shape [2, 1] for 2 images; "
            "expected [2, 2]") in lines[0]
    assert not (tmp_path / "ws").exists()  # refused before anything trained: no run folder left
    res = run_cli("distill", tmp_path / "tiny_wrongfold.yaml", "--out", tmp_path / "wf", "-q", fresh=True)
    assert res.returncode == 0, res.stderr
    res = run_cli("export", tmp_path / "wf", "--out", tmp_path / "export", fresh=True)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "student 'tiny_wrongfold' (plugin ekdc-tinyplug): the folded student (grouped) does not match" in lines[0]
    assert "bug in ekdc" not in lines[0]
    assert not list((tmp_path / "export").glob("*.onnx"))  # nothing written (a folder not made globs empty)


def test_a_plugin_that_fails_to_import_is_named_where_its_names_are_missing(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _install(site)
    (site / "tinyplug.py").write_text("raise ImportError('needs libfoo')\n")
    raw = tiny_recipe()
    raw["student"] = {"arch": "tiny_student"}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("PYTHONPATH", str(site))
    res = run_cli("distill", recipe, fresh=True)
    line = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(line) == 1
    assert "unknown student 'tiny_student'" in line[0] and "ekdc-tinyplug" in line[0] and "needs libfoo" in line[0]
    res = run_cli("models", fresh=True)  # where a plugin's author looks for its names: it says why they are missing
    assert res.returncode == 0 and "student families (student.arch: NAME):\n  ekd_student" in res.stdout, res.stdout
    assert ("warning: plugin ekdc-tinyplug failed to load, so none of its names are listed: ImportError: needs libfoo"
            in res.stderr)


@pytest.mark.parametrize("body", ["import argparse\nargparse.ArgumentParser().parse_args()\n",
                                  "import sys\nsys.exit('bye')\n", "raise SystemExit(3)\n"])
def test_a_plugin_that_exits_at_import_does_not_end_ekdc(tmp_path, monkeypatch, body):
    """A module that parses sys.argv or exits when imported is a plugin that failed to load, like any other:
    a recipe that does not use it runs; one that does is refused naming it."""
    site = tmp_path / "site"
    _install(site)
    (site / "tinyplug.py").write_text(body)
    monkeypatch.setenv("PYTHONPATH", str(site))
    if "argparse" in body:  # a recipe that does not use it trains (once: the loading is the same for all three)
        res = run_cli("distill", write_recipe_(tmp_path / "r.yaml"), "--out", tmp_path / "run", "-q", fresh=True)
        assert res.returncode == 0, res.stdout + res.stderr
    raw = tiny_recipe()
    raw["student"] = {"arch": "tiny_student"}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(raw))
    res = run_cli("distill", tmp_path / "s.yaml", "--out", tmp_path / "run2", fresh=True)
    line = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(line) == 1 and "ekdc-tinyplug" in line[0] and "SystemExit" in line[0], res.stderr


def test_a_plugin_that_loads_keeps_its_output_and_its_logging(tmp_path):
    """What a working plugin prints while loading is said, and a logging handler it binds to stderr then
    still writes there (only a failing plugin's output is held, for its error line)."""
    import os
    import subprocess
    import sys

    site = tmp_path / "site"
    _install(site)
    (site / "tinyplug.py").write_text("import logging, sys\nprint('hello from the plugin', file=sys.stderr)\n"
                                      "logging.getLogger('tinyplug').addHandler(logging.StreamHandler())\n")
    probe = ("from ekdc.plugins import load_plugins\nload_plugins()\nimport logging\n"
             "logging.getLogger('tinyplug').warning('said after loading')\n")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert res.returncode == 0, res.stderr
    assert "hello from the plugin" in res.stderr and "said after loading" in res.stderr, res.stderr
