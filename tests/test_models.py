import pytest
import torch

from ekdc import UserError
from ekdc.models import create_model, list_models


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "wrn_16_2", "resnet18"])
def test_teacher_interface(name):
    m = create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    f = m.forward_features(x)
    assert f.shape == (2, m.num_features)
    assert torch.allclose(m.forward_head(f), m(x))


def test_registry():
    assert {"resnet20", "resnet32", "resnet56", "resnet110", "wrn_16_4", "wrn_40_2", "resnet18", "resnet34",
            "ekd_student"} <= set(list_models())
    with pytest.raises(UserError, match="did you mean 'resnet20'"):
        create_model("resnet200", num_classes=10)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_student_output_is_mean_of_branch_logits(n):
    s = create_model("ekd_student", num_classes=6, num_branches=n, trunk_width=8, branch_widths=[8, 16]).eval()
    x = torch.randn(4, 3, 16, 16)
    out = s(x, return_branches=True)
    assert out.logits.shape == (n, 4, 6) and out.features.shape == (n, 4, 16)
    assert torch.allclose(s(x), out.logits.mean(0), atol=1e-6)
    # and each branch is its own head on its own branch
    h = s.forward_trunk(x)
    z1 = s.heads[n - 1](torch.nn.functional.adaptive_avg_pool2d(s.branches[n - 1](h), 1).flatten(1))
    assert torch.allclose(out.logits[n - 1], z1, atol=1e-6)


def test_student_adapters_are_training_only(tmp_path):
    from ekdc.checkpoint import load_student, save_student

    s = create_model("ekd_student", num_classes=3, num_branches=2, trunk_width=4, branch_widths=[8]).eval()
    x = torch.randn(2, 3, 8, 8)
    before = s(x)
    s.set_adapters([5, 7])
    with torch.no_grad():
        for a in s.adapters:
            a.weight.fill_(float("nan"))  # any use of an adapter would poison what it touches
    assert torch.equal(s(x), before)  # forward() (what export folds and deploys) never reads them
    assert all(torch.isnan(a).all() for a in s(x, return_branches=True).adapted)  # the training output does
    path = tmp_path / "student.pt"
    save_student(path, s, classes=["a", "b", "c"], input_size=8, mean=[0.5] * 3, std=[0.25] * 3, recipe="t",
                 mode="ekd", teachers=["t1", "t2"], seconds=1.0)
    ck = torch.load(path, weights_only=True)
    assert not any(k.startswith("adapters.") for k in ck["state_dict"])
    loaded, _ = load_student(path)
    assert loaded.adapters is None and torch.equal(loaded(x), before)
