"""The two training stages of ``distill``: the teachers (trained here, fine-tuned, or loaded as they
are) and the student (distilled from them, live or through the teacher-output cache)."""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from .. import checkpoint
from ..data import DataSplits
from ..errors import UserError
from ..losses import Objective
from ..models import EKDStudent, create_model
from ..recipe import Recipe, TeacherConfig
from ..run import RunDir
from ..teachers import (
    DataInfo,
    Teacher,
    frozen_teacher,
    parse_arch,
    teacher_from_checkpoint,
    teacher_param_groups,
    trainable_teacher,
)
from ..training.runtime import Runtime
from ..training.trainer import Reporter, Stage, train_stage
from .distiller import Distiller, SupervisedClassifier
from .evaluation import student_val_accuracy, val_accuracy
from .teacher_cache import open_teacher_cache

# --------------------------------------------------------------------------------------------------
# the teachers


def teacher_stage(recipe: Recipe, data: DataSplits, rt: Runtime, run: RunDir, rep: Reporter) -> tuple[list[Teacher], float]:
    """Each teacher found already trained (or saved) in this run, used as it is from its source, or
    trained (fine-tuned) now. The teachers that need no training are built first: one whose file, classes
    or input size do not fit fails before any other teacher has trained."""
    ready = [ti for ti, t in enumerate(recipe.teachers) if t.train is None or run.teacher_path(t.name).exists()]
    order = ready + [ti for ti in range(len(recipe.teachers)) if ti not in ready]
    found: dict[int, Teacher] = {}
    seconds = 0.0
    for ti in order:
        teacher, secs = _obtain_teacher(ti, recipe.teachers[ti], recipe, data, rt, run, rep)
        seconds += secs
        found[ti] = rt.prepare(teacher)
    return [found[ti] for ti in range(len(recipe.teachers))], seconds


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
        try:
            model, ck = checkpoint.load_teacher(final, tcfg.arch)
        except UserError as err:  # a half-copied or damaged file: the run can make it again
            raise UserError(f"{err}; delete it, and --resume {'trains' if tcfg.train else 'loads'} teacher {tcfg.name} "
                            "again") from None
        return teacher_from_checkpoint(ck, model, tcfg, info, ti), float(ck.get("seconds", 0.0))
    if tcfg.train is None:
        teacher = frozen_teacher(tcfg, ti, info)
        if tcfg.pretrained:  # kept in the run, so that export and --resume never need the network again
            rt.on_main(lambda: _save_teacher(final, teacher.model, tcfg, teacher.pre, tcfg.classes or info.classes, 0.0))
        return teacher, 0.0
    torch.manual_seed(recipe.seed + 101 * (ti + 1))
    t = trainable_teacher(tcfg, ti, info)
    model = rt.prepare(t.model)
    if hasattr(model, "init_from_data") and not tcfg.weights and not tcfg.pretrained:
        model.init_from_data(_init_sample(data, t.pre, rt))  # a stage checkpoint, if any, overwrites it
    task = SupervisedClassifier(t.pre.to(rt.device), tcfg.train.label_smoothing)
    stage = Stage(stage_name, model, task.forward_train, teacher_param_groups(t, tcfg), tcfg.train, recipe.seed + ti + 1,
                  score=lambda net: val_accuracy(nn.Sequential(task.preprocess, net), data, rt))
    secs = train_stage(stage, data, recipe.data.augment_config, rt, run, rep)
    rt.sync_from_main(model)  # every rank distils from the teacher rank 0 saves

    def save():
        _save_teacher(final, model, tcfg, t.pre, info.classes, secs)
        run.stage_ckpt(stage_name).unlink(missing_ok=True)

    rt.on_main(save)
    return Teacher(model, t.pre, name=tcfg.name, arch=tcfg.arch, source=parse_arch(tcfg.arch)[0], head=t.head,
                   tta=tcfg.tta), secs


def _init_sample(data: DataSplits, pre, rt: Runtime, n: int = 5000) -> torch.Tensor:
    """The first ``n`` training images as a model takes them (its size and normalisation, unaugmented):
    what a data-dependent first layer (``FastNet``'s whitening) is set from."""
    seen, parts = 0, []
    with torch.no_grad():
        for x, _ in data.train.in_order(256):
            parts.append(pre(rt.to_pixels(x)).float().cpu())
            seen += len(x)
            if seen >= n:
                break
    return torch.cat(parts)[:n]


def _save_teacher(path: Path, model: nn.Module, tcfg: TeacherConfig, pre, classes: list[str], seconds: float) -> None:
    checkpoint.save_teacher(path, model, arch=tcfg.arch, source=parse_arch(tcfg.arch)[0], classes=classes,
                            input_size=pre.size, mean=pre.spec()["mean"], std=pre.spec()["std"], seconds=seconds)


# --------------------------------------------------------------------------------------------------
# the student


def student_stage(recipe: Recipe, data: DataSplits, teachers: list[Teacher], rt: Runtime, run: RunDir,
                  rep: Reporter, config: dict) -> tuple[EKDStudent, float, dict]:
    """The trained student (``config``: its ``create_model`` keys, the recipe's or planned), its training
    seconds, and what metrics.json records of how it was trained."""
    torch.manual_seed(recipe.seed)
    student = create_model(recipe.student.arch, num_classes=data.num_classes, **config)
    d = recipe.distill
    distiller = Distiller(student, teachers, Objective.from_recipe(recipe), teacher_runtime=d.teacher_runtime,
                          say=rep.say)
    rt.prepare(student)
    if run.student_path.exists():
        trained, ck = checkpoint.load_student(run.student_path)
        student.load_state_dict(trained.state_dict(), strict=False)  # adapters are not saved: they stay fresh
        rep.say(f"[dim]student: already trained in this run, loaded {run.student_path}[/dim]")
        return student, float(ck.get("seconds", 0.0)), {"teacher_cache": ck.get("teacher_cache")}
    stage_name = f"student-{recipe.mode}"
    if hasattr(student, "init_from_data"):  # a data-dependent first layer (FastNet's whitening)
        norm = lambda px: rt.normalize(px, torch.tensor(data.mean, device=rt.device), torch.tensor(data.std, device=rt.device))  # noqa: E731
        student.init_from_data(_init_sample(data, norm, rt))
    stage = Stage(stage_name, student, distiller.forward_train, distiller.param_groups(), d, recipe.seed,
                  score=lambda net: student_val_accuracy(net, data, rt))
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
