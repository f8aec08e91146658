"""``distill``: a recipe in, a run folder out, in three stages: the teachers (trained here or loaded),
the EKD student, and the validation metrics. ``distill`` strings them together, holding the run
folder's lock throughout; what can be checked before the teachers train is checked first."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

from .. import _io
from ..data import load_data
from ..data.check import scan_summary
from ..data.fingerprint import record_or_check
from ..models import check_student, create_model
from ..plugins import write_used
from ..recipe import Recipe, dump_recipe
from ..recipe.inert import check_recipe
from ..run import RunDir, open_training_run
from ..tracking import check_available as check_tracking
from ..tracking import open_tracker
from ..training.runtime import Runtime, seed_everything, setup_runtime
from ..training.trainer import Reporter
from .evaluation import evaluate, evaluate_teachers, predict
from .planning import plan_metrics, planned_student_config
from .stages import student_stage, teacher_stage
from .teacher_cache import cache_root, check_cacheable, check_room

__all__ = ["distill", "predict"]


def distill(recipe: Recipe, out: str | Path | None = None, *, resume: bool = False, runs_root: str | Path = "runs",
            console=None, progress: bool = True, teachers_only: bool = False) -> RunDir:
    """Train (or load) the teachers, then the EKD student; write the run folder and return it.

    ``teachers_only`` stops after the teachers: they are saved (``teachers/<name>.pt``, loadable with
    ``weights:``) and scored on the validation split (``teachers/metrics.json``); ``--resume`` without it
    goes on to the student."""
    check_recipe(recipe)  # a setting that changes nothing is refused before anything runs
    rt = setup_runtime(recipe.device, recipe.precision, recipe.channels_last)
    check_tracking(recipe.tracking)  # a tracker without its library: one line, before anything runs
    keep_dir = out is not None and Path(out).is_dir()  # a folder the user made: emptied, never removed
    run, lock = _open_run(recipe, out, resume, runs_root, rt, keep_dir)
    tracker = None
    planned = False  # a budget nothing met is resumed with a new student.latency_ms: its run folder stays
    try:
        seed_everything(recipe.seed)
        if console is not None and rt.is_main:
            console.print(f"[bold]ekdc distill[/bold] {recipe.name} -> {run.path}  ({rt.device}, {rt.precision_text}"
                          f"{', channels_last' if rt.channels_last else ''}{f', {rt.world} processes' if rt.world > 1 else ''})")
        data = load_data(recipe.data)
        say = (lambda text: console.print(text, soft_wrap=True)) if console is not None else (lambda text: None)
        notes: list[str] = []
        rt.on_main(lambda: notes.append(record_or_check(run.path, data.index, resume)))  # --resume: the same data
        tracker = open_tracker(recipe.tracking, run.path, recipe.model_dump(mode="json"), rt.is_main, say)
        with Reporter(run, rt, console, progress, tracker) as rep:
            for note in filter(None, notes):
                rep.say(note)
            _before_training(recipe, data, rt, run, rep, teachers_only)
            planned = not teachers_only and recipe.student.latency_ms is not None
            config = None if teachers_only else planned_student_config(recipe, data, rt, run, rep)
            if config is not None:  # a student that breaks the protocol is named before any teacher trains
                check_student(create_model(recipe.student.arch, num_classes=data.num_classes, **config),
                              data.num_classes, data.image_size)
            teachers, teacher_s = teacher_stage(recipe, data, rt, run, rep)
            if teachers_only:
                _teachers_only_scores(data, teachers, teacher_s, rt, run, rep)
                return run
            student, student_s, student_info = student_stage(recipe, data, teachers, rt, run, rep, config)
            metrics = {**evaluate(recipe, data, student, teachers, rt), **student_info,
                       "seconds": round(teacher_s + student_s, 2), **plan_metrics(run), **data.read_problems()}
            _say_skipped(data, rep)
            _finish(run, rt, rep, metrics)
            tracker.final(metrics)
        rt.barrier()
    except _io.WriteError as err:
        if not resume and not planned and not _holds_progress(run):
            raise _io.WriteError(f"{err}; nothing had been trained yet, so {run.path} is removed: free space, then "
                                 "run it again") from None
        raise _io.WriteError(f"{err}; the last good checkpoint in {run.path} is intact: free space, then continue "
                             "with 'ekdc distill RECIPE --resume'") from None
    finally:
        failed = sys.exc_info()[0]
        if tracker is not None:
            tracker.close("FINISHED" if failed is None else "KILLED" if issubclass(failed, KeyboardInterrupt)
                          else "FAILED")
        if failed is not None and not resume and not planned and lock is not None and not _holds_progress(run):
            _remove_new_run(run, lock, keep_dir)
        elif lock is not None:
            lock.release()
    return run


def _teachers_only_scores(data, teachers, seconds: float, rt, run: RunDir, rep) -> None:
    """teachers/metrics.json of a ``--teachers-only`` run: each teacher's and the ensemble's validation scores."""
    scores = {**evaluate_teachers(data, teachers, rt), "seconds": round(seconds, 2), "train_images": len(data.train),
              "val_images": len(data.val), **data.read_problems()}
    _say_skipped(data, rep)
    rt.on_main(lambda: _io.write_json(run.teacher_metrics_path, scores))
    rt.barrier()


def _holds_progress(run: RunDir) -> bool:
    """Whether a run folder holds anything a --resume would go on from: a teacher, a stage checkpoint, the
    student, a plan (a new student.latency_ms resumes with it), a teacher-output cache."""
    p = run.path
    return (any((p / "teachers").glob("*.pt")) or any(run.ckpt_dir.glob("*.pt")) or run.student_path.exists()
            or run.plan_path.exists() or any((p / "teacher_cache").glob("*")))


def _remove_new_run(run: RunDir, lock, keep_dir: bool) -> None:
    """A new run that failed before anything worth resuming (its data, a teacher file, the first epoch):
    its folder goes, so that no empty numbered run is left behind (an --out folder that was there before
    stays, emptied)."""
    with contextlib.suppress(OSError):
        for p in run.path.iterdir():
            if p != run.lock_path:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    lock.release()
    if not keep_dir:
        with contextlib.suppress(OSError):
            os.rmdir(run.path)


def _say_skipped(data, rep: Reporter) -> None:
    skipped = data.read_problems()
    if skipped.get("skipped_samples") or skipped.get("short_shards"):
        rep.say(f"[yellow]warning:[/yellow] data.skip_bad_files: {skipped['skipped_samples']} samples skipped, "
                f"{len(skipped['short_shards'])} shards shorter than their shards.json says, "
                f"{skipped.get('lost_samples', 0)} samples missing from them (metrics.json lists them)")


def _before_training(recipe: Recipe, data, rt: Runtime, run: RunDir, rep: Reporter, teachers_only: bool) -> None:
    """Everything a run can know before the teachers train, checked first: what the folder scan left out
    and whether the cache can be used. (The student is planned next, for ``student.latency_ms``, so that a
    budget nothing meets fails in minutes, not after the teachers.)"""
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


def _finish(run: RunDir, rt: Runtime, rep: Reporter, metrics: dict) -> None:
    def write():
        _io.write_json(run.metrics_path, metrics)
        rep.log({"event": "done", **{k: metrics[k] for k in ("mode", "seconds", "teacher_ensemble_acc")},
                 "student_ensemble_acc": metrics["student"]["ensemble_acc"]})
        with contextlib.suppress(OSError):
            run.ckpt_dir.rmdir()

    rt.on_main(write)


def _open_run(recipe: Recipe, out, resume: bool, runs_root, rt: Runtime, keep_dir: bool = True):
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
            write_used(recipe, run.path)  # the plugins the recipe names: export can say which is missing
        if recipe.distill.teacher_cache.views:
            cache_root(recipe.distill.teacher_cache, run.path)

    try:
        rt.on_main(prepare_folder)
    except BaseException:
        if lock is not None:
            if resume:
                lock.release()
            else:  # a new folder half-prepared (a full disk, say): nothing of it is left
                _remove_new_run(run, lock, keep_dir)
        raise
    return run, lock


