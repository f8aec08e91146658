import pytest
import torch

from ekdc.distillation.losses import EKDLoss, kd_kl
from ekdc.models import BranchOutputs, create_model

W = {"ce": 1.0, "ens": 1.0, "kd": 1.0, "feat": 0.0}


def _out(logits, features=None, adapted=None):
    return BranchOutputs(logits, features if features is not None else torch.zeros(logits.shape[0], logits.shape[1], 4), adapted)


def test_kd_zero_when_branch_copies_teacher():
    t = torch.randn(3, 8, 5)
    assert float(kd_kl(t[0], t[0], 4.0)) == pytest.approx(0.0, abs=1e-6)
    loss = EKDLoss("ekd", {"ce": 0, "ens": 0, "kd": 1}, temperature=4.0)
    total, terms = loss(_out(t.clone()), torch.zeros(8, dtype=torch.long), t)
    assert float(terms["kd"]) == pytest.approx(0.0, abs=1e-6)
    total2, _ = loss(_out(t.clone() + torch.randn_like(t)), torch.zeros(8, dtype=torch.long), t)
    assert float(total2) > 0.01


def test_kd_matches_definition():
    z, t, T = torch.randn(4, 6), torch.randn(4, 6), 3.0
    p_t = torch.softmax(t / T, -1)
    want = (p_t * (p_t.log() - torch.log_softmax(z / T, -1))).sum(-1).mean() * T * T
    assert float(kd_kl(z, t, T)) == pytest.approx(float(want), rel=1e-5)


def test_ce_terms():
    z, y = torch.randn(2, 5, 3), torch.randint(0, 3, (5,))
    _, terms = EKDLoss("ce", W, 4.0)(_out(z), y)
    ce = torch.nn.functional.cross_entropy
    assert float(terms["ce"]) == pytest.approx(float(ce(z[0], y) + ce(z[1], y)), rel=1e-5)
    assert float(terms["ens"]) == pytest.approx(float(ce(z.mean(0), y)), rel=1e-5)
    assert set(terms) == {"ce", "ens"}  # ce mode: no teacher terms


def test_ekd_branch_i_sees_teacher_i_only():
    z = torch.randn(3, 4, 5, requires_grad=True)
    t = torch.randn(3, 4, 5)
    loss = EKDLoss("ekd", {"ce": 0, "ens": 0, "kd": 1}, 2.0)
    g0 = torch.autograd.grad(loss(_out(z), torch.zeros(4, dtype=torch.long), t)[0], z)[0]
    t2 = t.clone()
    t2[1] += torch.randn(4, 5) * 3  # change teacher 1 only
    g1 = torch.autograd.grad(loss(_out(z), torch.zeros(4, dtype=torch.long), t2)[0], z)[0]
    changed = [(g0[i] - g1[i]).abs().max().item() > 1e-6 for i in range(3)]
    assert changed == [False, True, False]


def test_avg_kd_every_branch_sees_the_mean():
    t = torch.randn(3, 4, 5)
    loss = EKDLoss("avg_kd", {"ce": 0, "ens": 0, "kd": 1}, 2.0)
    target = loss.targets(t, 3)
    assert all(torch.allclose(target[i], t.mean(0)) for i in range(3))
    z = t.mean(0, keepdim=True).repeat(3, 1, 1)
    assert float(loss(_out(z), torch.zeros(4, dtype=torch.long), t)[1]["kd"]) == pytest.approx(0, abs=1e-6)


def test_no_gradient_reaches_teacher_and_feat_term():
    teacher = create_model("resnet8", num_classes=4).eval()
    student = create_model("ekd_student", num_classes=4, num_branches=1, trunk_width=4, branch_widths=[8])
    student.set_adapters([teacher.num_features])
    x, y = torch.randn(3, 3, 8, 8), torch.randint(0, 4, (3,))
    with torch.inference_mode():
        f = teacher.forward_features(x)
        t = teacher.forward_head(f)[None]
    loss_fn = EKDLoss("ekd", {"ce": 1, "ens": 1, "kd": 1, "feat": 1}, 4.0)
    total, terms = loss_fn(student(x, return_branches=True), y, t.clone(), [f.clone()])
    assert set(terms) == {"ce", "ens", "kd", "feat"}
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.adapters[0].weight.grad is not None and student.stem[0].weight.grad is not None


def test_feature_matching_only_in_ekd_mode():
    assert EKDLoss("avg_kd", {"ce": 1, "ens": 1, "kd": 1, "feat": 1}, 4.0).needs_features is False
    assert EKDLoss("ce", {"ce": 1, "ens": 1, "kd": 1, "feat": 1}, 4.0).needs_teachers is False
