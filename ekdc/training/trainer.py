"""The training loop every stage shares: one network, one schedule, per-epoch atomic checkpoints.

A stage knows nothing of teachers or losses: it calls ``forward_train(net, batch) -> (logits, losses)``
(mdistiller's shape) and steps the optimiser on ``losses.total``. Every epoch is checkpointed before it
is logged, so ``--resume`` continues after a kill at any moment; under ``torchrun`` the network trains
in DistributedDataParallel and only rank 0 writes.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn as nn
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from .. import checkpoint
from ..data import Augment, DataSplits, augment
from ..errors import UserError
from ..recipe import Schedule
from ..run import RunDir
from .ema import WeightEMA
from .runtime import Runtime


class TrainingDiverged(UserError):
    """A NaN or infinite loss: the recipe's settings (often the learning rate) need a change."""


@dataclasses.dataclass
class Batch:
    """One training step's input: what a ``forward_train`` gets."""

    pixels: torch.Tensor  # augmented, RGB in [0,1], on the training device (what teachers take)
    images: torch.Tensor  # the same, normalised with the data's statistics (what the student takes)
    labels: torch.Tensor  # int64 [B]
    indices: torch.Tensor  # each sample's position in the training split (int64 [B], CPU; -1: read in order)
    epoch: int  # 0-based
    views: Optional[torch.Tensor] = None  # with a teacher cache: which fixed view each sample is (int64 [B], CPU)


class Losses(NamedTuple):
    total: torch.Tensor  # what the optimiser minimises
    terms: dict[str, torch.Tensor]  # its unweighted parts, logged as loss_<name>


ForwardTrain = Callable[[nn.Module, Batch], tuple[torch.Tensor, Losses]]


# --------------------------------------------------------------------------------------------------
# optimisation


def param_groups(model: nn.Module, lr_scale: float = 1.0) -> list[dict]:
    """One optimiser group of ``model``'s trainable parameters; stages with several (a backbone at a lower
    learning rate, say) concatenate such lists."""
    return [{"params": [p for p in model.parameters() if p.requires_grad], "lr_scale": lr_scale}]


def make_optimizer(groups: list[dict], s: Schedule) -> torch.optim.Optimizer:
    """Each group trains at ``s.lr`` times its ``lr_scale`` and ``s.weight_decay`` times its ``wd_scale``;
    groups without parameters are left out."""
    groups = [{"params": g["params"], "lr": s.lr * g.get("lr_scale", 1.0),
               "weight_decay": s.weight_decay * g.get("wd_scale", 1.0)} for g in groups if g["params"]]
    if s.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay,
                               nesterov=s.nesterov and s.momentum > 0)
    return torch.optim.AdamW(groups, lr=s.lr, weight_decay=s.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, s: Schedule, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, s.epochs * steps_per_epoch)
    warm = round(s.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, total - warm)
        if s.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        if s.schedule == "linear":
            return max(0.0, 1.0 - frac)
        if s.schedule == "step":
            return 0.1 ** ((frac >= 0.5) + (frac >= 0.75))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --------------------------------------------------------------------------------------------------
# progress and the log


class Reporter:
    """Rich progress on rank 0 and one JSON line per epoch in log.jsonl."""

    def __init__(self, run: RunDir, rt: Runtime, console, show: bool, tracker=None):
        self.run, self.rt, self.console, self.tracker = run, rt, console, tracker
        self.progress = None
        if rt.is_main and show:

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console, transient=True,
            )

    def __enter__(self):
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress:
            self.progress.stop()

    def log(self, record: dict) -> None:
        if self.rt.is_main:
            self.run.append_log(record)

    def track(self, record: dict) -> None:
        """An epoch's record to the run's trackers (TensorBoard, MLflow), where the recipe asked for them."""
        if self.tracker is not None and self.rt.is_main:
            self.tracker.epoch(record)

    def say(self, text: str) -> None:
        if self.rt.is_main and self.console is not None:
            self.console.print(text)


def check_finite(loss: torch.Tensor, stage: str, epoch: int, run: RunDir) -> None:
    if not torch.isfinite(loss):
        # --resume would retrace the same steps into the same NaN (the recipe must not change on resume),
        # so the way on is a new run; teachers this run finished need not be trained again
        lr_key = ("distill.lr" if stage.startswith("student-") else "--qad-lr" if stage.startswith("qad-")
                  else "teachers.N.train.lr")
        reuse = (f"; teachers finished in {run.path / 'teachers'} load with --set teachers.N.checkpoint=PATH"
                 if any((run.path / "teachers").glob("*.pt")) else "")
        raise TrainingDiverged(
            f"training diverged: {stage} loss is {float(loss)} in epoch {epoch + 1} "
            f"(start a new run with a lower {lr_key}{reuse})"
        )


# --------------------------------------------------------------------------------------------------
# one stage


@dataclasses.dataclass
class Stage:
    """What one stage trains, and how."""

    name: str  # "teacher-<name>" or "student-<mode>": the checkpoint's and the log's key
    model: nn.Module  # the network whose weights are trained and checkpointed
    forward_train: ForwardTrain
    groups: list[dict]  # optimiser parameter groups (see ``param_groups``)
    schedule: Schedule
    seed: int  # data order and augmentation of every epoch derive from it
    # instead of a fresh random augmentation each epoch: (each sample's augmentation parameters, which
    # fixed view that is) for an epoch, as a teacher-output cache stores them
    fixed_views: Optional[Callable[[int], tuple[Optional[torch.Tensor], torch.Tensor]]] = None
    # the validation accuracy of a network holding the stage's weights (``schedule.val_every``); None: not scored
    score: Optional[Callable[[nn.Module], float]] = None


@dataclasses.dataclass
class _EpochTotals:
    loss: float = 0.0
    correct: float = 0.0
    seen: int = 0
    steps: int = 0
    terms: dict = dataclasses.field(default_factory=dict)

    def add(self, losses: Losses, logits: torch.Tensor, labels: torch.Tensor) -> None:
        n = len(labels)
        self.steps += 1
        self.loss += float(losses.total.detach()) * n
        self.correct += float((logits.detach().argmax(-1) == labels).sum())
        self.seen += n
        for k, v in losses.terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + float(v.detach()) * n


class _Optimisation(NamedTuple):
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    ema: Optional[WeightEMA]  # with schedule.ema_decay: the averaged weights the stage hands on
    model: nn.Module  # the weights the EMA follows (not a DDP wrapper)

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(self.model)

    def handed_on(self) -> nn.Module:
        """The network the stage would hand on if it ended now: a copy holding the average, else the live one."""
        if self.ema is None:
            return self.model
        twin = copy.deepcopy(self.model)
        self.ema.copy_to(twin)
        return twin


def _run_epoch(stage: Stage, net: nn.Module, optim: _Optimisation, data: DataSplits, aug: Optional[Augment],
               rt: Runtime, run: RunDir, epoch: int, batch_size: int) -> _EpochTotals:
    net.train()
    fixed = stage.fixed_views(epoch) if stage.fixed_views is not None else None  # (params, view of each sample)
    mean = torch.tensor(data.mean, device=rt.device)
    std = torch.tensor(data.std, device=rt.device)
    totals = _EpochTotals()
    # the order and the augmentation are functions of (seed, epoch, sample): every loader gives these batches
    for chunk in data.train.epoch(aug if fixed is None else None, stage.seed, epoch, batch_size, rt.rank, rt.world):
        params = chunk.aug_params if fixed is None else (None if fixed[0] is None else fixed[0][chunk.ids])
        xb = chunk.images.to(rt.device, non_blocking=True)
        if params is not None:
            xb = augment(xb, params.to(rt.device), aug, data.image_size)
        pixels = rt.to_pixels(xb)
        batch = Batch(pixels, rt.normalize(pixels, mean, std), chunk.labels.to(rt.device, non_blocking=True), chunk.ids,
                      epoch, None if fixed is None else fixed[1][chunk.ids])
        with rt.autocast():
            logits, losses = stage.forward_train(net, batch)
        check_finite(losses.total.detach(), stage.name, epoch, run)
        optim.step(losses.total)
        totals.add(losses, logits, batch.labels)
    return totals


def _epoch_record(stage: Stage, epoch: int, totals: _EpochTotals, lr: float, seconds: float, rt: Runtime) -> dict:
    keys = sorted(totals.terms)
    reduced = rt.mean_over_ranks([totals.loss / totals.seen, totals.correct / totals.seen]
                                 + [totals.terms[k] / totals.seen for k in keys])
    return {
        "stage": stage.name, "epoch": epoch + 1, "epochs": stage.schedule.epochs, "loss": round(reduced[0], 5),
        "train_acc": round(reduced[1], 5), "lr": lr, "images_per_s": round(totals.seen * rt.world / seconds, 1),
        "steps": totals.steps, "images": totals.seen * rt.world,  # optimizer steps, and images over all processes
        "seconds": round(seconds, 2), **{f"loss_{k}": round(v, 5) for k, v in zip(keys, reduced[2:])},
    }


def rank_batch(batch_size: int, world: int) -> int:
    """One process's share of the global batch (rounded up: every process takes the same count)."""
    return max(1, -(-batch_size // world))


def train_stage(stage: Stage, data: DataSplits, aug: Optional[Augment], rt: Runtime, run: RunDir,
                rep: Reporter) -> float:
    """Train ``stage.model`` for ``stage.schedule.epochs``, resuming from the stage checkpoint if one
    exists. Returns the stage's training seconds (accumulated across resumes)."""
    s = stage.schedule
    per_rank = -(-len(data.train) // rt.world)
    # batch_size is the global batch: each of N processes takes 1/N of it, so that a recipe trains the same
    # schedule (steps an epoch, images a step, the learning rate those were tuned for) on 1 process or N
    bs = min(rank_batch(s.batch_size, rt.world), per_rank)
    opt = make_optimizer(stage.groups, s)
    # drop_last keeps BatchNorm away from 1-image batches
    optim = _Optimisation(opt, make_scheduler(opt, s, max(1, per_rank // bs)),
                          torch.amp.GradScaler("cuda", enabled=rt.amp_dtype == torch.float16),
                          WeightEMA(stage.model, s.ema_decay) if s.ema_decay > 0 else None, stage.model)
    ckpt_path = run.stage_ckpt(stage.name)
    restored = checkpoint.load_stage(ckpt_path, model=stage.model, optimizer=optim.opt, scheduler=optim.sched,
                                     scaler=optim.scaler, ema=optim.ema)
    start_epoch, seconds = restored or (0, 0.0)
    if restored:
        rep.say(f"[dim]resumed {stage.name} after epoch {start_epoch}/{s.epochs}[/dim]")
    net = stage.model
    if rt.world > 1:
        net = nn.parallel.DistributedDataParallel(stage.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    task = rep.progress.add_task(stage.name, total=s.epochs, completed=start_epoch, info="") if rep.progress else None
    for epoch in range(start_epoch, s.epochs):
        t0 = time.perf_counter()
        totals = _run_epoch(stage, net, optim, data, aug, rt, run, epoch, bs)
        dt = time.perf_counter() - t0
        seconds += dt
        record = _epoch_record(stage, epoch, totals, optim.opt.param_groups[0]["lr"], dt, rt)
        if stage.score is not None and s.val_every and ((epoch + 1) % s.val_every == 0 or epoch + 1 == s.epochs):
            # outside the epoch's seconds: scoring is watching, not training
            record["val_acc"] = round(stage.score(optim.handed_on()), 5)

        def save_then_log(epoch=epoch, seconds=seconds, record=record):
            # checkpoint first, then log: a logged epoch is always a saved one
            checkpoint.save_stage(ckpt_path, stage=stage.name, model=stage.model, optimizer=optim.opt,
                                  scheduler=optim.sched, scaler=optim.scaler, ema=optim.ema, epoch=epoch + 1,
                                  seconds=seconds)
            run.append_log(record)

        rt.on_main(save_then_log)
        rep.track(record)
        info = f"loss {record['loss']:.3f}  acc {record['train_acc']:.3f}  {record['images_per_s']:,.0f} img/s"
        if "val_acc" in record:
            info += f"  val {record['val_acc']:.3f}"
        if rep.progress:
            rep.progress.update(task, advance=1, info=info)
        rep.say(f"{stage.name:<22} epoch {epoch + 1:>3}/{s.epochs}  {info}")
    if rep.progress and task is not None:
        rep.progress.remove_task(task)
    if optim.ema is not None:  # from here on (evaluation, saving, folding, export) the stage's weights are the average
        optim.ema.copy_to(stage.model)
    return seconds
