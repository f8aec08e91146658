#!/usr/bin/env python3
"""Train a recipe's teachers on a lent GPU machine in one device call, each for as many epochs as its
time allows, and bring them home to be scored and shipped here.

A lent machine gives one call of at most 10 minutes, on a copy of this repository of at most 64 MiB,
without ../shared, pydantic or anything but the image's packages. So, on this machine:

    python experiments/gpu_teachers.py prepare      # the split (a 50 MB zip), wheels, and a working tree that fits

which copies the recipe's exact training and validation JPEGs into data/cifar10-split.zip (so the GPU trains
on the very split the teachers are scored on here), downloads the wheels the GPU image lacks into .whl/,
takes the tracked files of 1 MB or more (ONNX files, weights: 77 MB that the GPU does not need) out of the
index so that they do not travel (they stay on disk), and prints the device call:

    run(command="python3 experiments/gpu_teachers.py run --budget 500", carry=[".whl", "data/cifar10-split.zip"],
        timeout_s=590)

`run` (on the GPU machine) trains every teacher for 2 epochs at once to measure its throughput with the
others beside it, gives each the epochs that fit the time left (its warm-up the same fraction of them),
trains them all at once, and leaves in $OUT the runs (fp16 weights, logs, resolved recipes) as
teachers.tar.NN parts of at most 15 MB and summary.json (the epochs chosen, each teacher's accuracy there).
Then here:

    python experiments/gpu_teachers.py restore                     # the index as it was, right after the call
    python experiments/gpu_teachers.py unpack /work/.device/...   # the reply's files_at -> runs/gpu-teachers/
    python experiments/ship_teachers.py runs/gpu-teachers/* weights/cifar10-large

`unpack` checks that the split was copied for the recipe's data: settings and points each run's recipe
back at them, so that ship_teachers.py scores the weights here on the same validation split. Until
`restore`, do not commit: the index lacks the big files (restore refuses if HEAD moved).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "cifar10-large-teachers.yaml"
SPLIT = Path("data/cifar10-split.zip")  # one stored (not compressed) zip: 50,000 JPEGs travel as one file
WHEELS = Path(".whl")
# what the GPU image lacks of ekdc's needs (its typer, click, rich, PyYAML, onnx and onnxruntime do)
WHEEL_PACKAGES = ("pydantic", "pydantic_core", "annotated_types", "typing_inspection", "typing_extensions")
TRAVEL_LIMIT = 64 * 2**20  # the device tool's limit on what travels
SLIM_FROM = 2**20  # tracked files this large stay home
EXCLUDE_MARK = "# gpu_teachers.py: tracked files kept home (restore removes this block)"
PART_BYTES = 15 * 10**6  # under the 16 MiB a file that comes back may have
PROBE_EPOCHS = 2
PACK_SECONDS = 40  # kept back for writing the parts


# ---------------------------------------------------------------- here: prepare, unpack, restore
def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def _exclude_file(repo: Path) -> Path:
    return repo / _git(repo, "rev-parse", "--git-path", "info/exclude").strip()


def _saved_index(repo: Path) -> Path:
    return repo / _git(repo, "rev-parse", "--git-path", "gpu_teachers-index.json").strip()


def _head(repo: Path) -> str:
    return _git(repo, "rev-parse", "--verify", "-q", "HEAD").strip()


def slim_index(repo: Path, min_bytes: int = SLIM_FROM) -> list[str]:
    """Take tracked files of ``min_bytes`` or more out of the index (not off the disk) and ignore them, so
    that they do not travel to the device machine. Their index entries (staged content included) and HEAD
    are saved for ``restore_index``. Returns their paths."""
    saved, exclude = _saved_index(repo), _exclude_file(repo)
    if saved.exists():
        raise SystemExit("the index is already slimmed: `python experiments/gpu_teachers.py restore` first")
    entries = [e for e in _git(repo, "ls-files", "-s", "-z").split("\0") if e]  # "mode sha stage\tpath"
    big = [e for e in entries if (repo / e.split("\t", 1)[1]).is_file()
           and (repo / e.split("\t", 1)[1]).stat().st_size >= min_bytes]
    if not big:
        return []
    paths = [e.split("\t", 1)[1] for e in big]
    saved.write_text(json.dumps({"head": _head(repo), "entries": big}))
    _git(repo, "rm", "-q", "--cached", "--", *paths)
    text = exclude.read_text() if exclude.exists() else ""
    block = "\n".join([EXCLUDE_MARK, *("/" + p for p in paths), EXCLUDE_MARK]) + "\n"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    exclude.write_text(text + ("" if not text or text.endswith("\n") else "\n") + block)
    return paths


def restore_index(repo: Path) -> list[str]:
    """Put back the index entries ``slim_index`` took out, as they were, and drop its ignore block. Refused
    if a commit was made meanwhile (it would have recorded the files as deleted)."""
    saved, exclude = _saved_index(repo), _exclude_file(repo)
    if not saved.exists():
        return []
    state = json.loads(saved.read_text())
    if _head(repo) != state["head"]:
        raise SystemExit(f"HEAD moved since prepare ({state['head'][:12]} -> {_head(repo)[:12]}): a commit made "
                         f"meanwhile lacks the big files; undo it (git reset --soft {state['head'][:12]}), then "
                         "restore again")
    subprocess.run(["git", "-C", str(repo), "update-index", "-z", "--index-info"], check=True,
                   input="".join(e + "\0" for e in state["entries"]), text=True)
    text = exclude.read_text() if exclude.exists() else ""
    if EXCLUDE_MARK in text:
        head, _, tail = text.split(EXCLUDE_MARK, 2)
        exclude.write_text(head + tail.lstrip("\n"))
    saved.unlink()
    return [e.split("\t", 1)[1] for e in state["entries"]]


def travel_bytes(repo: Path, carry: list[Path]) -> int:
    """What the device call would send: tracked and untracked-not-ignored files, and the carried folders."""
    listed = _git(repo, "ls-files", "-z", "--cached", "--others", "--exclude-standard").split("\0")
    files = {repo / p for p in listed if p}
    for c in carry:
        files |= {f for f in (repo / c).rglob("*")} if (repo / c).is_dir() else {repo / c}
    return sum(f.stat().st_size for f in files if f.is_file())


def download_wheels(dest: Path) -> None:
    """The wheels of the versions installed here, for the GPU image's CPython 3.12 on x86-64."""
    from importlib.metadata import version
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in ("manylinux_2_28", "manylinux_2_17", "manylinux2014")
                 for a in ("--platform", f"{p}_x86_64")]
    for pkg in WHEEL_PACKAGES:
        if any(dest.glob(f"{pkg}-*.whl")):
            continue
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest),
                        f"{pkg}=={version(pkg)}"], check=True)


SPLIT_INFO = "split.json"  # in the zip: the data: settings of the recipe the split was copied for


def zip_folder(folder: Path, archive: Path, info: dict | None = None) -> None:
    """``folder``'s files in a stored zip (JPEGs do not compress), written whole or not at all."""
    tmp = archive.with_name(archive.name + ".part")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:
        if info is not None:
            z.writestr(SPLIT_INFO, json.dumps(info))
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(folder).as_posix())
    tmp.replace(archive)


def split_folder(split: Path) -> tuple[Path, dict | None]:
    """The ImageFolder split: ``split`` itself, or a zip of one unpacked afresh beside it; and the data:
    settings it was copied for, where the zip says."""
    if split.suffix != ".zip":
        return split, None
    folder = split.with_suffix("")
    shutil.rmtree(folder, ignore_errors=True)  # a warm machine keeps ignored folders: never an older split
    with zipfile.ZipFile(split) as z:
        z.extractall(folder)
    info = folder / SPLIT_INFO
    return folder, (json.loads(info.read_text()) if info.exists() else None)


def prepare(args) -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]
    from copy_split import copy_split
    archive = ROOT / args.split
    folder = archive.with_suffix("")
    shutil.rmtree(folder, ignore_errors=True)  # copied afresh from the recipe each time: never a stale split
    copy_split(args.recipe, folder)
    zip_folder(folder, archive, {"data": yaml.safe_load(Path(args.recipe).read_text())["data"]})
    shutil.rmtree(folder)
    download_wheels(ROOT / WHEELS)
    big = slim_index(ROOT)
    size = travel_bytes(ROOT, [WHEELS, args.split])
    print(f"kept home (out of the index, still on disk): {len(big)} files; would travel: {size / 2**20:.1f} MiB")
    if size > TRAVEL_LIMIT:
        restore_index(ROOT)
        raise SystemExit(f"{size / 2**20:.1f} MiB would travel, over the device tool's 64 MiB: index restored")
    print(f'device run: command="python3 experiments/gpu_teachers.py run --budget 500", '
          f'carry=["{WHEELS}", "{args.split}"], timeout_s=590\n'
          "right after it: python experiments/gpu_teachers.py restore; then: "
          "python experiments/gpu_teachers.py unpack FILES_AT")


def unpack(args) -> None:
    """$OUT's parts -> runs under ``args.runs``, each recipe pointed back at ``args.recipe``'s data."""
    files_at, runs = Path(args.files_at), Path(args.runs)
    if not (files_at / "summary.json").exists():
        raise SystemExit(f"{files_at}: no summary.json (did the run end?)")
    summary = json.loads((files_at / "summary.json").read_text())
    missing = [p for p in summary.get("parts", []) if not (files_at / p).exists()]
    if missing or not summary.get("parts"):
        raise SystemExit(f"{files_at}: parts {missing or 'none'} missing: see summary.json and the logs there")
    data = yaml.safe_load(Path(args.recipe).read_text())["data"]
    if (summary.get("split") or {}).get("data") != data:
        raise SystemExit(f"the runs trained on a split copied for other data: settings than {args.recipe}'s "
                         f"(summary.json's split: {summary.get('split')})")
    machine = summary.get("machine")
    shutil.rmtree(runs, ignore_errors=True)
    blob = b"".join((files_at / p).read_bytes() for p in summary["parts"])
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(runs, filter="data")
    for recipe in sorted(Path(args.runs).glob("*/recipe.yaml")):
        raw = yaml.safe_load(recipe.read_text())
        raw["data"] = data
        recipe.write_text(yaml.safe_dump(raw, sort_keys=False))
        if machine:  # ship_teachers.py records where the weights were trained
            (recipe.parent / "machine.txt").write_text(machine + "\n")
        print(f"{recipe.parent}: {', '.join(t.get('name') or t['arch'] for t in raw['teachers'])}")
    # beside the runs, not among them: `ship_teachers.py runs/gpu-teachers/*` takes every entry as a run
    runs.with_name(runs.name + "-summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def restore(args) -> None:
    paths = restore_index(ROOT)
    print(f"back in the index: {len(paths)} files" if paths else "nothing to restore")


# ---------------------------------------------------------------- there: run
def _install_wheels(env: dict) -> dict:
    """The carried wheels into /tmp/site, where pydantic is missing (the GPU image); the children's path."""
    import importlib.util
    wheels = [] if importlib.util.find_spec("pydantic") else sorted(str(p) for p in (ROOT / WHEELS).glob("*.whl"))
    site = "/tmp/site"
    if wheels:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", site, *wheels], check=True)
    path = [site] if wheels else []
    return {**env, "PYTHONPATH": os.pathsep.join([*path, str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _teacher_recipes(recipe: Path, runs: Path) -> dict[str, tuple[Path, dict]]:
    """One recipe per teacher (so each trains in its own process): name -> (its file, its train: mapping)."""
    raw = yaml.safe_load(recipe.read_text())
    runs.mkdir(parents=True, exist_ok=True)
    out = {}
    for t in raw["teachers"]:
        name = t.get("name") or t["arch"]
        path = runs / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**raw, "name": name, "teachers": [t]}, sort_keys=False))
        out[name] = (path, t["train"])
    return out


def _distill(python: str, recipe: Path, run: Path, split: Path, env: dict, epochs: int, warmup: float,
             log) -> subprocess.Popen:
    cmd = [python, "-m", "ekdc", "distill", str(recipe), "--teachers-only", "--out", str(run), "-q",
           "--set", f"data.root={split / 'train'}", "--set", f"data.val_root={split / 'val'}",
           "--set", f"teachers.0.train.epochs={epochs}", "--set", f"teachers.0.train.warmup_epochs={warmup}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _epochs_log(run: Path) -> list[dict]:
    log = run / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []


def _wait(procs: dict, deadline: float) -> dict[str, int]:
    codes = {}
    for name, p in procs.items():
        try:
            codes[name] = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            codes[name] = p.wait()
    return codes


def plan_epochs(probe: dict, seconds_left: float, hi: int) -> int:
    """As many epochs as fit ``seconds_left`` at the probe's throughput (measured with every teacher
    training at once, so a conservative figure once the first of them ends), after the probe's start-up
    and scoring time; 80% of it: a run still going at the deadline is killed, and lost."""
    train_seconds = 0.8 * (seconds_left - probe["overhead_s"])
    return max(0, min(hi, int(train_seconds * probe["images_per_s"] / probe["images"]))) if train_seconds > 0 else 0


def _half_checkpoint(path: Path) -> bytes:
    import torch
    ck = torch.load(path, map_location="cpu", weights_only=False)
    ck["state_dict"] = {k: v.half() if v.is_floating_point() else v for k, v in ck["state_dict"].items()}
    buf = io.BytesIO()
    torch.save(ck, buf)
    return buf.getvalue()


def pack(runs: list[Path], out: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """Each run's recipe.yaml, log.jsonl, teachers/metrics.json and teachers/*.pt (fp16) in one tar, cut
    into parts small enough to come back."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for run in runs:
            for f in [run / "recipe.yaml", run / "log.jsonl", run / "teachers" / "metrics.json",
                      *sorted((run / "teachers").glob("*.pt"))]:
                if not f.exists():
                    continue
                blob = _half_checkpoint(f) if f.suffix == ".pt" else f.read_bytes()
                info = tarfile.TarInfo(f"{run.name}/{f.relative_to(run)}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
    data = buf.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for i in range(0, len(data), part_bytes):
        parts.append(out / f"teachers.tar.{i // part_bytes:02d}")
        parts[-1].write_bytes(data[i:i + part_bytes])
    return parts


def run(args) -> None:
    start = time.monotonic()
    out = Path(args.out or os.environ.get("OUT", "/tmp/gpu-out"))
    out.mkdir(parents=True, exist_ok=True)
    # 4 threads a teacher: three processes share the machine's cores for decoding and the CPU side of a step
    env = _install_wheels({**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore",
                           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")})
    (split, split_info), runs = split_folder((ROOT / args.split).resolve()), ROOT / args.runs
    shutil.rmtree(runs, ignore_errors=True)  # a warm machine keeps ignored folders: no earlier call's runs
    recipes = _teacher_recipes(Path(args.recipe), runs)
    logs = {name: open(out / f"{name}.log", "w") for name in recipes}  # each teacher's output, probe and run
    summary = {"budget_s": args.budget, "split": split_info, "machine": _machine(), "teachers": {}}
    # 1. the probe: every teacher at once, 2 epochs (its warm-up the recipe's fraction of them)
    probes = {name: _distill(args.python, path, runs / "probe" / name, split, env, PROBE_EPOCHS,
                             round(PROBE_EPOCHS * _warmup_fraction(train), 2), logs[name])
              for name, (path, train) in recipes.items()}
    t_probe = time.monotonic()
    codes = _wait(probes, start + args.budget / 3)
    for name, code in codes.items():
        epochs = _epochs_log(runs / "probe" / name)
        if not epochs:
            summary["teachers"][name] = {"error": f"probe exit {code}, no epoch logged: see {name}.log"}
            continue
        wall = time.monotonic() - t_probe  # all ran at once: the last to end bounds each
        # the mean over its epochs: the first's start-up (cuDNN's search) makes it a conservative figure
        summary["teachers"][name] = {"probe": {
            "images_per_s": round(sum(e["images"] for e in epochs) / sum(e["seconds"] for e in epochs), 1),
            "images": epochs[-1]["images"], "overhead_s": round(wall - sum(e["seconds"] for e in epochs), 1)}}
    _write_summary(out, summary)
    # 2. the real runs, every teacher at once, each with the epochs that fit
    left = args.budget - (time.monotonic() - start) - PACK_SECONDS
    procs = {}
    for name, (path, train) in recipes.items():
        rec = summary["teachers"][name]
        if "probe" not in rec:
            continue
        epochs = plan_epochs(rec["probe"], left, args.max_epochs)
        if epochs < args.min_epochs:
            rec["error"] = f"only {epochs} epochs fit the {left:.0f} s left"
            continue
        warmup = round(epochs * _warmup_fraction(train), 2)
        rec.update(epochs=epochs, warmup_epochs=warmup)
        procs[name] = _distill(args.python, path, runs / name, split, env, epochs, warmup, logs[name])
    codes = _wait(procs, time.monotonic() + left)
    finished = []
    for name, code in codes.items():
        rec, metrics = summary["teachers"][name], runs / name / "teachers" / "metrics.json"
        rec["exit"] = code
        if metrics.exists():
            m = json.loads(metrics.read_text())["teachers"][0]
            rec.update(val_acc=m["acc"], macs=m["macs"])
            finished.append(runs / name)
    summary["parts"] = [p.name for p in pack(finished, out)]
    summary["wall_s"] = round(time.monotonic() - start, 1)
    _write_summary(out, summary)
    print(json.dumps(summary, indent=2))
    for f in logs.values():
        f.close()


def _warmup_fraction(train: dict) -> float:
    return train.get("warmup_epochs", 0) / train.get("epochs", 30)


def _write_summary(out: Path, summary: dict) -> None:
    """Written after the probe and at the end: a call cut short still says how far it got."""
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _machine() -> str:
    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{gpu}, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="here: the split, the wheels and a working tree that fits")
    p.add_argument("--recipe", default=str(RECIPE))
    p.add_argument("--split", default=str(SPLIT))
    p = sub.add_parser("run", help="there: probe, then train every teacher for the epochs that fit")
    p.add_argument("--recipe", default=str(RECIPE))
    p.add_argument("--split", default=str(SPLIT))
    p.add_argument("--runs", default="runs/gpu-teachers", help="run folders, under the repository "
                                                                       "(emptied first)")
    p.add_argument("--budget", type=float, default=500, help="seconds for everything, the probe and packing included")
    p.add_argument("--min-epochs", type=int, default=10, help="a teacher that cannot have these is not trained")
    p.add_argument("--max-epochs", type=int, default=120)
    p.add_argument("--out", default=None, help="[default: $OUT]")
    p.add_argument("--python", default=sys.executable)
    p = sub.add_parser("unpack", help="here: the parts that came back -> run folders")
    p.add_argument("files_at")
    p.add_argument("--recipe", default=str(RECIPE), help="whose data: the runs' recipes point at")
    p.add_argument("--runs", default="runs/gpu-teachers")
    sub.add_parser("restore", help="here: the index as before prepare")
    args = ap.parse_args(argv)
    {"prepare": prepare, "run": run, "unpack": unpack, "restore": restore}[args.cmd](args)


if __name__ == "__main__":
    main()
