import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ekdc.deploy.fold import fold, randomize_for_verification, verify_fold
from ekdc.models import create_model


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4),
    trunk_blocks=st.integers(0, 2),
    widths=st.lists(st.sampled_from([4, 8, 12]), min_size=1, max_size=3),
    blocks=st.integers(1, 2),
    layout=st.sampled_from(["grouped", "separate", "none"]),
    seed=st.integers(0, 1000),
)
def test_fold_is_exact(n, trunk_blocks, widths, blocks, layout, seed):
    torch.manual_seed(seed)
    s = create_model("ekd_student", num_classes=5, num_branches=n, trunk_width=8, trunk_blocks=trunk_blocks,
                     branch_widths=widths, branch_blocks=blocks)
    randomize_for_verification(s, seed)
    x = torch.randn(3, 3, 12, 12)
    assert verify_fold(s, layout, x) <= 1e-5


def test_fold_structure():
    s = create_model("ekd_student", num_classes=5, num_branches=3, trunk_width=8, branch_widths=[8, 16])
    s.set_adapters([4, 4, 4])
    g = fold(s, "grouped")
    convs = [m for m in g.modules() if isinstance(m, torch.nn.Conv2d)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in g.modules())
    assert any(c.groups == 3 for c in convs)  # later branch convs grouped x N
    first = g.branches[0].conv1
    assert first.groups == 1 and first.out_channels == 3 * 8  # first convs concatenated
    linears = [m for m in g.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == 3 * 16  # heads + mean in one Linear
    sep = fold(s, "separate")
    assert not any(c.groups > 1 for c in sep.modules() if isinstance(c, torch.nn.Conv2d))
    assert fold(s, "none").adapters is None and s.adapters is not None  # original untouched
