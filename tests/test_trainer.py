"""The training loop's contracts: what a step receives, and the optimiser's parameter groups."""
import pytest
import torch

from ekdc.data import load_data
from ekdc.training.runtime import setup_runtime
from ekdc.training.trainer import Losses, Reporter, Stage, make_optimizer, param_groups, train_stage
from ekdc.recipe import DataConfig, Schedule
from ekdc.run import RunDir


def test_each_step_gets_its_samples_indices_and_epoch(tmp_path):
    data = load_data(DataConfig(dataset="synthetic", num_classes=3, num_samples=60, image_size=8, val_fraction=0.2))
    rt = setup_runtime("cpu", "fp32", False)
    run = RunDir(tmp_path)
    run.ckpt_dir.mkdir()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3))
    seen = []

    def forward_train(net, batch):
        seen.append((batch.epoch, batch.indices.clone(), batch.labels.clone()))
        logits = net(batch.images)
        return logits, Losses(torch.nn.functional.cross_entropy(logits, batch.labels), {})

    schedule = Schedule(epochs=3, batch_size=16, lr=0.01)
    with Reporter(run, rt, None, False) as rep:
        train_stage(Stage("teacher-probe", model, forward_train, param_groups(model), schedule, seed=5), data, None, rt, run, rep)
    assert sorted({e for e, _, _ in seen}) == [0, 1, 2]
    for epoch in range(3):
        idx = torch.cat([i for e, i, _ in seen if e == epoch])
        assert len(set(idx.tolist())) == len(idx) == 48  # 48 training images, batches of 16: each once per epoch
    for _, idx, labels in seen:
        assert torch.equal(data.train_y[idx], labels)  # indices say which samples the batch holds
    assert [r["epoch"] for r in map(__import__("json").loads, run.log_path.read_text().splitlines())] == [1, 2, 3]


def test_parameter_groups_scale_the_learning_rate():
    backbone, head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)
    frozen = torch.nn.Linear(4, 4)
    for p in frozen.parameters():
        p.requires_grad_(False)
    groups = param_groups(backbone, lr_scale=0.1) + param_groups(head) + param_groups(frozen)
    for kind in ("sgd", "adamw"):
        opt = make_optimizer(groups, Schedule(optimizer=kind, lr=0.5))
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.05, 0.5])  # the frozen group is left out
        assert sum(len(g["params"]) for g in opt.param_groups) == 4


def test_a_stage_checkpoint_of_other_parameter_groups_is_refused_in_one_line(tmp_path):
    """A stage checkpoint written with another optimiser layout (an earlier ekdc grouped a fine-tuned FastNet
    otherwise) or for another network: one line naming the file, which is left as it is."""
    from ekdc import checkpoint
    from ekdc.errors import UserError

    def parts(groups):
        model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 2))
        params = list(model.parameters())
        opt = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:]}] if groups == 2 else params, lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        return model, opt, sched, torch.amp.GradScaler("cuda", enabled=False)

    path = tmp_path / "stage.pt"
    model, opt, sched, scaler = parts(2)
    checkpoint.save_stage(path, stage="teacher-x", model=model, optimizer=opt, scheduler=sched, scaler=scaler,
                          epoch=3, seconds=1.0)
    before = path.read_bytes()
    model, opt, sched, scaler = parts(2)
    assert checkpoint.load_stage(path, model=model, optimizer=opt, scheduler=sched, scaler=scaler) == (3, 1.0)
    model, opt, sched, scaler = parts(1)
    with pytest.raises(UserError, match=r"stage checkpoint .*stage.pt does not fit this stage \(.*\): .*move it away"):
        checkpoint.load_stage(path, model=model, optimizer=opt, scheduler=sched, scaler=scaler)
    assert path.read_bytes() == before
