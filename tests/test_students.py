"""Student families behind one protocol: ``student.arch`` picks a registered family; distill, evaluation,
fold, export and bench treat every family alike."""
import json

import pytest
import torch

import yaml

from conftest import run_cli, tiny_recipe
from ekdc.deploy.fold import fold
from ekdc.models import create_model, list_students
from ekdc.recipe.loading import recipe_from_dict as load_recipe


def _random_bn(model):
    """Random BatchNorm statistics and shifts, so that a fold that ignored them would show."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)


@pytest.mark.parametrize("config", [{"num_branches": 1}, {"num_branches": 3, "widths": [16, 32, 32]},
                                    {"num_branches": 2, "widths": [16, 24], "trunk_stages": 0}])
def test_fastnet_student_folds_exactly(config):
    torch.manual_seed(0)
    s = create_model("fastnet_student", num_classes=10, **config)
    s.init_from_data(torch.randn(64, 3, 32, 32))
    _random_bn(s)
    s.eval()
    x = torch.randn(8, 3, 32, 32)
    folded = fold(s, "grouped")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert torch.allclose(folded(x), s(x), atol=1e-5)
    convs = [m for m in folded.modules() if isinstance(m, torch.nn.Conv2d)]
    n_stages = len(config.get("widths", [64, 128, 128]))
    assert len(convs) == 1 + 2 * n_stages  # whitening + two per stage: the branches run as one graph


@pytest.mark.parametrize("config", [{"num_branches": 3, "widths": [64, 72, 80]}, {"num_branches": 1, "widths": [88, 104, 112]},
                                    {"num_branches": 2, "widths": [16, 24], "trunk_stages": 0},
                                    {"num_branches": 3, "widths": [24, 40, 8], "trunk_stages": 2}])
def test_fastnet_student_padded_fold_is_exact_in_whole_16_channel_blocks(config):
    """``padded`` widens every stage with zero channels to a multiple of 16 (ONNX Runtime's AVX-512 blocks):
    the same function, every convolution after the whitening in whole blocks per group."""
    torch.manual_seed(0)
    s = create_model("fastnet_student", num_classes=10, **config)
    s.init_from_data(torch.randn(64, 3, 32, 32))
    _random_bn(s)
    s.eval()
    assert s.fold_layouts == ("grouped", "padded")
    x = torch.randn(8, 3, 32, 32)
    folded = fold(s, "padded")
    assert torch.allclose(folded(x), s(x), atol=1e-5)
    convs = [m for m in folded.modules() if isinstance(m, torch.nn.Conv2d)][1:]  # after the whitening
    assert all(c.out_channels % (16 * c.groups) == 0 for c in convs)
    assert any(c.out_channels != g.out_channels for c, g in zip(
        convs, [m for m in fold(s, "grouped").modules() if isinstance(m, torch.nn.Conv2d)][1:]))


def test_fastnet_student_offers_padded_only_where_it_is_another_graph():
    from ekdc.plan.candidates import layouts

    whole = create_model("fastnet_student", num_classes=10, num_branches=3, widths=[64, 80, 80])
    assert whole.fold_layouts == ("grouped",) and layouts(whole) == ("grouped",)
    x = torch.randn(2, 3, 32, 32)  # not timed, but --fold padded is taken: grouped's graph
    assert torch.equal(fold(whole.eval(), "padded")(x), fold(whole, "grouped")(x))
    one = create_model("fastnet_student", num_classes=10, widths=[88, 104, 112])
    assert layouts(one) == ("grouped", "padded")  # plan times a one-branch student padded too
    ekd = create_model("ekd_student", num_classes=10, num_branches=1)
    assert layouts(ekd) == ("grouped",)  # one branch: separate is grouped's graph


def test_a_recipe_picks_the_family_and_refuses_keys_of_another():
    assert {"ekd_student", "fastnet_student"} <= set(list_students())
    base = {"data": {"dataset": "synthetic", "num_classes": 3, "num_samples": 60, "image_size": 16},
            "teachers": [{"arch": "resnet8"}]}
    r = load_recipe(base | {"student": {"arch": "fastnet_student", "widths": [8, 16], "num_branches": 2},
                            "mode": "avg_kd"})
    assert r.student.model_kwargs() == {"num_branches": 2, "widths": [8, 16], "trunk_stages": 1}
    for student, says in (({"arch": "fastnet_student", "trunk_width": 8}, "trunk_width is a key of ekd_student"),
                          ({"arch": "fastnet_student", "widths": [0]}, "every width must be >= 1"),
                          ({"arch": "fastnet_student", "depth": 3}, "depth"),
                          ({"arch": "fastnet_studnet"}, "did you mean 'fastnet_student'"),
                          ({"widths": [8]}, "widths")):
        with pytest.raises(Exception, match=says):
            load_recipe(base | {"student": student})


def test_a_fastnet_student_distils_exports_and_benches(tmp_path):
    raw = tiny_recipe(mode="ekd", distill={"epochs": 3, "batch_size": 32, "lr": 0.2, "momentum": 0.85, "schedule": "linear",
                                   "warmup_epochs": 0.5, "ema_decay": 0.9, "label_smoothing": 0.1,
                                   "weights": {"feat": 1.0}})
    raw["student"] = {"arch": "fastnet_student", "widths": [16, 32], "trunk_stages": 1}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    res = run_cli("distill", recipe, "--set", "student.widths=[16,24]", "--out", tmp_path / "run", "-q")
    assert res.returncode == 0, res.stderr
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["student"]["arch"] == "fastnet_student" and len(metrics["student"]["branch_acc"]) == 2
    ck = torch.load(tmp_path / "run" / "student.pt", weights_only=False)
    assert ck["arch"] == "fastnet_student" and bool(ck["state_dict"]["whitened"])
    assert not any(k.startswith("adapters.") for k in ck["state_dict"])
    res = run_cli("export", tmp_path / "run", "--out", tmp_path / "export", "--int8", "--no-teachers")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    fp32 = next(f for f in manifest["files"] if f["precision"] == "fp32")
    # widths [16, 24]: 24 is not a whole 16-channel block, so auto times the padded fold beside the grouped one
    assert fp32["parity"]["max_rel_diff"] < 1e-4 and set(manifest["fold"]["timings_ms"]) == {"grouped", "padded"}
    assert manifest["fold"]["choice"] in ("grouped", "padded")
    # the exported file scores what metrics.json says the trained student scores
    res = run_cli("bench", tmp_path / "export" / "student.onnx", "--data", recipe, "--batch", "1", "--json",
                  tmp_path / "b.json")
    assert res.returncode == 0, res.stderr
    bench_acc = json.loads((tmp_path / "b.json").read_text())["models"][0]["accuracy"]
    assert bench_acc == pytest.approx(metrics["student"]["ensemble_acc"], abs=1 / metrics["val_images"])
    res = run_cli("export", tmp_path / "run", "--out", tmp_path / "e2", "--fold", "separate")
    assert res.returncode == 2 and "folds to grouped, padded, none" in res.stderr.strip().splitlines()[-1]


def test_compare_finds_a_one_branch_fastnet_student_of_equal_macs():
    from ekdc.comparison.students import equal_macs_student

    cfg, macs, target = equal_macs_student({"num_branches": 3, "widths": [64, 80, 80], "trunk_stages": 1}, 10, 32,
                                           "fastnet_student")
    assert cfg["num_branches"] == 1 and all(w % 8 == 0 for w in cfg["widths"])  # fair shapes: multiples of 8
    assert abs(macs - target) <= 0.05 * target


def test_a_fastnet_recipe_survives_its_own_dump():
    from ekdc.recipe.loading import dump_recipe, recipe_from_dict

    raw = tiny_recipe(mode="avg_kd")
    raw["student"] = {"arch": "fastnet_student", "widths": [16, 32], "num_branches": 2}
    r = recipe_from_dict(raw)
    again = recipe_from_dict(yaml.safe_load(dump_recipe(r)))
    assert again.student.model_kwargs() == r.student.model_kwargs() == {"num_branches": 2, "widths": [16, 32],
                                                                         "trunk_stages": 1}
    assert "trunk_width" not in again.model_dump()["student"]


def test_a_fastnet_student_is_named_in_tables():
    from ekdc.plan import short_config

    assert short_config({"num_branches": 3, "widths": [64, 80, 80], "trunk_stages": 1}) == "widths [64,80,80], trunk_stages 1"
