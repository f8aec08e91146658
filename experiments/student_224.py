#!/usr/bin/env python3
"""The default 224 px student against the teachers it replaces: MACs, and latency measured by `ekdc bench`.

    python experiments/student_224.py [--recipe recipes/imagefolder-224.yaml] [--classes 100] [--batch 1,8]

Speed does not depend on the weights, so both sides are random: the recipe's student (folded, as
export writes it) and its teachers (torchvision and timm models at their own 224 px input and ImageNet
normalisation), each exported to ONNX under ekdc's contract and benched in one run.
Writes docs/STUDENT-224.md.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/imagefolder-224.yaml")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--out", default="runs/student_224")
    args = ap.parse_args(argv)
    import torch

    from ekdc import load_recipe
    from ekdc.contract import contract_metadata
    from ekdc.deploy.fold import fold
    from ekdc.deploy.onnx import DeployModel, TeacherEnsemble, export_onnx
    from ekdc.models import count_macs, create_model
    from ekdc.teachers import Preprocess, Teacher, parse_arch
    from ekdc.contract import IMAGENET_MEAN, IMAGENET_STD
    from ekdc.teachers.torch_models import build, final_linear

    r = load_recipe(ROOT / args.recipe, ["data.root=."])
    size, n = r.data.image_size, args.classes
    out = ROOT / args.out
    out.mkdir(parents=True, exist_ok=True)
    classes = [f"c{i}" for i in range(n)]
    meta = lambda kind: contract_metadata(classes=classes, input_size=size, kind=kind, precision="fp32",  # noqa: E731
                                          recipe=r.name, run_dir=out)
    torch.manual_seed(0)
    student = create_model("ekd_student", num_classes=n, **r.student.model_kwargs()).eval()
    s_macs = count_macs(student, size)
    export_onnx(DeployModel(fold(student, "grouped"), IMAGENET_MEAN, IMAGENET_STD), out / "student.onnx", size, meta("student"))
    teachers, t_macs = [], {}
    for t in r.teachers:
        model = build(t.arch, n, False, t.arch).eval()
        t_macs[t.arch] = count_macs(model, size)
        teachers.append(Teacher(model, Preprocess(size, IMAGENET_MEAN, IMAGENET_STD), name=t.name, arch=t.arch,
                                source=parse_arch(t.arch)[0], head=final_linear(model, parse_arch(t.arch)[0])))
    export_onnx(TeacherEnsemble(teachers).eval(), out / "teachers.onnx", size, meta("teachers"))
    cmd = [sys.executable, "-m", "ekdc", "bench", str(out / "student.onnx"), "--batch", args.batch, "--json",
           str(out / "bench.json")]
    print("$", shlex.join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    bench = json.loads((out / "bench.json").read_text())
    total = sum(t_macs.values())
    s = next(m for m in bench["models"] if m["name"] == "student.onnx")
    lines = ["# The 224 px student against its teachers", "",
             "Written by `" + shlex.join(["python", "experiments/student_224.py", *(argv or sys.argv[1:])])
             + "` on this machine (2 CPU cores; ONNX Runtime, fp32).", "",
             f"Student of `{args.recipe}` ({r.student.num_branches} branches, {r.student.stem} stem, {r.student.block} "
             f"blocks, {n} classes), folded as export folds it; teachers as the recipe names them, random weights.", "",
             "| model | MACs per image |", "|---|---:|",
             f"| student | {s_macs / 1e6:.1f}M |", *[f"| teacher {a} | {m / 1e6:.1f}M |" for a, m in t_macs.items()],
             f"| teacher ensemble | {total / 1e6:.1f}M |", "",
             f"The student has {100 * s_macs / total:.1f}% of the ensemble's MACs.", ""]
    for b in bench["batches"]:
        ref = next(m for m in bench["models"] if m["is_reference"])
        lines.append(f"- batch {b}: student p50 {s['latency_ms'][str(b)]['p50']:.2f} ms, teacher ensemble "
                     f"{ref['latency_ms'][str(b)]['p50']:.1f} ms: {s['vs_reference']['speedup'][str(b)]:.1f}x faster")
    (ROOT / "docs" / "STUDENT-224.md").write_text("\n".join(lines) + "\n")
    print("wrote docs/STUDENT-224.md")


if __name__ == "__main__":
    main()
