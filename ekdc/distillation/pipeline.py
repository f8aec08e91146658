"""``distill``: a recipe in, a run folder out, in three stages: the teachers (trained here or loaded),
the EKD student, and the validation metrics. ``distill`` strings them together, holding the run
folder's lock throughout; what can be checked before the teachers train is checked first."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from .. import _io
from ..data import load_data
from ..data.check import scan_summary
from ..recipe import Recipe, dump_recipe
from ..tracking import check_available as check_tracking
from ..tracking import open_tracker
from ..run import RunDir, open_training_run
from .evaluation import evaluate, evaluate_teachers, predict
from .planning import plan_metrics, planned_student_config
from .runtime import Runtime, seed_everything, setup_runtime
from .stages import student_stage, teacher_stage
from .teacher_cache import cache_root, check_cacheable, check_room
from .trainer import Reporter

__all__ = ["distill", "predict"]


def distill(recipe: Recipe, out: str | Path | None = None, *, resume: bool = False, runs_root: str | Path = "runs",
            console=None, progress: bool = True, teachers_only: bool = False) -> RunDir:
    """Train (or load) the teachers, then the EKD student; write the run folder and return it.

    ``teachers_only`` stops after the teachers: they are saved (``teachers/<name>.pt``, loadable with
    ``weights:``) and scored on the validation split (``teachers/metrics.json``); ``--resume`` without it
    goes on to the student."""
    rt = setup_runtime(recipe.device, recipe.precision, recipe.channels_last)
    check_tracking(recipe.tracking)  # a tracker without its library: one line, before anything runs
    run, lock = _open_run(recipe, out, resume, runs_root, rt)
    tracker = None
    try:
        seed_everything(recipe.seed)
        if console is not None and rt.is_main:
            console.print(f"[bold]ekdc distill[/bold] {recipe.name} -> {run.path}  ({rt.device}, {rt.precision_text}"
                          f"{', channels_last' if rt.channels_last else ''}{f', {rt.world} processes' if rt.world > 1 else ''})")
        data = load_data(recipe.data)
        say = (lambda text: console.print(text, soft_wrap=True)) if console is not None else (lambda text: None)
        tracker = open_tracker(recipe.tracking, run.path, recipe.model_dump(mode="json"), rt.is_main, say)
        with Reporter(run, rt, console, progress, tracker) as rep:
            config = _before_training(recipe, data, rt, run, rep, teachers_only)
            teachers, teacher_s = teacher_stage(recipe, data, rt, run, rep)
            if teachers_only:
                scores = {**evaluate_teachers(data, teachers, rt), "seconds": round(teacher_s, 2),
                          "train_images": len(data.train), "val_images": len(data.val)}
                rt.on_main(lambda: _io.write_json(run.teacher_metrics_path, scores))
                rt.barrier()
                return run
            student, student_s, student_info = student_stage(recipe, data, teachers, rt, run, rep, config)
            metrics = {**evaluate(recipe, data, student, teachers, rt), **student_info,
                       "seconds": round(teacher_s + student_s, 2), **plan_metrics(run)}
            _finish(run, rt, rep, metrics)
            tracker.final(metrics)
        rt.barrier()
    except _io.WriteError as err:
        raise _io.WriteError(f"{err}; the last good checkpoint in {run.path} is intact: free space, then continue "
                             "with 'ekdc distill RECIPE --resume'") from None
    finally:
        if tracker is not None:
            failed = sys.exc_info()[0]
            tracker.close("FINISHED" if failed is None else "KILLED" if issubclass(failed, KeyboardInterrupt)
                          else "FAILED")
        if lock is not None:
            lock.release()
    return run


def _before_training(recipe: Recipe, data, rt: Runtime, run: RunDir, rep: Reporter, teachers_only: bool):
    """Everything a run can know before the teachers train, checked first: what the folder scan left out,
    whether the cache can be used, and the student (planned now for ``student.latency_ms``, so that a
    budget nothing meets fails in minutes, not after the teachers). Returns the student's config."""
    for line in scan_summary(data.problems, "data"):  # the cheap part of 'ekdc data check'
        rep.say(f"[yellow]warning:[/yellow] {line}")
    cache = recipe.distill.teacher_cache
    if cache.views and not teachers_only:
        check_cacheable(data)
        rt.on_main(lambda: check_room(cache, run.path, len(data.train), len(recipe.teachers), data.num_classes))
    skipped = data.skipped_files
    rep.say(f"data: {recipe.data.dataset}, {len(data.train)} training / {len(data.val)} validation images, "
            f"{data.num_classes} classes, {data.image_size}px, {data.loader} loader"
            + (f"; {skipped} unreadable files left out (data.skip_bad_files)" if skipped else ""))
    return None if teachers_only else planned_student_config(recipe, data, rt, run, rep)


def _finish(run: RunDir, rt: Runtime, rep: Reporter, metrics: dict) -> None:
    def write():
        _io.write_json(run.metrics_path, metrics)
        rep.log({"event": "done", **{k: metrics[k] for k in ("mode", "seconds", "teacher_ensemble_acc")},
                 "student_ensemble_acc": metrics["student"]["ensemble_acc"]})
        with contextlib.suppress(OSError):
            run.ckpt_dir.rmdir()

    rt.on_main(write)


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


