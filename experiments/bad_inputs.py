#!/usr/bin/env python3
"""Try every kind of bad input through the real CLI and write what ekdc answers to docs/ERRORS.md.

    python experiments/bad_inputs.py [--doc docs/ERRORS.md]

Each case must end with exit code 2 and exactly one line on stderr (no traceback); the script says
which case does not, and exits 1 if any.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _recipe(d: Path, **over) -> Path:
    r = {
        "name": "tiny", "precision": "fp32",
        "data": {"dataset": "synthetic", "num_classes": 4, "num_samples": 64, "image_size": 16},
        "teachers": [{"arch": "resnet8", "train": {"epochs": 1, "batch_size": 16}},
                     {"arch": "resnet8", "train": {"epochs": 1, "batch_size": 16}}],
        "student": {"trunk_width": 4, "branch_widths": [8]},
        "distill": {"epochs": 1, "batch_size": 16},
    }
    r.update(over)
    p = d / "recipe.yaml"
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    return p


def _full_disk() -> None:
    """A disk that fills up after 200 kB per file: writes past it fail with EFBIG."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))


def _hold_lock(run: Path) -> subprocess.Popen:
    """Another process that holds the run folder's lock, as a training process does."""
    code = ("import sys, time; from ekdc.run import RunDir, RunLock; lock = RunLock(RunDir(sys.argv[1])).acquire(); "
            "print(flush=True); time.sleep(86400)")  # held until killed: a slow machine takes minutes to reach the case
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    proc.stdout.readline()
    return proc


def _cases(d: Path) -> list[tuple[str, list[str]]]:
    ok = _recipe(d)
    (d / "not_yaml.yaml").write_text("data: [1, 2\nteachers: }\n")
    (d / "list.yaml").write_text("- a\n- b\n")
    (d / "twice.yaml").write_text(ok.read_text() + "name: other\n")  # the recipe's name, given again below
    (d / "empty_root" / "cat").mkdir(parents=True)
    (d / "corrupt.pt").write_bytes(b"\x80\x04 this is no checkpoint")
    (d / "corrupt.onnx").write_bytes(b"garbage, not protobuf")
    (d / "text.pt").write_text("a text file named .pt\n")
    (d / "empty.yaml").write_text("# nothing but a comment\n")
    (d / "one_class" / "cat").mkdir(parents=True)
    (d / "notes.png").write_text("my notes, where plan would put its plot\n")
    import torch
    import torchvision

    torch.save({"model": torchvision.models.resnet18(weights=None).state_dict()}, d / "tv.pth")
    run = d / "run"
    subprocess.run([sys.executable, "-m", "ekdc", "distill", str(ok), "--out", str(run), "-q"], check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "ekdc", "export", str(run), "--out", str(d / "export"), "--fold", "grouped"],
                   check=True, capture_output=True)
    wrong_input = d / "nhwc_input.onnx"
    _declare_nhwc(d / "export" / "student.onnx", wrong_input)
    shutil.copytree(run, d / "moved")  # a run copied without the teachers it trained
    shutil.rmtree(d / "moved" / "teachers")
    shutil.copytree(run, d / "nostudent")  # a run whose student was never trained (a failed run leaves no folder)
    (d / "nostudent" / "student.pt").unlink()
    (d / "candidates.yaml").write_text(yaml.safe_dump([{"trunk_width": 4, "branch_widths": [4]}]))
    bomb_root = d / "bomb_root"
    for c in ("cat", "dog"):
        (bomb_root / c).mkdir(parents=True)
        for i in range(4):
            torchvision.transforms.functional.to_pil_image(torch.rand(3, 8, 8)).save(bomb_root / c / f"{i}.png")
    _bomb(bomb_root / "cat" / "huge.png")
    torchvision.transforms.functional.to_pil_image(torch.rand(3, 8, 8)).save(d / "one_class" / "cat" / "0.png")
    # two good classes (bomb_root less its bomb); the same with one class of files that are no images
    two_root, half_bad = d / "two_root", d / "half_bad"
    for c in ("cat", "dog"):
        (two_root / c).mkdir(parents=True)
        (half_bad / c).mkdir(parents=True)
        for i in range(4):
            shutil.copy(bomb_root / c / f"{i}.png", two_root / c / f"{i}.png")
            if c == "cat":
                shutil.copy(bomb_root / c / f"{i}.png", half_bad / c / f"{i}.png")
            else:
                (half_bad / c / f"{i}.png").write_text("not an image\n")
    same_val = yaml.safe_load(ok.read_text()) | {"data": {"dataset": "imagefolder", "root": str(two_root),
                                                          "val_root": f"{two_root}/../{two_root.name}", "image_size": 8}}
    (d / "same_val.yaml").write_text(yaml.safe_dump(same_val, sort_keys=False))
    (d / "shards").mkdir()
    # shards of bomb_root (its bomb left out), and a copy of them with a shard cut short
    subprocess.run([sys.executable, "-m", "ekdc", "data", "shard", str(bomb_root), str(d / "sh"), "--shard-size", "4"],
                   check=True, capture_output=True)
    shutil.copytree(d / "sh", d / "sh_short")
    os.truncate(d / "sh_short" / "shard-000001.tar", 3000)
    # a recipe of FastNet students, and a grid whose teacher file was replaced after its cells were distilled
    fast = yaml.safe_load(ok.read_text()) | {"student": {"arch": "fastnet_student", "widths": [8, 16]}}
    (d / "fast.yaml").write_text(yaml.safe_dump(fast, sort_keys=False))
    from_files = yaml.safe_load(ok.read_text()) | {"teachers": [
        {"arch": "resnet8", "weights": f"{run}/teachers/resnet8.pt"},
        {"arch": "resnet8", "weights": f"{run}/teachers/resnet8_1.pt", "name": "second"}]}
    (d / "from_files.yaml").write_text(yaml.safe_dump(from_files, sort_keys=False))
    (d / "c5").mkdir()
    (d / "c5" / "teacher_files.json").write_text(json.dumps({
        "resnet8": {"path": f"{run}/teachers/resnet8.pt", "sha256": "0" * 64}}))
    # a folder with a class of one image (it would go to validation whole); a run trained on a folder to
    # which images were added afterwards (the seeded split re-drawn: validation holds training images)
    lonely, grown = d / "lonely_root", d / "grown_root"
    for root, classes in ((lonely, ("cat", "dog")), (grown, ("cat", "dog"))):
        for c in classes:
            (root / c).mkdir(parents=True)
            for i in range(6):
                torchvision.transforms.functional.to_pil_image(torch.rand(3, 8, 8)).save(root / c / f"{i}.png")
    (lonely / "deer").mkdir()
    torchvision.transforms.functional.to_pil_image(torch.rand(3, 8, 8)).save(lonely / "deer" / "0.png")
    folder_run = ["--set", "data.dataset=imagefolder", "--set", f"data.root={grown}", "--set", "data.image_size=8",
                  "--set", "data.val_per_class=2"]
    subprocess.run([sys.executable, "-m", "ekdc", "distill", str(ok), "--out", str(d / "grown_run"), "-q", *folder_run],
                   check=True, capture_output=True)
    for i in range(6, 15):
        torchvision.transforms.functional.to_pil_image(torch.rand(3, 8, 8)).save(grown / "cat" / f"{i}.png")
    shards = ["--set", "data.dataset=webdataset", "--set", f"data.urls={d}/sh/shard-000000.tar",
              "--set", f"data.val_urls={d}/sh/shard-000001.tar", "--set", "data.image_size=8"]
    return [  # (what, arguments); the "busy" run is locked by another process, "disk full" runs under a file-size limit
        ("recipe missing", ["distill", str(d / "missing.yaml")]),
        ("recipe not YAML", ["distill", str(d / "not_yaml.yaml")]),
        ("recipe not a mapping", ["distill", str(d / "list.yaml")]),
        ("a key given twice", ["distill", str(d / "twice.yaml")]),
        ("unknown key", ["distill", str(ok), "--set", "distill.temprature=2"]),
        ("a key inside a value", ["distill", str(ok), "--set", "data.augment=false", "--set", "data.augment.cutout=3"]),
        ("wrong type", ["distill", str(ok), "--set", "distill.epochs=many"]),
        ("negative epochs", ["distill", str(ok), "--set", "distill.epochs=-3"]),
        ("temperature <= 0", ["distill", str(ok), "--set", "distill.temperature=0"]),
        ("zero branches", ["distill", str(ok), "--set", "student.num_branches=0"]),
        ("branches != teachers", ["distill", str(ok), "--set", "student.num_branches=3"]),
        ("unknown architecture", ["distill", str(ok), "--set", "teachers.0.arch=resnet21"]),
        ("data root missing", ["distill", str(ok), "--set", "data.dataset=imagefolder", "--set", f"data.root={d}/nope"]),
        ("data root empty", ["distill", str(ok), "--set", "data.dataset=imagefolder", "--set", f"data.root={d}/empty_root"]),
        ("teacher checkpoint: other class count", ["distill", str(ok), "--out", str(d / "o1"), "--set", "data.num_classes=5",
                                                   "--set", f"teachers.0.checkpoint={run}/teachers/resnet8.pt"]),
        ("teacher checkpoint missing", ["distill", str(ok), "--out", str(d / "o2"), "--set", f"teachers.0.checkpoint={d}/gone.pt"]),
        ("teacher checkpoint corrupt", ["distill", str(ok), "--out", str(d / "o3"), "--set", f"teachers.0.checkpoint={d}/corrupt.pt"]),
        ("teacher checkpoint of another architecture", ["distill", str(ok), "--out", str(d / "o4"), "--set", "teachers.0.arch=resnet20",
                                                        "--set", f"teachers.0.checkpoint={run}/teachers/resnet8.pt"]),
        ("teacher: unknown torchvision model", ["distill", str(ok), "--set", "teachers.0.arch=torchvision:resnet19"]),
        ("teacher: unknown timm model", ["distill", str(ok), "--set", "teachers.0.arch=timm:convnext_nanoo"]),
        ("teacher: weights of another architecture", ["distill", str(ok), "--out", str(d / "o5"), "--set",
                                                      "teachers.0.arch=resnet20", "--set", f"teachers.0.weights={d}/tv.pth"]),
        ("teacher: pretrained weights offline", ["distill", str(ok), "--out", str(d / "o6"), "--set",
                                                 "teachers.0.arch=timm:test_resnet", "--set", "teachers.0.pretrained=true"]),
        ("teacher: onnx: and arch: together", ["distill", str(ok), "--set", f"teachers.0.onnx={d}/corrupt.onnx"]),
        ("teacher: onnx file that is not ONNX", ["distill", str(ok), "--out", str(d / "o7"), "--set",
                                                 "teachers.0.arch=null", "--set", f"teachers.0.onnx={d}/corrupt.onnx",
                                                 "--set", "teachers.0.train=null"]),
        ("--set with an unknown path", ["distill", str(ok), "--set", "student.depth=3"]),
        ("--set without =", ["distill", str(ok), "--set", "mode"]),
        ("output folder not writable (distill)", ["distill", str(ok), "--out", "/proc/ekdc"]),
        ("output folder already used", ["distill", str(ok), "--out", str(run)]),
        ("--resume with nothing to resume", ["distill", str(ok), "--resume", "--out", str(d / "never")]),
        ("device cuda without a GPU", ["distill", str(ok), "--set", "device=cuda"]),
        ("every loss weight of the mode 0", ["distill", str(ok), "--set", "mode=ce", "--set", "distill.weights.ce=0",
                                             "--set", "distill.weights.ens=0"]),
        ("run folder in use by another process", ["distill", str(ok), "--resume", "--out", str(d / "busy")]),
        ("disk full while training", ["distill", str(ok), "--out", str(d / "full")]),
        ("teacher cache: views of images that are not augmented", ["distill", str(ok), "--set", "data.augment=false",
                                                                   "--set", "distill.teacher_cache.views=4"]),
        ("teacher cache: path is a file", ["distill", str(ok), "--out", str(d / "o8"), "--set",
                                           "distill.teacher_cache.views=2", "--set", f"distill.teacher_cache.path={d}/corrupt.pt"]),
        ("student.latency_ms beside explicit widths", ["distill", str(ok), "--set", "student.latency_ms=0.5"]),
        ("plan: no student meets the budget", ["plan", str(ok), "--latency", "0.0001", "--candidates",
                                               str(d / "candidates.yaml"), "--repeats", "1"]),
        ("plan: --out is the recipe itself", ["plan", str(ok), "--latency", "1", "--out", str(ok)]),
        ("plan: a budget that is not a time", ["plan", str(ok), "--latency", "1 minute"]),
        ("plan: the plot beside --out is another file", ["plan", str(ok), "--latency", "1ms", "--out",
                                                         str(d / "notes.yaml")]),
        ("plan: a candidate of another student family", ["plan", str(d / "fast.yaml"), "--latency", "1", "--candidates",
                                                         str(d / "candidates.yaml")]),
        ("export: the teachers it trained are missing", ["export", str(d / "moved"), "--out", str(d / "e3")]),
        ("export: no run found", ["export", "--runs", str(d / "no_runs")]),
        ("export: run without a student", ["export", str(d / "nostudent")]),
        ("export: output folder not writable", ["export", str(run), "--out", "/proc/ekdc"]),
        ("export: --trt without TensorRT/GPU", ["export", str(run), "--out", str(d / "e2"), "--trt"]),
        ("export: unknown --fold", ["export", str(run), "--fold", "diagonal"]),
        ("bench: ONNX file missing", ["bench", str(d / "missing.onnx")]),
        ("bench: ONNX file corrupt", ["bench", str(d / "corrupt.onnx")]),
        ("bench: input not an NCHW image", ["bench", str(wrong_input)]),
        ("bench: --classes without --preprocess", ["bench", str(d / "export" / "student.onnx"), "--classes", "a,b"]),
        ("bench: --provider cuda without a GPU", ["bench", str(d / "export" / "student.onnx"), "--provider", "cuda"]),
        ("bench: --json not writable", ["bench", str(d / "export" / "student.onnx"), "--json", "/proc/ekdc/x.json"]),
        ("loss: unknown term", ["distill", str(ok), "--set", "distill.weights.dkd=1"]),
        ("loss: a KD setting out of range", ["distill", str(ok), "--set", "distill.kd.beta=-1"]),
        ("loss: confidence-weighted teachers in ekd", ["distill", str(ok), "--set", "distill.kd.teachers=confidence"]),
        ("data: unknown data set", ["distill", str(ok), "--set", "data.dataset=mnist"]),
        ("teacher: class names read as numbers", ["distill", str(ok), "--set", "teachers.0.classes=[1,2,3,4]"]),
        ("teacher: a class named twice", ["distill", str(ok), "--set", "teachers.0.classes=[a,a,b,c]"]),
        ("data: a decompression bomb in the folder", ["distill", str(ok), "--out", str(d / "o9"), "--set",
                                                      "data.dataset=imagefolder", "--set", f"data.root={bomb_root}",
                                                      "--set", "data.val_per_class=1"]),
        ("--resume with what the teachers depend on changed", ["distill", str(ok), "--resume", "--out", str(run),
                                                               "--set", "seed=5"]),
        ("data check: folder missing", ["data", "check", str(d / "nope")]),
        ("data check: a recipe whose data is no folder", ["data", "check", str(ok)]),
        ("data shard: folder missing", ["data", "shard", str(d / "nope"), str(d / "sh")]),
        ("shards: no validation shards", ["distill", str(ok), "--out", str(d / "o10"), "--set", "data.dataset=webdataset",
                                          "--set", f"data.urls={d}/shards/a.tar"]),
        ("compare: not a row", ["compare", str(ok), "--rows", "wide:ce"]),
        ("compare: a one-branch student in ekd", ["compare", str(ok), "--rows", "plain:ekd", "--out", str(d / "c1")]),
        ("export: --qad without --int8", ["export", str(run), "--out", str(d / "e4"), "--qad"]),
        ("data shard: OUT inside FOLDER", ["data", "shard", str(bomb_root), str(bomb_root / "shards")]),
        ("data shard: OUT holds the shards of an earlier write", ["data", "shard", str(bomb_root), str(d / "sh")]),
        ("shards: data.classes in another order than classes.txt", ["distill", str(ok), "--out", str(d / "o11"), *shards,
                                                                   "--set", "data.classes=[dog,cat]"]),
        ("shards: a shard cut short", ["distill", str(ok), "--out", str(d / "o12"), *shards, "--set",
                                       f"data.urls={d}/sh_short/shard-000001.tar"]),
        ("a setting that changes nothing: feature weight in avg_kd", ["distill", str(ok), "--set", "mode=avg_kd",
                                                                      "--set", "distill.weights.feat=1.0"]),
        ("a setting that changes nothing: DKD in mode ce", ["distill", str(ok), "--set", "mode=ce", "--set",
                                                            "distill.kd.loss=dkd"]),
        ("a setting that changes nothing: DKD with alpha and beta 0", ["distill", str(ok), "--set", "distill.kd.loss=dkd",
                                                                       "--set", "distill.kd.alpha=0", "--set",
                                                                       "distill.kd.beta=0"]),
        ("compare: a modifier that changes nothing", ["compare", str(ok), "--rows", "recipe,recipe+k0", "--out",
                                                      str(d / "c2")]),
        ("compare: a teacher file replaced since the grid's cells were distilled from it",
         ["compare", str(d / "from_files.yaml"), "--rows", "recipe", "--out", str(d / "c5")]),
        ("compare: two rows that train the same", ["compare", str(ok), "--rows", "ekd,recipe", "--out", str(d / "c3")]),
        ("compare: a seed listed twice", ["compare", str(ok), "--seeds", "0,0", "--out", str(d / "c6")]),
        ("data shard: one class left once unreadable files are left out", ["data", "shard", str(half_bad),
                                                                          str(d / "sh_half")]),
        ("validation folder is the training folder", ["distill", str(d / "same_val.yaml"), "--out", str(d / "o14")]),
        ("recipe empty", ["distill", str(d / "empty.yaml")]),
        ("true where a number belongs", ["distill", str(ok), "--set", "distill.epochs=true"]),
        ("a float that is not finite", ["distill", str(ok), "--set", "distill.temperature=inf"]),
        ("teacher: weights file that is not a torch save", ["distill", str(ok), "--out", str(d / "o13"), "--set",
                                                            f"teachers.0.weights={d}/text.pt"]),
        ("data root is a file", ["distill", str(ok), "--set", "data.dataset=imagefolder", "--set", f"data.root={ok}"]),
        ("data check: one class folder", ["data", "check", str(d / "one_class")]),
        ("data check: --json inside the checked folder", ["data", "check", str(bomb_root), "--json",
                                                          str(bomb_root / "cat" / "check.json")]),
        ("data shard: a negative --seed", ["data", "shard", str(bomb_root), str(d / "sh2"), "--seed", "-1"]),
        ("bench: --json is the model itself", ["bench", str(d / "export" / "student.onnx"), "--json",
                                               str(d / "export" / "student.onnx")]),
        ("bench: --duration inf", ["bench", str(d / "export" / "student.onnx"), "--duration", "inf"]),
        ("export: --qad-epochs without --qad", ["export", str(run), "--out", str(d / "e5"), "--int8", "--qad-epochs",
                                                "2"]),
        ("data: a class with no training image", ["distill", str(ok), "--set", "data.dataset=imagefolder", "--set",
                                                  f"data.root={lonely}", "--set", "data.image_size=8"]),
        ("export: images added to the folder since training (the validation split holds training images)",
         ["export", str(d / "grown_run"), "--out", str(d / "e6")]),
        ("compare: a row that changes nothing in its mode", ["compare", str(ok), "--set", "mode=avg_kd", "--rows",
                                                             "recipe,recipe+feat", "--out", str(d / "c4")]),
    ]


def _bomb(path: Path, side: int = 20000) -> None:
    """A PNG whose header says side x side pixels (Pillow refuses it on opening, before decoding)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (side + 1)))
                     + chunk(b"IEND", b""))


def _declare_nhwc(src: Path, dst: Path) -> None:
    """The same model, its input declared [B,H,W,3]: not an image input bench can feed."""
    import onnx

    m = onnx.load(str(src))
    dims = m.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_value, dims[3].dim_value = dims[2].dim_value, 3
    onnx.save(m, str(dst))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", default=str(ROOT / "docs" / "ERRORS.md"))
    args = ap.parse_args()
    rows, bad = [], 0
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cases = _cases(d)
        import shutil

        shutil.copytree(d / "run", d / "busy")
        holder = _hold_lock(d / "busy")
        for what, argv in cases:
            res = subprocess.run([sys.executable, "-m", "ekdc", *argv], capture_output=True, text=True, cwd=d,
                                 env={**env, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(d / "torch-home")},
                                 preexec_fn=_full_disk if what.startswith("disk full") else None)
            lines = res.stderr.strip().splitlines()
            good = res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr
            bad += not good
            msg = (lines[0] if len(lines) == 1 else " / ".join(lines[-3:])).replace(tmp, "$TMP")
            shown = " ".join(shlex.quote(a.replace(tmp, "$TMP")) for a in argv)
            rows.append(f"| {what} | `ekdc {shown}` | {res.returncode} | `{msg.replace('|', '¦')}` |")
            print(f"{'ok ' if good else 'BAD'} {what}: exit {res.returncode}: {msg}", flush=True)
        holder.kill()
        holder.wait()
    text = "\n".join([
        "# What ekdc says to bad input",
        "",
        "Written by `python experiments/bad_inputs.py`: every case through the real CLI; each must end with",
        "exit code 2 and one line on stderr.",
        "",
        "| case | command | exit | stderr |",
        "|---|---|---:|---|",
        *rows,
        "",
    ])
    Path(args.doc).parent.mkdir(parents=True, exist_ok=True)
    tmp_doc = Path(args.doc + ".tmp")
    tmp_doc.write_text(text)
    tmp_doc.replace(args.doc)
    print(f"wrote {args.doc}; {bad} case(s) not handled as expected")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
