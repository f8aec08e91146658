"""The distillation pipeline: teachers (load or train), then the EKD student, into a run folder.

Every stage (each teacher, then the student) checkpoints atomically after every epoch, so
``--resume`` continues after a kill at any moment and never retrains a finished stage. Under
``torchrun`` the models train with DistributedDataParallel (gloo on CPU, nccl on CUDA); only rank 0
writes files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .. import _io
from ..data import DataSplits, augment_batch, augment_params, epoch_order, iterate_batches, load_data, normalize
from ..errors import UserError
from ..models import count_macs, count_params, create_model
from ..recipe import Recipe, Schedule, dump_recipe
from ..run import RunDir, latest_run_path, new_run_path
from .losses import EKDLoss


class TrainingDiverged(UserError):
    """A NaN or infinite loss: the recipe's settings (often the learning rate) need a change."""


# --------------------------------------------------------------------------------------------------
# runtime: device, precision, distributed


@dataclasses.dataclass
class Runtime:
    device: torch.device
    amp_dtype: Optional[torch.dtype]  # autocast dtype, None for fp32
    channels_last: bool
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def to_input(self, x_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        x = normalize(x_uint8.to(self.device, non_blocking=True), mean, std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def prepare(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model


def _cpu_bf16_supported() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def setup_runtime(recipe: Recipe) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    want = recipe.device
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device: '{want}' asked for, but no CUDA GPU is available (use device: auto or cpu)")
    use_cuda = want.startswith("cuda") or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device(want if ":" in want else f"cuda:{local_rank if world > 1 else 0}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    p = recipe.precision
    if p == "fp32":
        amp = None
    elif p == "bf16":
        amp = torch.bfloat16
    elif p == "fp16":
        if not use_cuda:
            raise UserError("precision: fp16 autocast needs a CUDA GPU; on CPU use bf16, auto or fp32")
        amp = torch.float16
    elif use_cuda:
        amp = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        amp = torch.bfloat16 if _cpu_bf16_supported() else None
    return Runtime(device, amp, recipe.channels_last, rank, world)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# optimisation


def make_optimizer(params, s: Schedule) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.nesterov and s.momentum > 0)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, s: Schedule, steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    total = max(1, s.epochs * steps_per_epoch)
    warm = s.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, total - warm)
        if s.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        if s.schedule == "step":
            return 0.1 ** ((frac >= 0.5) + (frac >= 0.75))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --------------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def predict(model: nn.Module, x_uint8: torch.Tensor, data: DataSplits, rt: Runtime, batch_size: int = 256,
            branches: bool = False) -> torch.Tensor:
    """Logits ``[N,C]`` (or per-branch ``[N,B,C]`` with ``branches``) of ``x_uint8``, in eval mode and
    fp32: the reported accuracy is that of the function export deploys, not of a bf16 approximation."""
    mean = torch.tensor(data.mean, device=rt.device)
    std = torch.tensor(data.std, device=rt.device)
    was = model.training
    model.eval()
    out = []
    try:
        for idx in iterate_batches(len(x_uint8), batch_size):
            x = rt.to_input(x_uint8[idx], mean, std)
            z = model(x, return_branches=True).logits.transpose(0, 1) if branches else model(x)
            out.append(z.float().cpu())
    finally:
        model.train(was)
    return torch.cat(out)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).float().mean())


# --------------------------------------------------------------------------------------------------
# one stage: a training loop with per-epoch atomic checkpoints


def _unwrap(m: nn.Module) -> nn.Module:
    return m.module if isinstance(m, nn.parallel.DistributedDataParallel) else m


class _Reporter:
    """Rich progress on rank 0 and one JSON line per epoch in log.jsonl."""

    def __init__(self, run: RunDir, rt: Runtime, console, show: bool):
        self.run, self.rt, self.console = run, rt, console
        self.progress = None
        if rt.is_main and show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
        if not self.rt.is_main:
            return
        with open(self.run.log_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def say(self, text: str) -> None:
        if self.rt.is_main and self.console is not None:
            self.console.print(text)


def _check_finite(loss: torch.Tensor, stage: str, epoch: int, run: RunDir) -> None:
    if not torch.isfinite(loss):
        # --resume would retrace the same steps into the same NaN (the recipe must not change on resume),
        # so the way on is a new run; teachers this run finished need not be trained again
        lr_key = "distill.lr" if stage.startswith("student-") else "teachers.N.train.lr"
        reuse = (f"; teachers finished in {run.path / 'teachers'} load with --set teachers.N.checkpoint=PATH"
                 if any((run.path / "teachers").glob("*.pt")) else "")
        raise TrainingDiverged(
            f"training diverged: {stage} loss is {float(loss)} in epoch {epoch + 1} "
            f"(start a new run with a lower {lr_key}{reuse})"
        )


def _all_reduce(values: list[float], rt: Runtime) -> list[float]:
    if rt.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=rt.device if rt.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return (t / rt.world).tolist()


def train_stage(
    stage: str,
    model: nn.Module,
    schedule: Schedule,
    data: DataSplits,
    aug,
    rt: Runtime,
    run: RunDir,
    rep: _Reporter,
    step_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict, torch.Tensor]],
    seed: int,
    extra_params: list[nn.Parameter] | None = None,
) -> float:
    """Train ``model`` with ``step_loss`` for ``schedule.epochs``; resume from the stage checkpoint if
    one exists. Returns the stage's training seconds (accumulated across resumes)."""
    n = len(data.train_x)
    per_rank = -(-n // rt.world)
    bs = min(schedule.batch_size, per_rank)
    steps = max(1, per_rank // bs)  # drop_last keeps BatchNorm away from 1-image batches
    params = list(model.parameters())
    opt = make_optimizer(params, schedule)
    sched = make_scheduler(opt, schedule, steps)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.amp_dtype == torch.float16)
    start_epoch, seconds = 0, 0.0
    ckpt_path = run.stage_ckpt(stage)
    if ckpt_path.exists():
        ck = _io.load_checkpoint(ckpt_path, "stage checkpoint")
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"]) if ck.get("scaler") else None
        torch.set_rng_state(ck["rng_cpu"])
        start_epoch, seconds = int(ck["epoch"]), float(ck["seconds"])
        rep.say(f"[dim]resumed {stage} after epoch {start_epoch}/{schedule.epochs}[/dim]")
    train_model = model
    if rt.world > 1:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    mean = torch.tensor(data.mean, device=rt.device)
    std = torch.tensor(data.std, device=rt.device)
    task = rep.progress.add_task(stage, total=schedule.epochs, completed=start_epoch, info="") if rep.progress else None
    for epoch in range(start_epoch, schedule.epochs):
        t0 = time.perf_counter()
        train_model.train()
        params_ep = augment_params(n, aug, seed, epoch)
        order = epoch_order(n, seed, epoch, rt.rank, rt.world)
        tot_loss = tot_correct = tot_seen = 0.0
        term_sums: dict[str, float] = {}
        for idx in iterate_batches(len(order), bs, order, drop_last=True):
            xb = data.train_x[idx].to(rt.device, non_blocking=True)
            if params_ep is not None:
                xb = augment_batch(xb, params_ep[idx].to(rt.device), aug.crop_padding)
            x = rt.to_input(xb, mean, std)
            y = data.train_y[idx].to(rt.device, non_blocking=True)
            with rt.autocast():
                loss, terms, logits = step_loss(train_model, x, y, idx)
            _check_finite(loss.detach(), stage, epoch, run)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            tot_loss += float(loss.detach()) * len(idx)
            tot_correct += float((logits.detach().argmax(-1) == y).sum())
            tot_seen += len(idx)
            for k, v in terms.items():
                term_sums[k] = term_sums.get(k, 0.0) + float(v.detach()) * len(idx)
        dt = time.perf_counter() - t0
        seconds += dt
        keys = sorted(term_sums)
        reduced = _all_reduce([tot_loss / tot_seen, tot_correct / tot_seen] + [term_sums[k] / tot_seen for k in keys], rt)
        ips = tot_seen * rt.world / dt
        record = {
            "stage": stage, "epoch": epoch + 1, "epochs": schedule.epochs, "loss": round(reduced[0], 5),
            "train_acc": round(reduced[1], 5), "lr": opt.param_groups[0]["lr"], "images_per_s": round(ips, 1),
            "seconds": round(dt, 2), **{f"loss_{k}": round(v, 5) for k, v in zip(keys, reduced[2:])},
        }
        if rt.is_main:  # checkpoint first, then log: a logged epoch is always a saved one
            _io.save_checkpoint(
                {
                    "state_dict": _unwrap(model).state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                    "rng_cpu": torch.get_rng_state(), "epoch": epoch + 1, "seconds": seconds, "stage": stage,
                },
                ckpt_path,
            )
        rep.log(record)
        info = f"loss {record['loss']:.3f}  acc {record['train_acc']:.3f}  {ips:,.0f} img/s"
        if rep.progress:
            rep.progress.update(task, advance=1, info=info)
        rep.say(f"{stage:<22} epoch {epoch + 1:>3}/{schedule.epochs}  {info}")
        if rt.world > 1:
            dist.barrier()
    if rep.progress and task is not None:
        rep.progress.remove_task(task)
    return seconds


# --------------------------------------------------------------------------------------------------
# teachers


def _teacher_checkpoint(model: nn.Module, arch: str, data: DataSplits, seconds: float) -> dict:
    return {
        "state_dict": model.state_dict(), "arch": arch, "num_classes": data.num_classes, "classes": data.classes,
        "input_size": data.image_size, "mean": data.mean, "std": data.std, "seconds": seconds,
    }


def load_teacher(path: str | Path, arch: str, num_classes: int, what: str = "teacher checkpoint") -> nn.Module:
    """A teacher from an ekdc checkpoint, checked against the architecture and class count expected."""
    ck = _io.load_checkpoint(path, what)
    if ck.get("arch") not in (None, arch):
        raise UserError(f"{what} {path} holds a '{ck['arch']}', not the '{arch}' the recipe names")
    if ck.get("num_classes") not in (None, num_classes):
        raise UserError(f"{what} {path} was trained for {ck['num_classes']} classes, but the data has {num_classes}")
    model = create_model(arch, num_classes=num_classes)
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as err:
        detail = str(err).splitlines()[0][:160]
        raise UserError(f"{what} {path} does not fit architecture '{arch}' ({detail})") from None
    return model


def _teacher_step(model, x, y, idx, label_smoothing: float):
    logits = model(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    return loss, {}, logits


# --------------------------------------------------------------------------------------------------
# the run


def _resolve_run(recipe: Recipe, out: str | Path | None, resume: bool, runs_root: str | Path) -> RunDir:
    runs_root = Path(runs_root)
    if resume:
        path = Path(out) if out else latest_run_path(runs_root, recipe.name)
        if path is None or not (path / "recipe.yaml").is_file():
            where = path if path else runs_root / recipe.name
            raise UserError(f"--resume: no run to resume at {where} (no recipe.yaml there)")
        saved = RunDir(path).recipe().model_dump(mode="json")
        now = recipe.model_dump(mode="json")
        diff = _first_difference(saved, now)
        if diff:
            raise UserError(f"--resume: the recipe differs from {path}/recipe.yaml at '{diff}'; resume with the same recipe")
        return RunDir(path)
    if out:
        path = Path(out)
        if path.exists() and path.is_dir() and any(path.iterdir()):
            raise UserError(f"--out {path} already holds files; pass --resume to continue that run, or choose another folder")
        return RunDir(path)
    return RunDir(new_run_path(runs_root, recipe.name))


def _first_difference(a, b, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{prefix}{i}.")
            if d:
                return d
        return None
    return prefix.rstrip(".") if a != b else None


def _broadcast_path(run: RunDir, rt: Runtime) -> RunDir:
    if rt.world == 1:
        return run
    obj = [str(run.path)]
    dist.broadcast_object_list(obj, src=0)
    return RunDir(obj[0])


def distill(
    recipe: Recipe,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    runs_root: str | Path = "runs",
    console=None,
    progress: bool = True,
) -> RunDir:
    """Train (or load) the teachers, then the EKD student; write the run folder and return it."""
    rt = setup_runtime(recipe)
    run = RunDir(Path(".")) if not rt.is_main else _resolve_run(recipe, out, resume, runs_root)
    run = _broadcast_path(run, rt)
    if rt.is_main:
        _io.ensure_writable_dir(run.path)
        (run.path / "teachers").mkdir(exist_ok=True)
        run.ckpt_dir.mkdir(exist_ok=True)
        if not run.recipe_path.exists():
            _io.write_text(run.recipe_path, dump_recipe(recipe))
    if rt.world > 1:
        dist.barrier()
    _seed_everything(recipe.seed)
    if console is not None and rt.is_main:
        amp = {None: "fp32", torch.bfloat16: "bf16 autocast", torch.float16: "fp16 AMP"}[rt.amp_dtype]
        console.print(f"[bold]ekdc distill[/bold] {recipe.name} -> {run.path}  ({rt.device}, {amp}"
                      f"{', channels_last' if rt.channels_last else ''}{f', {rt.world} processes' if rt.world > 1 else ''})")
    data = load_data(recipe.data)
    aug = recipe.data.augment_config
    if console is not None and rt.is_main:
        console.print(f"data: {recipe.data.dataset}, {len(data.train_x)} training / {len(data.val_x)} validation "
                      f"images, {data.num_classes} classes, {data.image_size}px")

    with _Reporter(run, rt, console, progress) as rep:
        # ---- teachers
        teachers: list[nn.Module] = []
        stage_seconds = 0.0
        for ti, tcfg in enumerate(recipe.teachers):
            final = run.teacher_path(tcfg.name)
            if tcfg.checkpoint:
                model = load_teacher(tcfg.checkpoint, tcfg.arch, data.num_classes, f"teachers.{ti}.checkpoint")
                secs = 0.0
            elif final.exists():
                model = load_teacher(final, tcfg.arch, data.num_classes)
                secs = float(_io.load_checkpoint(final).get("seconds", 0.0))
                if rt.is_main:  # a kill between saving the teacher and deleting its stage checkpoint
                    run.stage_ckpt(f"teacher-{tcfg.name}").unlink(missing_ok=True)
                rep.say(f"[dim]teacher {tcfg.name}: already trained in this run, loaded {final}[/dim]")
            else:
                torch.manual_seed(recipe.seed + 101 * (ti + 1))
                model = rt.prepare(create_model(tcfg.arch, num_classes=data.num_classes))
                stage = f"teacher-{tcfg.name}"
                ls = tcfg.train.label_smoothing
                secs = train_stage(stage, model, tcfg.train, data, aug, rt, run, rep,
                                   lambda m, x, y, idx, ls=ls: _teacher_step(m, x, y, idx, ls), recipe.seed + ti + 1)
                if rt.is_main:
                    _io.save_checkpoint(_teacher_checkpoint(model.cpu(), tcfg.arch, data, secs), final)
                    run.stage_ckpt(stage).unlink(missing_ok=True)
            stage_seconds += secs
            model = rt.prepare(model).eval()
            for p in model.parameters():
                p.requires_grad_(False)
            teachers.append(model)

        # ---- student
        torch.manual_seed(recipe.seed)
        scfg = recipe.student
        student = create_model("ekd_student", num_classes=data.num_classes, **scfg.model_dump(exclude={"arch"}))
        params, macs = count_params(student), count_macs(student, data.image_size)
        loss_fn = EKDLoss(recipe.mode, recipe.distill.weights.model_dump(), recipe.distill.temperature,
                          recipe.distill.label_smoothing)
        if loss_fn.needs_features:
            student.set_adapters([t.num_features for t in teachers])
        student = rt.prepare(student)
        if run.student_path.exists():
            ck = _io.load_checkpoint(run.student_path, "student checkpoint")
            student.load_state_dict(ck["state_dict"], strict=False)
            secs = float(ck.get("seconds", 0.0))
            rep.say(f"[dim]student: already trained in this run, loaded {run.student_path}[/dim]")
        else:
            def student_step(m, x, y, idx):
                t_logits = t_feats = None
                if loss_fn.needs_teachers:
                    with torch.inference_mode():
                        fs = [t.forward_features(x) for t in teachers]
                        t_logits = torch.stack([t.forward_head(f) for t, f in zip(teachers, fs)])
                    # inference tensors cannot be saved for backward: plain copies can
                    t_logits = t_logits.clone()
                    t_feats = [f.clone() for f in fs] if loss_fn.needs_features else None
                out = m(x, return_branches=True)
                loss, terms = loss_fn(out, y, t_logits, t_feats)
                return loss, terms, out.logits.mean(0)

            secs = train_stage(f"student-{recipe.mode}", student, recipe.distill, data, aug, rt, run, rep,
                               student_step, recipe.seed)
            if rt.is_main:
                sd = {k: v for k, v in student.state_dict().items() if not k.startswith("adapters.")}
                _io.save_checkpoint(
                    {
                        "state_dict": sd, "arch": "ekd_student", "config": student.config,
                        "num_classes": data.num_classes, "classes": data.classes, "input_size": data.image_size,
                        "mean": data.mean, "std": data.std, "recipe": recipe.name, "mode": recipe.mode,
                        "teachers": [t.name for t in recipe.teachers], "seconds": secs,
                    },
                    run.student_path,
                )
                run.stage_ckpt(f"student-{recipe.mode}").unlink(missing_ok=True)
        stage_seconds += secs

        # ---- validation metrics
        branch_logits = predict(student, data.val_x, data, rt, branches=True)  # [V,N,C]
        teacher_logits = [predict(t, data.val_x, data, rt) for t in teachers]
        metrics = {
            "student": {
                "ensemble_acc": accuracy(branch_logits.mean(1), data.val_y),
                "branch_acc": [accuracy(branch_logits[:, i], data.val_y) for i in range(branch_logits.shape[1])],
                "params": params, "macs": macs,
            },
            "teachers": [
                {"name": tc.name, "arch": tc.arch, "acc": accuracy(tl, data.val_y),
                 "params": count_params(t), "macs": count_macs(t, data.image_size)}
                for tc, t, tl in zip(recipe.teachers, teachers, teacher_logits)
            ],
            "teacher_ensemble_acc": accuracy(torch.stack(teacher_logits).mean(0), data.val_y),
            "mode": recipe.mode,
            "seconds": round(stage_seconds, 2),
            "train_images": len(data.train_x),
            "val_images": len(data.val_x),
            "device": str(rt.device),
            "world_size": rt.world,
        }
        if rt.is_main:
            _io.write_json(run.metrics_path, metrics)
            rep.log({"event": "done", **{k: metrics[k] for k in ("mode", "seconds", "teacher_ensemble_acc")},
                     "student_ensemble_acc": metrics["student"]["ensemble_acc"]})
            with contextlib.suppress(OSError):
                run.ckpt_dir.rmdir()
    if rt.world > 1:
        dist.barrier()
    return run
