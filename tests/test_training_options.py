"""The fast-training options of the one training loop: the weight EMA, the triangular schedule, per-group
weight decay, and FastNet's whitening layer and parameter groups."""
import json

import pytest
import torch

from conftest import run_cli, write_recipe
from ekdc.data import load_data
from ekdc.training.runtime import setup_runtime
from ekdc.training.trainer import Losses, Reporter, Stage, make_optimizer, make_scheduler, param_groups, train_stage
from ekdc.models import create_model
from ekdc.recipe import DataConfig, Schedule
from ekdc.run import RunDir


def _data():
    return load_data(DataConfig(dataset="synthetic", num_classes=3, num_samples=60, image_size=8, val_fraction=0.2))


def _stage_run(tmp_path, schedule, snapshots=None, fail_at_epoch=None):
    """A linear classifier with BatchNorm trained by train_stage; ``snapshots`` collects the weights each
    step starts from; ``fail_at_epoch`` stops the stage there (as a kill would)."""
    torch.manual_seed(0)
    rt = setup_runtime("cpu", "fp32", False)
    run = RunDir(tmp_path)
    run.ckpt_dir.mkdir(parents=True, exist_ok=True)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3), torch.nn.BatchNorm1d(3))

    def forward_train(net, batch):
        if fail_at_epoch is not None and batch.epoch == fail_at_epoch:
            raise KeyboardInterrupt
        if snapshots is not None:
            snapshots.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        logits = net(batch.images)
        return logits, Losses(torch.nn.functional.cross_entropy(logits, batch.labels), {})

    with Reporter(run, rt, None, False) as rep:
        train_stage(Stage("teacher-probe", model, forward_train, param_groups(model), schedule, seed=3), _data(), None,
                    rt, run, rep)
    return model


def test_the_stage_hands_on_the_average_of_its_steps_weights(tmp_path):
    snaps = []
    model = _stage_run(tmp_path, Schedule(epochs=3, batch_size=16, lr=0.2, ema_decay=0.9), snaps)
    # the average does not steer training: the same stage without it ends at the last step's weights
    last = _stage_run(tmp_path / "plain", Schedule(epochs=3, batch_size=16, lr=0.2)).state_dict()
    after_each_step = snaps[1:] + [last]  # each step's result is the next step's start
    avg = {k: v.clone() for k, v in snaps[0].items()}
    for t, after in enumerate(after_each_step, start=1):
        d = min(0.9, (1 + t) / (10 + t))  # the ramp: early random weights fade fast
        avg = {k: d * v + (1 - d) * after[k] if v.is_floating_point() else after[k] for k, v in avg.items()}
    final = model.state_dict()
    for k, v in avg.items():
        assert torch.allclose(final[k].to(v.dtype), v, atol=1e-6), k
    assert not torch.allclose(final["1.weight"], last["1.weight"], atol=1e-4)  # and that is not the last step's


def test_an_interrupted_stage_resumes_its_average_exactly(tmp_path):
    sched = Schedule(epochs=3, batch_size=16, lr=0.2, ema_decay=0.95)
    straight = _stage_run(tmp_path / "straight", sched)
    with pytest.raises(KeyboardInterrupt):
        _stage_run(tmp_path / "killed", sched, fail_at_epoch=2)
    resumed = _stage_run(tmp_path / "killed", sched)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_the_triangular_schedule_warms_up_in_fractions_of_an_epoch_and_ends_at_zero():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, Schedule(epochs=4, lr=1.0, schedule="linear", warmup_epochs=0.5), steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])  # 5 steps of warm-up: half an epoch
    assert lrs[5] == pytest.approx(1.0)
    assert lrs[22] == pytest.approx(1 - 17 / 35)
    assert lrs[-1] == pytest.approx(1 / 35) and all(a >= b for a, b in zip(lrs[5:], lrs[6:]))


def test_groups_scale_weight_decay_too():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    opt = make_optimizer([{"params": list(a.parameters())}, {"params": list(b.parameters()), "lr_scale": 64.0, "wd_scale": 1 / 64}],
                         Schedule(lr=0.5, weight_decay=0.01))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5, 32.0])
    assert [g["weight_decay"] for g in opt.param_groups] == pytest.approx([0.01, 0.01 / 64])


def test_fastnet_whitens_its_input_and_trains_its_shifts_faster():
    torch.manual_seed(0)
    net = create_model("fastnet_s", num_classes=10)
    x = torch.randn(400, 3, 16, 16)
    x[:, 1] = 0.6 * x[:, 0] + 0.8 * x[:, 1]  # correlated channels
    x = x + 0.5 * x.roll(1, dims=3)  # correlated neighbours
    net.init_from_data(x)
    out = torch.nn.functional.conv2d(x, net.whiten.weight[:12])  # the first 12 filters; the rest are their negatives
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = torch.cov(flat.T)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 0.02  # whitened: no correlations left
    # unit variance (exactly: eigenvalue / (eigenvalue + eps), near 1 for eigenvalues far above eps)
    assert (torch.diag(cov) < 1.02).all() and (torch.diag(cov) > 0.95).all()
    assert bool(net.whitened)
    groups = net.param_groups()
    trained = {id(p) for g in groups for p in g["params"]}
    assert id(net.whiten.weight) not in trained and id(net.whiten.bias) in trained
    shifts = groups[1]
    assert shifts["lr_scale"] == 64.0 and all(p.ndim == 1 for p in shifts["params"])
    assert net(x[:2]).shape == (2, 10)


def test_a_fastnet_teacher_is_whitened_from_the_data_and_saved(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", teachers=[{"arch": "fastnet_s", "train": {
        "epochs": 6, "batch_size": 32, "lr": 0.2, "schedule": "linear", "warmup_epochs": 0.5, "ema_decay": 0.9,
        "label_smoothing": 0.2}}], student={"num_branches": 1, "trunk_width": 8, "branch_widths": [8, 16]})
    res = run_cli("distill", recipe, "--teachers-only", "--out", tmp_path / "run", "-q")
    assert res.returncode == 0, res.stderr
    ck = torch.load(tmp_path / "run" / "teachers" / "fastnet_s.pt", weights_only=False)
    assert bool(ck["state_dict"]["whitened"])
    assert ck["state_dict"]["whiten.weight"].abs().sum() > 0
    acc = json.loads((tmp_path / "run" / "teachers" / "metrics.json").read_text())["teachers"][0]["acc"]
    assert acc > 0.5  # 4 synthetic classes: it learned


def test_a_flip_tta_teacher_averages_both_views_everywhere_it_is_used(tmp_path):
    from ekdc.teachers import teacher_stats
    from ekdc.teachers.base import Teacher
    from ekdc.teachers.base import Preprocess

    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=4).eval()
    pre = Preprocess(16, [0.5] * 3, [0.25] * 3)
    plain = Teacher(model, pre, name="t", arch="resnet8", source="registry", head=model.fc)
    tta = Teacher(model, pre, name="t", arch="resnet8", source="registry", head=model.fc, tta="flip")
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(tta(x), 0.5 * (plain(x) + plain(x.flip(-1))), atol=1e-6)
        _, f = tta.forward_with_features(x)
        _, f1 = plain.forward_with_features(x)
        _, f2 = plain.forward_with_features(x.flip(-1))
    assert torch.allclose(f, 0.5 * (f1 + f2), atol=1e-6)
    assert teacher_stats(tta)[1] == 2 * teacher_stats(plain)[1]
    assert tta.fingerprint() != plain.fingerprint()  # a cache of the plain teacher is not this one's
    # trained, scored and exported with it: export checks teachers.onnx against the PyTorch ensemble
    recipe = write_recipe(tmp_path / "r.yaml", teachers=[{"arch": "resnet8", "tta": "flip", "train": {
        "epochs": 1, "batch_size": 32}}], student={"num_branches": 1, "trunk_width": 8, "branch_widths": [8, 16]},
        mode="avg_kd", distill={"epochs": 1, "batch_size": 32})
    assert run_cli("distill", recipe, "--out", tmp_path / "run", "-q").returncode == 0
    res = run_cli("export", tmp_path / "run", "--out", tmp_path / "export")
    assert res.returncode == 0, res.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["teachers"][0]["macs"] == 2 * create_model_macs("resnet8")


def create_model_macs(arch: str) -> int:
    from ekdc.models import count_macs

    return count_macs(create_model(arch, num_classes=4), 16)


def test_val_every_scores_the_handed_on_weights_without_touching_training(tmp_path):
    torch.manual_seed(0)
    rt = setup_runtime("cpu", "fp32", False)
    data = _data()
    scored = []  # (the weights each score saw)

    def run_stage(folder, schedule, score):
        torch.manual_seed(0)
        run = RunDir(folder)
        run.ckpt_dir.mkdir(parents=True, exist_ok=True)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3), torch.nn.BatchNorm1d(3))

        def forward_train(net, batch):
            logits = net(batch.images)
            return logits, Losses(torch.nn.functional.cross_entropy(logits, batch.labels), {})

        with Reporter(run, rt, None, False) as rep:
            train_stage(Stage("teacher-probe", model, forward_train, param_groups(model), schedule, seed=3, score=score),
                        data, None, rt, run, rep)
        return model, [json.loads(line) for line in run.log_path.read_text().splitlines()]

    def score(net):
        scored.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        return 0.25 * len(scored)

    base = dict(epochs=5, batch_size=16, lr=0.2, ema_decay=0.9)
    watched, log = run_stage(tmp_path / "watched", Schedule(**base, val_every=2), score)
    plain, _ = run_stage(tmp_path / "plain", Schedule(**base), None)
    # every 2nd epoch and the last, in the log line of that epoch
    assert [r.get("val_acc") for r in log if "epoch" in r] == [None, 0.25, None, 0.5, 0.75]
    # scoring changes no weight: the stage ends where the unwatched one does
    for k, v in plain.state_dict().items():
        assert torch.equal(v, watched.state_dict()[k]), k
    # and what was scored after the last epoch is what the stage handed on (the average, not the live weights)
    for k, v in watched.state_dict().items():
        assert torch.equal(scored[-1][k], v), k


def test_a_teacher_and_a_student_log_their_validation_accuracy_as_they_train(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml",
                          teachers=[{"arch": "resnet8", "train": {"epochs": 2, "batch_size": 32, "lr": 0.05,
                                                                  "ema_decay": 0.9, "val_every": 1}}],
                          distill={"epochs": 2, "batch_size": 32, "lr": 0.05, "temperature": 4.0, "val_every": 1})
    res = run_cli("distill", recipe, "--out", tmp_path / "run")
    assert res.returncode == 0, res.stderr
    assert "val " in res.stdout
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    teacher = [r["val_acc"] for r in log if r.get("stage") == "teacher-resnet8" and "epoch" in r]
    student = [r["val_acc"] for r in log if str(r.get("stage", "")).startswith("student-") and "epoch" in r]
    assert len(teacher) == 2 and len(student) == 2
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # the last epoch's score is the run's own evaluation of what the stage handed on
    assert teacher[-1] == round(metrics["teachers"][0]["acc"], 5)
    assert student[-1] == round(metrics["student"]["ensemble_acc"], 5)


def test_a_run_resumes_with_another_val_every(tmp_path):
    train = {"epochs": 2, "batch_size": 32, "lr": 0.05}
    first = write_recipe(tmp_path / "a.yaml", teachers=[{"arch": "resnet8", "train": train}])
    assert run_cli("distill", first, "--teachers-only", "--out", tmp_path / "run", "-q").returncode == 0
    watched = write_recipe(tmp_path / "b.yaml", teachers=[{"arch": "resnet8", "train": {**train, "val_every": 1}}],
                           distill={"epochs": 2, "batch_size": 32, "lr": 0.05, "temperature": 4.0, "val_every": 1})
    res = run_cli("distill", watched, "--out", tmp_path / "run", "--resume", "-q")
    assert res.returncode == 0, res.stderr
    changed = write_recipe(tmp_path / "c.yaml", teachers=[{"arch": "resnet8", "train": {**train, "lr": 0.1}}])
    res = run_cli("distill", changed, "--out", tmp_path / "run", "--resume", "-q")
    assert res.returncode == 2 and "teachers.0.train.lr" in res.stderr
