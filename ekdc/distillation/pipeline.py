"""``distill``: a recipe in, a run folder out, in three stages: the teachers (trained here or loaded),
the EKD student, and the validation metrics. Each stage is a function; ``distill`` strings them
together, holding the run folder's lock throughout."""
from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .. import _io, checkpoint
from ..contract import top1
from ..data import DataSplits, ImageSet, iterate_batches, load_data
from ..models import EKDStudent, count_macs, count_params, create_model
from ..recipe import Recipe, TeacherConfig, dump_recipe
from ..plan import plan_metrics, planned_student_config
from ..run import RunDir, open_training_run
from ..teachers import (DataInfo, Teacher, frozen_teacher, parse_arch, teacher_from_checkpoint, teacher_param_groups,
                        teacher_stats, trainable_teacher)
from .distiller import Distiller, SupervisedClassifier
from .losses import EKDLoss
from .runtime import Runtime, seed_everything, setup_runtime
from .teacher_cache import cache_root, open_teacher_cache
from .trainer import Reporter, Stage, train_stage


def distill(recipe: Recipe, out: str | Path | None = None, *, resume: bool = False, runs_root: str | Path = "runs",
            console=None, progress: bool = True, teachers_only: bool = False) -> RunDir:
    """Train (or load) the teachers, then the EKD student; write the run folder and return it.

    ``teachers_only`` stops after the teachers: they are saved (``teachers/<name>.pt``, loadable with
    ``weights:``) and scored on the validation split (``teachers/metrics.json``); ``--resume`` without it
    goes on to the student."""
    rt = setup_runtime(recipe.device, recipe.precision, recipe.channels_last)
    run, lock = _open_run(recipe, out, resume, runs_root, rt)
    try:
        seed_everything(recipe.seed)
        if console is not None and rt.is_main:
            console.print(f"[bold]ekdc distill[/bold] {recipe.name} -> {run.path}  ({rt.device}, {rt.precision_text}"
                          f"{', channels_last' if rt.channels_last else ''}{f', {rt.world} processes' if rt.world > 1 else ''})")
        data = load_data(recipe.data)
        if console is not None and rt.is_main:
            skipped = data.skipped_files
            console.print(f"data: {recipe.data.dataset}, {len(data.train)} training / {len(data.val)} validation "
                          f"images, {data.num_classes} classes, {data.image_size}px, {data.loader} loader"
                          + (f"; {skipped} unreadable files left out (data.skip_bad_files)" if skipped else ""))
        with Reporter(run, rt, console, progress) as rep:
            teachers, teacher_s = teacher_stage(recipe, data, rt, run, rep)
            if teachers_only:
                scores = {**evaluate_teachers(data, teachers, rt), "seconds": round(teacher_s, 2),
                          "train_images": len(data.train), "val_images": len(data.val)}
                rt.on_main(lambda: _io.write_json(run.teacher_metrics_path, scores))
                rt.barrier()
                return run
            student, student_s, student_info = student_stage(recipe, data, teachers, rt, run, rep)
            metrics = {**evaluate(recipe, data, student, teachers, rt), **student_info}
            metrics["seconds"] = round(teacher_s + student_s, 2)
            metrics.update(plan_metrics(run))  # student.latency_ms: what was planned, and where it holds

            def finish():
                _io.write_json(run.metrics_path, metrics)
                rep.log({"event": "done", **{k: metrics[k] for k in ("mode", "seconds", "teacher_ensemble_acc")},
                         "student_ensemble_acc": metrics["student"]["ensemble_acc"]})
                with contextlib.suppress(OSError):
                    run.ckpt_dir.rmdir()

            rt.on_main(finish)
        rt.barrier()
    except _io.WriteError as err:
        raise _io.WriteError(f"{err}; the last good checkpoint in {run.path} is intact: free space, then continue "
                             "with 'ekdc distill RECIPE --resume'") from None
    finally:
        if lock is not None:
            lock.release()
    return run


def _open_run(recipe: Recipe, out, resume: bool, runs_root, rt: Runtime):
    """Rank 0 resolves and locks the run folder and writes its recipe; the other ranks learn its path."""
    run, lock = RunDir(Path(".")), None
    if rt.is_main:
        run, lock = open_training_run(recipe, out, resume, runs_root)
    run = RunDir(rt.from_main(str(run.path)))

    def prepare_folder():
        (run.path / "teachers").mkdir(exist_ok=True)
        run.ckpt_dir.mkdir(exist_ok=True)
        run.repair_log()
        if not run.recipe_path.exists():
            _io.write_text(run.recipe_path, dump_recipe(recipe))
        if recipe.distill.teacher_cache.views:
            cache_root(recipe.distill.teacher_cache, run.path)

    try:
        rt.on_main(prepare_folder)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return run, lock


# --------------------------------------------------------------------------------------------------
# stage 1: the teachers


def teacher_stage(recipe: Recipe, data: DataSplits, rt: Runtime, run: RunDir, rep: Reporter) -> tuple[list[Teacher], float]:
    """Each teacher found already trained (or saved) in this run, used as it is from its source, or
    trained (fine-tuned) now."""
    teachers, seconds = [], 0.0
    for ti, tcfg in enumerate(recipe.teachers):
        teacher, secs = _obtain_teacher(ti, tcfg, recipe, data, rt, run, rep)
        seconds += secs
        teachers.append(rt.prepare(teacher))
    return teachers, seconds


def data_info(data: DataSplits) -> DataInfo:
    return DataInfo(list(data.classes), data.image_size, list(data.mean), list(data.std))


def _obtain_teacher(ti: int, tcfg: TeacherConfig, recipe: Recipe, data: DataSplits, rt: Runtime, run: RunDir,
                    rep: Reporter) -> tuple[Teacher, float]:
    final = run.teacher_path(tcfg.name)
    stage_name = f"teacher-{tcfg.name}"
    info = data_info(data)
    if final.exists():
        # a kill between saving the teacher and deleting its stage checkpoint leaves the latter behind
        rt.on_main(lambda: run.stage_ckpt(stage_name).unlink(missing_ok=True))
        rep.say(f"[dim]teacher {tcfg.name}: already in this run, loaded {final}[/dim]")
        model, ck = checkpoint.load_teacher(final, tcfg.arch)
        return teacher_from_checkpoint(ck, model, tcfg, info, ti), float(ck.get("seconds", 0.0))
    if tcfg.train is None:
        teacher = frozen_teacher(tcfg, ti, info)
        if tcfg.pretrained:  # kept in the run, so that export and --resume never need the network again
            rt.on_main(lambda: _save_teacher(final, teacher.model, tcfg, teacher.pre, tcfg.classes or info.classes, 0.0))
        return teacher, 0.0
    torch.manual_seed(recipe.seed + 101 * (ti + 1))
    t = trainable_teacher(tcfg, ti, info)
    model = rt.prepare(t.model)
    task = SupervisedClassifier(t.pre.to(rt.device), tcfg.train.label_smoothing)
    stage = Stage(stage_name, model, task.forward_train, teacher_param_groups(t, tcfg), tcfg.train, recipe.seed + ti + 1)
    secs = train_stage(stage, data, recipe.data.augment_config, rt, run, rep)
    rt.sync_from_main(model)  # every rank distils from the teacher rank 0 saves

    def save():
        _save_teacher(final, model, tcfg, t.pre, info.classes, secs)
        run.stage_ckpt(stage_name).unlink(missing_ok=True)

    rt.on_main(save)
    return Teacher(model, t.pre, name=tcfg.name, arch=tcfg.arch, source=parse_arch(tcfg.arch)[0], head=t.head), secs


def _save_teacher(path: Path, model: nn.Module, tcfg: TeacherConfig, pre, classes: list[str], seconds: float) -> None:
    checkpoint.save_teacher(path, model, arch=tcfg.arch, source=parse_arch(tcfg.arch)[0], classes=classes,
                            input_size=pre.size, mean=pre.spec()["mean"], std=pre.spec()["std"], seconds=seconds)


# --------------------------------------------------------------------------------------------------
# stage 2: the student


def student_stage(recipe: Recipe, data: DataSplits, teachers: list[Teacher], rt: Runtime, run: RunDir,
                  rep: Reporter) -> tuple[EKDStudent, float, dict]:
    """The trained student, its training seconds, and what metrics.json records of how it was trained."""
    torch.manual_seed(recipe.seed)
    config = planned_student_config(recipe, data, rt, run, rep)  # the recipe's, or planned for student.latency_ms
    student = create_model("ekd_student", num_classes=data.num_classes, **config)
    d = recipe.distill
    distiller = Distiller(student, teachers, EKDLoss(recipe.mode, d.weights.model_dump(), d.temperature, d.label_smoothing))
    rt.prepare(student)
    if run.student_path.exists():
        trained, ck = checkpoint.load_student(run.student_path)
        student.load_state_dict(trained.state_dict(), strict=False)  # adapters are not saved: they stay fresh
        rep.say(f"[dim]student: already trained in this run, loaded {run.student_path}[/dim]")
        return student, float(ck.get("seconds", 0.0)), {"teacher_cache": ck.get("teacher_cache")}
    stage_name = f"student-{recipe.mode}"
    stage = Stage(stage_name, student, distiller.forward_train, distiller.param_groups(), d, recipe.seed)
    cache_info = _use_teacher_cache(recipe, data, distiller, stage, rt, run, rep)
    secs = train_stage(stage, data, recipe.data.augment_config, rt, run, rep)

    def save():
        checkpoint.save_student(run.student_path, student, classes=data.classes, input_size=data.image_size,
                                mean=data.mean, std=data.std, recipe=recipe.name, mode=recipe.mode,
                                teachers=[t.name for t in recipe.teachers], seconds=secs, teacher_cache=cache_info)
        run.stage_ckpt(stage_name).unlink(missing_ok=True)

    rt.on_main(save)
    return student, secs, {"teacher_cache": cache_info}


def _use_teacher_cache(recipe: Recipe, data: DataSplits, distiller: Distiller, stage: Stage, rt: Runtime, run: RunDir,
                       rep: Reporter) -> Optional[dict]:
    """With ``distill.teacher_cache.views``: open (or build) the cache and have the stage read from it.
    Returns what metrics.json records of it (None: live teachers)."""
    cfg = recipe.distill.teacher_cache
    if cfg.views == 0 or not distiller.loss.needs_teachers:
        return None
    t0 = time.perf_counter()
    cache = open_teacher_cache(cfg, run.path, list(distiller.teachers), data,
                               recipe.data.augment_config, rt, distiller.teacher_targets, distiller.loss.needs_features,
                               rep.say, rep.progress)
    distiller.cache = cache
    stage.fixed_views = functools.partial(cache.views_for_epoch, stage.seed)
    info = {"views": cfg.views, "seed": cfg.seed, "path": str(cache.folder), "bytes": cache.info.get("bytes"),
            "build_seconds": cache.info.get("build_seconds"), "open_seconds": round(time.perf_counter() - t0, 2)}
    rep.log({"event": "teacher_cache", **info})
    rep.say(f"[dim]student: teachers' outputs read from the cache in {cache.folder} ({cfg.views} views an image)[/dim]")
    return info


# --------------------------------------------------------------------------------------------------
# stage 3: validation metrics


@torch.no_grad()
def predict(model: nn.Module, images: ImageSet, rt: Runtime, batch_size: int = 256) -> torch.Tensor:
    """Outputs of ``model(pixels)`` on a split's images (as [0,1] pixels), in eval mode and fp32: the
    reported accuracy is that of the function export deploys, not of a bf16 approximation."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(rt.to_pixels(x)).float().cpu()
                          for x, _ in images.batches(list(iterate_batches(len(images), batch_size)))])
    finally:
        model.train(was)


class _StudentBranches(nn.Module):
    """The student's per-branch logits ``[B,N,C]`` from [0,1] pixels, normalised as it was trained."""

    def __init__(self, student: EKDStudent, mean: list[float], std: list[float], rt: Runtime):
        super().__init__()
        self.student, self.rt = student, rt
        self.register_buffer("mean", torch.tensor(mean, device=rt.device), persistent=False)
        self.register_buffer("std", torch.tensor(std, device=rt.device), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.student(self.rt.normalize(pixels, self.mean, self.std), return_branches=True).logits.transpose(0, 1)


def evaluate_teachers(data: DataSplits, teachers: list[Teacher], rt: Runtime) -> dict:
    """Each teacher's validation accuracy, size and cost, and their averaged logits' accuracy."""
    teacher_logits = [predict(t, data.val, rt) for t in teachers]
    y = data.val_y
    teachers_out = []
    for t, tl in zip(teachers, teacher_logits):
        params, macs = teacher_stats(t)
        teachers_out.append({"name": t.name, "arch": t.arch, "source": t.source, "input_size": t.input_size,
                             "acc": top1(tl, y), "params": params, "macs": macs})
    return {"teachers": teachers_out, "teacher_ensemble_acc": top1(torch.stack(teacher_logits).mean(0), y)}


def evaluate(recipe: Recipe, data: DataSplits, student: EKDStudent, teachers: list[Teacher], rt: Runtime) -> dict:
    """metrics.json (DESIGN.md's contract), but for ``seconds``, which the caller adds."""
    branch_logits = predict(_StudentBranches(student, data.mean, data.std, rt), data.val, rt)  # [V,N,C]
    y = data.val_y
    return {
        "student": {
            "ensemble_acc": top1(branch_logits.mean(1), y),
            "branch_acc": [top1(branch_logits[:, i], y) for i in range(branch_logits.shape[1])],
            # the deployed student's parameters: training-only adapters excluded
            "params": count_params(student) - (count_params(student.adapters) if student.adapters is not None else 0),
            "macs": count_macs(student, data.image_size),
        },
        **evaluate_teachers(data, teachers, rt),
        "mode": recipe.mode,
        "train_images": len(data.train),
        "val_images": len(data.val),
        "loader": data.loader,
        "skipped_files": data.skipped_files,
        "device": str(rt.device),
        "world_size": rt.world,
    }
