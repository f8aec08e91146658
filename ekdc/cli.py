"""The ``ekdc`` command line: each command parses, calls the library, prints. Nothing else lives here."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from ._console import console
from ._console import show as _show
from ._stdout import guard_stdout, say_if_stopped
from .cli_data import data_app
from .errors import UserError

app = typer.Typer(
    name="ekdc",
    help="Ensemble Knowledge Distillation: distill teachers into a multi-branch student, export it, bench it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # help texts are plain text: Rich markup would take "[default: ...]" and "'ekdc[qad]'" for tags and drop them
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data_app, name="data")  # ekdc data check | shard (cli_data.py)


def _version(value: bool) -> None:
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def installed(pkg: str) -> str:  # read from the package metadata: nothing heavy is imported
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{pkg} {installed(pkg)}" for pkg in ("torch", "torchvision", "onnxruntime", "onnx"))
    console.print(f"ekdc {__version__} ({deps}; Python {sys.version.split()[0]})", soft_wrap=True)
    raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="Show ekdc's version and its runtime's, and exit.")):
    del version  # acted on by _version, before any command


@app.command()
def distill(
    recipe: Path = typer.Argument(..., help="YAML recipe (see recipes/)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder [default: runs/<recipe name>, numbered if taken]."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a recipe field: key.path=value (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run from its last checkpoint."),
    runs_root: Path = typer.Option(Path("runs"), "--runs", help="Where run folders go."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
    teachers_only: bool = typer.Option(False, "--teachers-only", help="Stop after the teachers: save and score them "
                                       "(teachers/metrics.json); later runs load them with weights:, and --resume "
                                       "without this flag goes on to the student."),
):
    """Train (or load) the teachers, then the EKD student, from a recipe."""
    from .recipe import load_recipe
    from .recipe.inert import check_recipe

    try:
        r = load_recipe(recipe, set_)  # before the heavy imports: a bad recipe is reported at once
    except UserError as err:
        if resume and out is not None:  # a name the run's plugin added, and the plugin is gone: say which
            from .plugins import missing_hint

            raise UserError(f"{err}{missing_hint(out)}") from None
        raise
    check_recipe(r, str(recipe))  # a setting that changes nothing, named
    from .distillation import distill as run_distill
    from .tables import metrics_table, teachers_table

    run = run_distill(r, out, resume=resume, runs_root=runs_root, console=console, progress=not quiet,
                      teachers_only=teachers_only)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, the table once
        return
    if teachers_only:
        _show(teachers_table(run.teacher_metrics(), title=f"{r.name}: teachers ({run.path / 'teachers'})"))
    elif run.metrics_path.exists():
        _show(metrics_table(run.metrics(), title=f"{r.name}: validation metrics ({run.path})"))


def export(
    run_dir: Optional[Path] = typer.Argument(None, help="Run folder [default: the newest under runs/]."),
    out: Path = typer.Option(Path("export"), "--out", "-o", help="Output folder."),
    fold: str = typer.Option("auto", "--fold", help="Branch layout: grouped, separate, padded (FastNet: channels to multiples of 16), none, or auto (timed on ONNX Runtime)."),
    calib: int = typer.Option(256, "--calib", help="Training images used to calibrate int8."),
    parity_images: int = typer.Option(0, "--parity-images", show_default=False,
                                      help="Validation images for parity and accuracy (0: all) [default: all]."),
    runs_root: Path = typer.Option(Path("runs"), "--runs", help="Where to look for the newest run."),
    teachers: bool = typer.Option(True, "--teachers/--no-teachers",
                                  help="Also write teachers.onnx (--no-teachers: the run's teachers are not on this machine)."),
    qad: bool = typer.Option(False, "--qad", help="With --int8: quantization-aware distillation (NVIDIA ModelOpt, "
                                                  "pip install 'ekdc[qad]') instead of post-training quantisation."),
    qad_epochs: Optional[int] = typer.Option(None, "--qad-epochs", show_default=False,
                                             help="QAD: fine-tuning epochs of the fake-quantised student [default: 2]."),
    qad_lr: Optional[float] = typer.Option(None, "--qad-lr", help="QAD: learning rate [default: the run's distill.lr / 50]."),
    qad_labels: bool = typer.Option(False, "--qad-labels", help="QAD without the teachers: fine-tune on the labels alone."),
    **formats: bool,
):
    """Fold the student's branches into one graph and export ONNX (fp32/fp16/int8) and a TensorRT plan."""
    from .deploy.export import export as run_export
    from .deploy.qad import QADSettings
    from .tables import export_table

    settings = QADSettings.from_flags(qad, qad_epochs, qad_lr, qad_labels)
    manifest = run_export(run_dir, out, fold_mode=fold, calib_images=calib, parity_images=parity_images,
                          runs_root=runs_root, console=console, teachers=teachers, qad=settings, **formats)
    _show(export_table(manifest))


def _with_format_flags(fn):
    """``fn`` with one flag per export format of the table (``--fp16``, ``--int8``, ``--trt``): the CLI
    learns the formats where export does, from ``ekdc.formats``."""
    import inspect

    from .formats import export_formats

    sig = inspect.signature(fn)
    fixed = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    flags = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                               default=typer.Option(False, f.flag, help=f.help))
             for f in export_formats() if f.flag is not None]
    fn.__signature__ = sig.replace(parameters=fixed + flags)
    return fn


app.command()(_with_format_flags(export))


@app.command()
def bench(
    models: List[Path] = typer.Argument(..., help="Exported ONNX files (or TensorRT plans)."),
    against: Optional[Path] = typer.Option(None, "--against", help="Reference model [default: teachers.onnx beside the first model]."),
    batch: str = typer.Option("1,8,64", "--batch", "-b", help="Comma-separated batch sizes."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads [default: all cores]."),
    provider: str = typer.Option("cpu", "--provider", help="cpu, cuda or tensorrt."),
    warmup: int = typer.Option(5, "--warmup", help="Warm-up runs per batch size."),
    runs: Optional[int] = typer.Option(None, "--runs", help="Timed runs per batch size and repeat."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Seconds per batch size and repeat (instead of --runs)."),
    repeats: int = typer.Option(3, "--repeats", help="Measurement rounds, models interleaved, each in a fresh process."),
    data: Optional[str] = typer.Option(None, "--data", help="Recipe or run folder whose validation split gives accuracy."),
    classes: Optional[str] = typer.Option(None, "--classes", help="A model from elsewhere: its output classes in "
                                          "order, comma-separated or @FILE (one a line), for accuracy."),
    preprocess: Optional[str] = typer.Option(None, "--preprocess", help="A model from elsewhere: raw ([0,1] RGB), "
                                             "imagenet, or mean/std as R,G,B/R,G,B, for accuracy."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the report as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of latency against batch size."),
):
    """Measure latency, throughput, memory and accuracy of models against the teacher ensemble."""
    from .benchmark import bench as run_bench
    from .benchmark.report import bench_table
    from .benchmark.valdata import parse_classes

    try:
        batches = [int(b) for b in batch.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--batch {batch!r}: expected comma-separated integers such as 1,8,64") from None
    report = run_bench(models, against=against, batches=batches, threads=threads, provider=provider, warmup=warmup,
                       runs=runs, duration=duration, repeats=repeats, data=data, json_path=json_path, plot_path=plot,
                       console=console, classes=parse_classes(classes), preprocess=preprocess)
    _show(bench_table(report))


@app.command()
def plan(
    recipe: Path = typer.Argument(..., help="YAML recipe: its data (image size, classes) and teachers (branches)."),
    latency: Optional[str] = typer.Option(None, "--latency", "-l", help="Budget: p50 latency per batch, in ms "
                                          "(0.6, or with a unit: 0.6ms, 600us) [default: the recipe's student.latency_ms]."),
    batch: int = typer.Option(1, "--batch", "-b", help="Batch size the budget is for."),
    provider: str = typer.Option("cpu", "--provider", help="cpu, cuda or tensorrt."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads (default: all usable cores)."),
    precision: str = typer.Option("fp32", "--precision", help="fp32, or int8 (plan for the quantised file)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the recipe with the chosen student here "
                                       "(and the plot beside it, .png); without it, the --set lines are printed."),
    candidates: Optional[Path] = typer.Option(None, "--candidates", help="YAML list of student: mappings to time "
                                              "instead of the default grid."),
    repeats: int = typer.Option(3, "--repeats", help="Measurement rounds, candidates interleaved."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of latency against MACs (default: beside --out)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every candidate's measurements as JSON."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a recipe field: key.path=value (repeatable)."),
):
    """Choose the student with the most MACs within a latency budget, timed on this machine before training."""
    from .plan import (
        NoStudentFits,
        parse_latency,
        plan_student,
        planned_yaml,
        read_candidates,
        set_lines,
    )
    from ._io import check_outputs
    from .recipe import load_recipe

    r = load_recipe(recipe, set_)
    budget = parse_latency(latency) if latency is not None else r.student.latency_ms
    if budget is None:
        raise UserError("give the budget: --latency MS (or student.latency_ms in the recipe)")
    derived = {"plot": "the plot beside --out"} if plot is None and out is not None else {}
    plot = plot if plot is not None else (out.with_suffix(".png") if out is not None else None)
    check_outputs({"input recipe": recipe, **({"candidates file": candidates} if candidates else {})}, out=out, plot=plot,
                  json=json_path, derived=derived)
    try:
        result = plan_student(r, budget, batch=batch, provider=provider, threads=threads, precision=precision,
                              candidates=read_candidates(candidates, r) if candidates else None, repeats=repeats,
                              console=console)
    except NoStudentFits as err:  # the measurements still show which budget is within reach
        _show_plan(err.plan, plot, json_path)
        raise
    _show_plan(result, plot, json_path)
    if out is not None:
        from ._io import write_text

        write_text(out, planned_yaml(r, result))
        console.print(f"wrote {out}: {r.name} with the student {result.chosen.short} ({result.chosen.p50_ms:.3f} ms); "
                      f"train it with 'ekdc distill {out}', export it with {result.export_flags}", soft_wrap=True)
    else:
        console.print(f"train it with: ekdc distill {recipe} " + " ".join(set_lines(r, result)) +
                      f"; export it with {result.export_flags}", soft_wrap=True)
    console.print(f"note: {result.holds_for}", soft_wrap=True)


@app.command()
def compare(
    recipe: Path = typer.Argument(..., help="YAML recipe: its data, teachers, student and mode."),
    rows: str = typer.Option("recipe,ce,plain:recipe", "--rows", "-r",
                             help="Comma-separated rows: [plain:|planned:]BASE[+dkd][+conf][+feat][+k<K>], BASE one of "
                                  "recipe, ce, avg_kd, ekd; plain: one branch of equal MACs, planned: one branch "
                                  "of equal measured latency."),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated seeds (each row trains once a seed)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder of the grid [default: runs/compare/<name>]."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Also write the report here (always in OUT/compare.json)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG of accuracy by row [default: OUT/compare.png]."),
    set_: List[str] = typer.Option([], "--set", "-s", help="Override a recipe field: key.path=value (repeatable)."),
    report_only: bool = typer.Option(False, "--report-only", help="Train nothing: the report from the finished cells."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
):
    """Does the multi-branch student pay on this data? Rows over seeds, against equal-cost one-branch students."""
    from ._io import check_outputs, write_json
    from .comparison import compare as run_compare
    from .comparison import compare_table, parse_rows, parse_seeds, write_compare_plot
    from .recipe import load_recipe
    from .recipe.inert import check_recipe

    r = load_recipe(recipe, set_)
    check_recipe(r, str(recipe))  # what ekdc distill refuses, compare refuses
    parse_rows(rows)  # a bad row is named before any training
    seed_list = parse_seeds(seeds)  # a bad or repeated seed is named before any training
    check_outputs({"recipe": recipe}, json=json_path, plot=plot)  # before any training, as plan and bench do
    report = run_compare(r, rows, seed_list, out, console=console, progress=not quiet, report_only=report_only)
    if report_only and not any(row["acc"] for row in report["rows"]):
        raise UserError(f"--report-only: no finished cell in {report['out']} (run the grid without --report-only, "
                        "or give --out the grid's folder)")
    _show(compare_table(report))
    plot = plot or Path(report["out"]) / "compare.png"
    console.print(f"wrote {Path(report['out']) / 'compare.json'}, {write_compare_plot(report, plot)}")
    if json_path is not None:
        write_json(json_path, report)
        console.print(f"wrote {json_path}")


def _show_plan(result, plot: Optional[Path], json_path: Optional[Path]) -> None:
    from ._io import write_json
    from .plan import plan_table, write_plan_plot

    _show(plan_table(result))
    if plot is not None:
        console.print(f"wrote {write_plan_plot(result, plot)}")
    if json_path is not None:
        write_json(json_path, result.to_dict())
        console.print(f"wrote {json_path}")


@app.command("models")
def list_models_cmd(
    filter_: Optional[str] = typer.Option(None, "--filter", "-f", help="Search ekdc's registry, torchvision and timm "
                                          "(a shell pattern such as 'resnet*', or a part of a name)."),
):
    """List the architectures a recipe can name: teachers (teachers.N.arch) and student families (student.arch)."""
    from .plugins import failed_plugins, load_plugins

    load_plugins()  # the architectures installed plugins add are listed and searched too
    if filter_ is None:
        from .models import list_models, list_students

        students = list_students()
        console.print("ekdc's registry, teachers (teachers.N.arch: NAME):")
        for name in (n for n in list_models() if n not in students):
            console.print(f"  {name}")
        console.print("student families (student.arch: NAME):")
        for name in students:
            console.print(f"  {name}")
        console.print("torchvision classification models: arch: torchvision:NAME (e.g. torchvision:resnet50)\n"
                      "timm models: arch: timm:NAME (e.g. timm:efficientnet_b0, timm:resnet50.a1_in1k)\n"
                      "an ONNX classifier from any framework: onnx: PATH\n"
                      "search all three: ekdc models --filter PATTERN")
    else:
        from .teachers import search

        found = [name for names in search(filter_).values() for name in names]
        for name in found:
            console.print(name)
        if not found:
            console.print(f"no architecture matches '{filter_}' in ekdc's registry, torchvision or timm")
    # a plugin that did not load adds nothing: the listing is where its author looks, so it says why
    for dist, error in failed_plugins():
        print(f"warning: plugin {dist} failed to load, so none of its names are listed: {error}", file=sys.stderr)


def main() -> None:
    # standalone mode: Typer handles --help and its own usage errors (exit 2); ours end here
    out = guard_stdout()
    try:
        app()
    except UserError as err:
        print(f"ekdc: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except SystemExit as exit_:
        # Click turns Ctrl-C into exit code 130 and a bare newline; say what it means for the user's files
        # (every file is written atomically and each epoch is checkpointed: nothing is half-written)
        if exit_.code == 130:
            print("ekdc: interrupted; files already written are whole (a distill run continues with --resume)",
                  file=sys.stderr)
        raise
    finally:
        say_if_stopped(out)
        if "torch.distributed" in sys.modules:  # a command that never loaded torch joined no process group
            from .training.runtime import leave_process_group

            leave_process_group()
