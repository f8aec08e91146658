"""The fold is exact (RepVGG's check: random BatchNorm statistics, eval mode, compare outputs)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import pytest

from ekdc.deploy.fold import fold, fuse_conv_bn, merge_convs
from ekdc.models import create_model


@torch.no_grad()
def randomize_for_verification(model: torch.nn.Module, seed: int = 0) -> None:
    """Random BatchNorm statistics and affine parameters, random Linear biases: a fresh model has unit
    BN statistics and zero head biases, which would hide a folding error in either."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
        elif isinstance(m, torch.nn.Linear) and m.bias is not None:
            m.bias.copy_(torch.randn(m.bias.shape, generator=g))


@torch.no_grad()
def fold_error(student, layout: str, x: torch.Tensor) -> float:
    """max |folded - original| / max |original| on ``x``, both in eval mode."""
    student.eval()
    ref = student(x)
    return float((fold(student, layout)(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 4),
    trunk_blocks=st.integers(0, 2),
    widths=st.lists(st.sampled_from([4, 8, 12]), min_size=1, max_size=3),
    blocks=st.integers(1, 2),
    layout=st.sampled_from(["grouped", "separate"]),  # "none" returns a copy: comparing it would prove nothing
    stem=st.sampled_from(["cifar", "imagenet"]),
    block=st.sampled_from(["basic", "inverted_residual"]),
    expand_ratio=st.sampled_from([1, 2, 6]),  # 1: the first branch convolution is depthwise, on a shared input
    seed=st.integers(0, 1000),
)
def test_fold_is_exact(n, trunk_blocks, widths, blocks, layout, stem, block, expand_ratio, seed):
    torch.manual_seed(seed)
    s = create_model("ekd_student", num_classes=5, num_branches=n, trunk_width=8, trunk_blocks=trunk_blocks,
                     branch_widths=widths, branch_blocks=blocks, stem=stem, block=block, expand_ratio=expand_ratio)
    randomize_for_verification(s, seed)
    x = torch.randn(3, 3, 24, 24)
    assert fold_error(s, layout, x) <= 1e-5


def test_depthwise_on_a_shared_input_is_not_stacked():
    """The trap: stacking the filters of N depthwise convolutions that read one tensor is wrong (an error of
    about 2.8 was seen); the fold runs them as one grouped convolution over N copies instead."""
    s = create_model("ekd_student", num_classes=5, num_branches=3, trunk_width=8, branch_widths=[8, 16],
                     block="inverted_residual", expand_ratio=1)
    randomize_for_verification(s, 1)
    first = fold(s, "grouped").branches[0]
    assert first.repeat_input and first.first.groups == 3 * 8
    assert fold_error(s, "grouped", torch.randn(2, 3, 16, 16)) <= 1e-5
    with pytest.raises(ValueError, match="cannot stack"):
        merge_convs([s.branches[i][0].depthwise[0] for i in range(3)], shared_input=True)


def test_fuse_conv_bn_keeps_every_convolution_attribute():
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2, bias=False, padding_mode="reflect")
    bn = torch.nn.BatchNorm2d(6)
    pair = torch.nn.Sequential(conv, bn)
    randomize_for_verification(pair, 4)
    pair.eval()
    fused = fuse_conv_bn(pair)
    assert (fused.dilation, fused.padding_mode, fused.groups, fused.stride) == ((2, 2), "reflect", 2, (2, 2))
    x = torch.randn(2, 4, 11, 11)
    with torch.no_grad():
        assert torch.allclose(fused(x), pair(x), atol=1e-5)


def test_fold_check_can_fail():
    """The check above sees a fold that is wrong by one BatchNorm statistic."""
    s = create_model("ekd_student", num_classes=5, num_branches=2, trunk_width=8, branch_widths=[8, 16])
    randomize_for_verification(s, 3)
    x = torch.randn(3, 3, 12, 12)
    folded = fold(s, "grouped")
    with torch.no_grad():
        s.branches[1][0].conv2[1].running_mean.add_(1.0)  # the student changes after folding
        err = float((folded(x) - s.eval()(x)).abs().max() / s(x).abs().max())
    assert err > 1e-3


def test_fold_structure():
    s = create_model("ekd_student", num_classes=5, num_branches=3, trunk_width=8, branch_widths=[8, 16])
    s.set_adapters([4, 4, 4])
    g = fold(s, "grouped")
    convs = [m for m in g.modules() if isinstance(m, torch.nn.Conv2d)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in g.modules())
    assert any(c.groups == 3 for c in convs)  # later branch convs grouped x N
    first = g.branches[0].first
    assert first.groups == 1 and first.out_channels == 3 * 8  # first convs concatenated
    linears = [m for m in g.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == 3 * 16  # heads + mean in one Linear
    sep = fold(s, "separate")
    assert not any(c.groups > 1 for c in sep.modules() if isinstance(c, torch.nn.Conv2d))
    assert fold(s, "none").adapters is None and s.adapters is not None  # original untouched
