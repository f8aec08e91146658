"""Bench the cifar10-limited export against its teacher ensemble and write docs/BENCHMARKS.md.

    python experiments/bench_cifar10_limited.py [--export export] [--run RUN_DIR] [--doc docs/BENCHMARKS.md]

The equivalent of

    ekdc bench export/student.onnx export/student.fp16.onnx export/student.int8.onnx --batch 1,64 \\
        --data RUN_DIR --json docs/bench_cifar10_limited.json --plot docs/bench_cifar10_limited.png

through the library, then the command, the machine and the table as Markdown in the doc. The doc's
section sits between markers, so the rest of docs/BENCHMARKS.md is kept; every file is written atomically.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
from pathlib import Path

try:
    import ekdc  # noqa: F401
except ImportError:  # run from a checkout without installing it
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ekdc.errors import UserError

PROG = "bench_cifar10_limited"
FILES = ("student.onnx", "student.fp16.onnx", "student.int8.onnx")
REFERENCE = "teachers.onnx"
BEGIN, END = "<!-- ekdc-bench:cifar10_limited:begin -->", "<!-- ekdc-bench:cifar10_limited:end -->"


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--export", type=Path, default=Path("export"), help="folder written by 'ekdc export --fp16 --int8'")
    p.add_argument("--run", type=Path, default=None,
                   help="run folder whose validation split gives accuracy [default: the one the export names]")
    p.add_argument("--doc", type=Path, default=Path("docs/BENCHMARKS.md"), help="Markdown file to write")
    p.add_argument("--json", type=Path, default=Path("docs/bench_cifar10_limited.json"))
    p.add_argument("--plot", type=Path, default=Path("docs/bench_cifar10_limited.png"))
    p.add_argument("--batch", default="1,64", help="comma-separated batch sizes")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads [default: all usable cores]")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    p.add_argument("--runs", type=int, default=None, help="timed runs per batch size and round [default: ~1 s]")
    p.add_argument("--duration", type=float, default=None, help="seconds per batch size and round")
    return p.parse_args(argv)


def _check_export(folder: Path) -> None:
    if not folder.is_dir():
        raise UserError(f"export folder {folder}/ not found (run 'ekdc export RUN_DIR --fp16 --int8 --out {folder}')")
    missing = [f for f in (*FILES, REFERENCE) if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{folder}/ lacks {', '.join(missing)} (first: ekdc distill recipes/cifar10-limited.yaml, "
                        f"then ekdc export --fp16 --int8 --out {folder})")


def _run_folder(folder: Path, given: Path | None) -> Path:
    """--run, else the run folder in the export's manifest, else in student.onnx's metadata."""
    if given is not None:
        if not (given / "recipe.yaml").is_file():
            raise UserError(f"--run {given}: not an ekdc run folder (no recipe.yaml in it)")
        return given
    candidates = []
    manifest = folder / "manifest.json"
    if manifest.is_file():
        try:
            candidates.append(json.loads(manifest.read_text()).get("run_dir"))
        except (OSError, ValueError):
            pass
    from ekdc.onnx_graph import load_onnx

    meta = {p.key: p.value for p in load_onnx(folder / FILES[0]).metadata_props}
    candidates.append(meta.get("ekdc.run_dir"))
    for c in candidates:
        if c and (Path(c) / "recipe.yaml").is_file():
            path = Path(c)
            # shown in the doc's command line: relative to here when it lies below, so it reads anywhere
            return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    raise UserError(f"no run folder for accuracy: the one {folder}/ names is missing; pass --run RUN_DIR")


def _command(a: argparse.Namespace, run: Path) -> str:
    """The ``ekdc bench`` command line this script is the equivalent of."""
    parts = ["ekdc", "bench", *(str(a.export / f) for f in FILES), "--batch", a.batch, "--data", str(run),
             "--json", str(a.json), "--plot", str(a.plot)]
    if a.threads is not None:
        parts += ["--threads", str(a.threads)]
    if a.repeats != 3:
        parts += ["--repeats", str(a.repeats)]
    if a.runs is not None:
        parts += ["--runs", str(a.runs)]
    if a.duration is not None:
        parts += ["--duration", f"{a.duration:g}"]
    return shlex.join(parts)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _section(report: dict, command: str, script: str, doc: Path, a: argparse.Namespace) -> str:
    from ekdc.benchmark.report import markdown_table

    mc, st = report["machine"], report["settings"]
    budget = f"{st['runs']} runs" if st["runs"] else f"{st['duration_s']:g} s (at least {st['min_runs']} runs)"
    data = report.get("data") or {}
    plot_rel = os.path.relpath(a.plot, doc.parent)
    json_rel = os.path.relpath(a.json, doc.parent)
    lines = [
        BEGIN,
        "## cifar10-limited: EKD student against the teacher ensemble",
        "",
        f"Measured {_dt.date.today().isoformat()} with",
        "",
        "```",
        script,
        "```",
        "",
        "which runs the equivalent of",
        "",
        "```",
        command,
        "```",
        "",
        f"- **Machine:** {mc['cpu']}, {mc['cores']} cores ({mc['usable_cores']} usable); {mc['platform']}, "
        f"Python {mc['python']}.",
        f"- **Runtime:** onnxruntime {mc['onnxruntime']}, provider {mc['provider']}, "
        f"{_plural(mc['threads'], 'intra-op thread')}, 1 inter-op thread, sequential execution, graph "
        "optimisations ORT_ENABLE_ALL.",
        f"- **Method:** {_plural(st['repeats'], 'round')}; each round runs every model once, each in a fresh "
        f"process, in an order rotated every round; per batch size {st['warmup']} warm-up runs, then {budget}. Latency "
        "percentiles pool every round's samples.",
        f"- **Accuracy:** top-1 on the validation split of `{data.get('source', '?')}` "
        f"({data.get('images', '?')} images).",
        "",
        markdown_table(report),
        f"Reference: `{report['reference']}` (the teacher ensemble as one graph). params and MACs per image are "
        "counted over Conv/Gemm/MatMul weights (int8 and fp16 weights traced back to their stored tensors, so "
        "every precision counts the same). p50 is ms per batch; img/s = batch / mean latency; speedup = reference "
        "p50 / model p50 at that batch; memory ratio = reference peak / model peak, where peak is the peak "
        "resident memory of the process that loads and runs only that model; GFLOP/s = 2 x MACs x img/s at the "
        "largest batch; spread = (max - min) / median of the per-round p50, worst batch size.",
        "",
        f"![latency p50 against batch size]({plot_rel})",
        "",
        f"All figures, per round: [`{json_rel}`]({json_rel}).",
        END,
    ]
    return "\n".join(lines) + "\n"


def _merge(doc: Path, section: str) -> str:
    """Replace this script's section in ``doc``, or add it: other sections are someone else's."""
    old = doc.read_text() if doc.is_file() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        return head + section + ("\n" + tail if tail else "")
    if not old.strip():
        return "# Benchmarks\n\n" + section
    return old.rstrip("\n") + "\n\n" + section


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    a = _args(argv)
    console = Console(highlight=False)
    try:
        _check_export(a.export)
        run = _run_folder(a.export, a.run)
        try:
            batches = [int(b) for b in a.batch.split(",") if b.strip()]
        except ValueError:
            raise UserError(f"--batch {a.batch!r}: expected comma-separated integers such as 1,64") from None
        from ekdc._io import write_text
        from ekdc.benchmark import bench
        from ekdc.benchmark.report import bench_table

        report = bench([a.export / f for f in FILES], against=a.export / REFERENCE, batches=batches,
                       threads=a.threads, repeats=a.repeats, runs=a.runs, duration=a.duration, data=run,
                       json_path=a.json, plot_path=a.plot, console=console)
        console.print(bench_table(report))
        given = sys.argv[1:] if argv is None else argv
        script = shlex.join(["python", "experiments/bench_cifar10_limited.py", *given])
        write_text(a.doc, _merge(a.doc, _section(report, _command(a, run), script, a.doc, a)))
        console.print(f"wrote {a.doc}")
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
