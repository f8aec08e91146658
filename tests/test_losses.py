import math
import re

import pytest
import torch
from pydantic import Field

from ekdc import StrictSettings
from ekdc.losses import (Objective, TermInputs, confidence_weights, dkd_parts, get_term, kd_kl, kl_per_sample,
                         register_term, terms_of_mode, unregister_term)
from ekdc.losses.kd import dkd_per_sample
from ekdc.models import BranchOutputs, create_model
from ekdc.recipe import recipe_from_dict

from conftest import tiny_recipe

W = {"ce": 1.0, "ens": 1.0, "kd": 1.0, "feat": 0.0}
ONLY_KD = {"ce": 0, "ens": 0, "kd": 1}


def _out(logits, features=None, adapted=None):
    return BranchOutputs(logits, features if features is not None else torch.zeros(logits.shape[0], logits.shape[1], 4), adapted)


def _kd_settings(**kw):
    return {"kd": get_term("kd").settings(**kw)}


def test_kd_zero_when_branch_copies_teacher():
    t = torch.randn(3, 8, 5)
    assert float(kd_kl(t[0], t[0], 4.0)) == pytest.approx(0.0, abs=1e-6)
    loss = Objective("ekd", ONLY_KD, temperature=4.0)
    total, terms = loss(_out(t.clone()), torch.zeros(8, dtype=torch.long), 0, t)
    assert float(terms["kd"]) == pytest.approx(0.0, abs=1e-6)
    total2, _ = loss(_out(t.clone() + torch.randn_like(t)), torch.zeros(8, dtype=torch.long), 0, t)
    assert float(total2) > 0.01


def test_kd_matches_definition():
    z, t, T = torch.randn(4, 6), torch.randn(4, 6), 3.0
    p_t = torch.softmax(t / T, -1)
    want = (p_t * (p_t.log() - torch.log_softmax(z / T, -1))).sum(-1).mean() * T * T
    assert float(kd_kl(z, t, T)) == pytest.approx(float(want), rel=1e-5)


def test_ce_terms():
    z, y = torch.randn(2, 5, 3), torch.randint(0, 3, (5,))
    _, terms = Objective("ce", W, temperature=4.0)(_out(z), y)
    ce = torch.nn.functional.cross_entropy
    assert float(terms["ce"]) == pytest.approx(float(ce(z[0], y) + ce(z[1], y)), rel=1e-5)
    assert float(terms["ens"]) == pytest.approx(float(ce(z.mean(0), y)), rel=1e-5)
    assert set(terms) == {"ce", "ens"}  # ce mode: no teacher terms


def test_ekd_branch_i_sees_teacher_i_only():
    z = torch.randn(3, 4, 5, requires_grad=True)
    t = torch.randn(3, 4, 5)
    loss = Objective("ekd", ONLY_KD, temperature=2.0)
    y = torch.zeros(4, dtype=torch.long)
    g0 = torch.autograd.grad(loss(_out(z), y, 0, t)[0], z)[0]
    t2 = t.clone()
    t2[1] += torch.randn(4, 5) * 3  # change teacher 1 only
    g1 = torch.autograd.grad(loss(_out(z), y, 0, t2)[0], z)[0]
    changed = [(g0[i] - g1[i]).abs().max().item() > 1e-6 for i in range(3)]
    assert changed == [False, True, False]


def test_avg_kd_every_branch_sees_the_mean():
    t = torch.randn(3, 4, 5)
    loss = Objective("avg_kd", ONLY_KD, temperature=2.0)
    z = t.mean(0, keepdim=True).repeat(3, 1, 1)
    assert float(loss(_out(z), torch.zeros(4, dtype=torch.long), 0, t)[1]["kd"]) == pytest.approx(0, abs=1e-6)
    # any number of branches learns the same mean: a one-branch student of three teachers
    one = Objective("avg_kd", ONLY_KD, temperature=2.0)(_out(z[:1]), torch.zeros(4, dtype=torch.long), 0, t)[1]["kd"]
    assert float(one) == pytest.approx(0, abs=1e-6)


def test_no_gradient_reaches_teacher_and_feat_term():
    teacher = create_model("resnet8", num_classes=4).eval()
    student = create_model("ekd_student", num_classes=4, num_branches=1, trunk_width=4, branch_widths=[8])
    student.set_adapters([teacher.num_features])
    x, y = torch.randn(3, 3, 8, 8), torch.randint(0, 4, (3,))
    with torch.inference_mode():
        f = teacher.forward_features(x)
        t = teacher.forward_head(f)[None]
    loss_fn = Objective("ekd", {"ce": 1, "ens": 1, "kd": 1, "feat": 1}, temperature=4.0)
    total, terms = loss_fn(student(x, return_branches=True), y, 0, t.clone(), [f.clone()])
    assert set(terms) == {"ce", "ens", "kd", "feat"}
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.adapters[0].weight.grad is not None and student.stem[0].weight.grad is not None


def test_what_each_mode_needs():
    all_on = {"ce": 1, "ens": 1, "kd": 1, "feat": 1}
    assert Objective("avg_kd", all_on).needs_features is False  # feature matching pairs branch i with teacher i
    assert Objective("ekd", all_on).needs_features is True
    assert Objective("ce", all_on).needs_teachers is False
    assert terms_of_mode("ce") == ["ce", "ens"] and terms_of_mode("ekd") == ["ce", "ens", "kd", "feat"]


# --------------------------------------------------------------------------------------------------
# DKD


Z = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.5]])  # student logits, 2 samples x 3 classes
T_ = torch.tensor([[3.0, 0.0, -0.5], [-1.0, 2.0, 1.5]])  # teacher logits
Y = torch.tensor([0, 2])


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def _softmax(v, t=1.0):
    e = [math.exp(x / t) for x in v]
    return [x / sum(e) for x in e]


def test_dkd_against_a_hand_computed_value():
    temperature, alpha, beta = 2.0, 1.0, 8.0
    want = []
    for z, t, y in zip(Z.tolist(), T_.tolist(), Y.tolist()):
        ps, pt = _softmax(z, temperature), _softmax(t, temperature)
        tckd = _kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        rest = [i for i in range(3) if i != y]
        qs = [ps[i] / (1 - ps[y]) for i in rest]  # the non-target classes, renormalised
        qt = [pt[i] / (1 - pt[y]) for i in rest]
        want.append(alpha * tckd + beta * _kl(qt, qs))
    got = dkd_per_sample(Z, T_, Y, temperature, alpha, beta)
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    # the KD term: the batch mean times T², on every branch (one branch here)
    s = get_term("kd").settings(loss="dkd", alpha=alpha, beta=beta)
    term = get_term("kd").compute(TermInputs(_out(Z[None]), Y, "ekd", 0, 1, temperature, 0.0, T_[None]), s)
    assert float(term) == pytest.approx(sum(want) / 2 * temperature ** 2, rel=1e-5)


def test_kl_is_tckd_plus_weighted_nckd():
    """KL = TCKD + (1 - p_t) * NCKD, with p_t the teacher's target-class probability (Zhao et al., eq. 4)."""
    z, t, y = torch.randn(16, 10), torch.randn(16, 10) * 3, torch.randint(0, 10, (16,))
    for temperature in (1.0, 4.0):
        tckd, nckd, p_t = dkd_parts(z, t, y, temperature)
        assert torch.allclose(kl_per_sample(z, t, temperature), tckd + (1 - p_t) * nckd, atol=1e-5)


def test_dkd_with_equal_weights_is_kl_plus_the_non_target_share():
    """From KL = TCKD + (1 - p_t) NCKD: DKD(alpha = beta = w) = w * (KL + p_t * NCKD) per sample, so it
    exceeds w * KL by exactly w * p_t * NCKD (>= 0): what a confident teacher's KL leaves out."""
    z, t, y = torch.randn(32, 10), torch.randn(32, 10) * 3, torch.randint(0, 10, (32,))
    temperature, w = 4.0, 2.5
    _, nckd, p_t = dkd_parts(z, t, y, temperature)
    dkd = dkd_per_sample(z, t, y, temperature, w, w)
    assert torch.allclose(dkd, w * (kl_per_sample(z, t, temperature) + p_t * nckd), atol=1e-5)
    assert bool((dkd >= w * kl_per_sample(z, t, temperature) - 1e-6).all())


def test_dkd_warmup_ramps_the_term():
    t = torch.randn(1, 4, 5)
    z = torch.randn(1, 4, 5)
    y = torch.randint(0, 5, (4,))
    ramped = Objective("avg_kd", ONLY_KD, _kd_settings(loss="dkd", warmup_epochs=4), temperature=4.0)
    full = Objective("avg_kd", ONLY_KD, _kd_settings(loss="dkd"), temperature=4.0)
    full_kd = float(full(_out(z), y, 0, t)[1]["kd"])
    assert [float(ramped(_out(z), y, e, t)[1]["kd"]) / full_kd for e in (0, 1, 3, 9)] == pytest.approx([0.25, 0.5, 1, 1])


# --------------------------------------------------------------------------------------------------
# confidence-weighted teachers (CA-MKD)


def test_confidence_weights_against_a_hand_computed_value():
    t = torch.stack([T_, Z])  # two teachers
    ce = [[-math.log(_softmax(row)[y]) for row, y in zip(teacher.tolist(), Y.tolist())] for teacher in t]
    want = []
    for m in range(2):
        want.append([(1 - math.exp(ce[m][b]) / sum(math.exp(ce[k][b]) for k in range(2))) / (2 - 1) for b in range(2)])
    w = confidence_weights(t, Y)
    assert w.tolist() == [pytest.approx(r, rel=1e-5) for r in want]
    assert torch.allclose(w.sum(0), torch.ones(2))
    # with two teachers, the one with the lower cross-entropy weighs more
    assert bool(((w[0] > w[1]) == (torch.tensor(ce[0]) < torch.tensor(ce[1]))).all())


def test_confidence_kd_is_the_weighted_sum_of_per_teacher_kl():
    t, z, y, temperature = torch.randn(3, 8, 5), torch.randn(2, 8, 5), torch.randint(0, 5, (8,)), 4.0
    loss = Objective("avg_kd", ONLY_KD, _kd_settings(teachers="confidence"), temperature=temperature)
    got = float(loss(_out(z), y, 0, t)[1]["kd"])
    w = confidence_weights(t, y)
    want = sum(float((w[m] * kl_per_sample(z[i], t[m], temperature)).mean()) * temperature ** 2
               for i in range(2) for m in range(3))
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("over, message", [
    ({"mode": "ekd", "distill": {"kd": {"teachers": "confidence"}}}, "mode ekd pairs branch i with teacher i"),
    ({"mode": "avg_kd", "teachers": [{"arch": "resnet8"}], "distill": {"kd": {"teachers": "confidence"}}},
     "at least 2 teachers"),
    ({"distill": {"kd": {"loss": "jsd"}}}, "distill.kd.loss"),
    ({"distill": {"kd": {"beta": -1}}}, "distill.kd.beta: must be >= 0"),
    ({"distill": {"kdd": {"loss": "dkd"}}}, "unknown key 'distill.kdd' (did you mean 'kd'?)"),
    ({"distill": {"weights": {"dkd": 1}}}, "unknown loss term 'dkd'"),
    ({"mode": "ekd", "student": {"num_branches": 1}}, "mode ekd trains branch i from teacher i"),
])
def test_loss_settings_refused_where_they_cannot_apply(over, message):
    from ekdc import UserError

    raw = tiny_recipe(**{k: v for k, v in over.items() if k != "distill"})
    raw["distill"].update(over.get("distill", {}))
    with pytest.raises(UserError, match=re.escape(message)):
        recipe_from_dict(raw)


def test_default_kd_settings_keep_the_classic_kl():
    r = recipe_from_dict(tiny_recipe(mode="avg_kd"))
    s = r.distill.term_settings()["kd"]
    assert (s.loss, s.teachers, s.warmup_epochs) == ("kl", "mean", 0)
    t, z, y = torch.randn(2, 4, 5), torch.randn(2, 4, 5), torch.randint(0, 5, (4,))
    got = Objective.from_recipe(r)(_out(z), y, 0, t)[1]["kd"]
    assert float(got) == pytest.approx(sum(float(kd_kl(z[i], t.mean(0), 4.0)) for i in range(2)), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# a term from outside ekdc: registry entry plus recipe key, nothing else


class ScaleSettings(StrictSettings):  # the base ekdc's own settings have, as docs/ARCHITECTURE.md shows
    scale: float = Field(1.0, gt=0)


SEEN: list[tuple[float, int]] = []


@pytest.fixture()
def toy_term():
    @register_term("toy", matches="the squared mean of the averaged logits, times scale", needs=("epoch",),
                   settings=ScaleSettings)
    def toy(x: TermInputs, s: ScaleSettings) -> torch.Tensor:
        SEEN.append((s.scale, x.epoch))
        return s.scale * x.out.logits.float().mean(0).mean().pow(2)

    SEEN.clear()
    yield
    unregister_term("toy")


def test_a_toy_term_trains_from_a_test_file_alone(toy_term, tmp_path):
    from ekdc import distill

    raw = tiny_recipe(mode="ce", teachers=[{"arch": "resnet8", "train": {"epochs": 1, "batch_size": 32, "lr": 0.05}}])
    raw["distill"].update({"weights": {"toy": 0.5}, "toy": {"scale": 3.0}})
    recipe = recipe_from_dict(raw)
    assert recipe.distill.weights["toy"] == 0.5 and recipe.distill.term_settings()["toy"].scale == 3.0
    run = distill(recipe, tmp_path / "run", progress=False)
    assert SEEN and {s for s, _ in SEEN} == {3.0} and {e for _, e in SEEN} == {0, 1}  # 2 epochs, each told
    logged = [line for line in (run.path / "log.jsonl").read_text().splitlines() if '"loss_toy"' in line]
    assert len(logged) == 2
    assert "toy:\n    scale: 3.0" in (run.path / "recipe.yaml").read_text()  # and it resumes with it
    with pytest.raises(Exception, match="distill.toy.scale: must be > 0"):
        raw["distill"]["toy"] = {"scale": 0}
        recipe_from_dict(raw)
    with pytest.raises(Exception, match="distill.toy.scale: must be a number, not true"):
        raw["distill"]["toy"] = {"scale": True}
        recipe_from_dict(raw)


def test_a_term_cannot_take_a_schedule_key():
    with pytest.raises(ValueError, match="cannot be named 'epochs'"):
        register_term("epochs", matches="x")(lambda x, s: x)
