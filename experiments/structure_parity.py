#!/usr/bin/env python3
"""Does a refactor change what a recipe trains? The same recipe (with the same overrides) distilled by two
checkouts of ekdc, one after the other, and their metrics.json compared key by key (times left out).

    git worktree add /tmp/before 56d0dc5^          # the code before the structure change (issue 20)
    python experiments/structure_parity.py /tmp/before recipes/quickstart.yaml
    python experiments/structure_parity.py /tmp/before recipes/cifar10-limited.yaml \\
        --set data.per_class=200 --set distill.epochs=5 --set teachers.0.train.epochs=3 \\
        --set teachers.1.train.epochs=3 --set teachers.2.train.epochs=3

Prints every value that differs (or that they are identical) and exits 1 if any does. The older checkout
may not record some keys (precision, for one): a key only one side has is listed, not counted.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMES = ("seconds", "images_per_s")


def distill(checkout: Path, recipe: Path, sets: list[str], out: Path) -> dict:
    # -P: the working directory (this checkout, where relative data roots are read from) is not put on
    # sys.path, so PYTHONPATH decides which ekdc runs
    cmd = [sys.executable, "-P", "-m", "ekdc", "distill", str(recipe), "-q", "--out", str(out)]
    cmd += [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    where = subprocess.run([sys.executable, "-P", "-c", "import ekdc; print(ekdc.__file__)"], cwd=ROOT, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(checkout), f"{where} is not {checkout}'s ekdc"
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def flat(d, prefix=""):
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else enumerate(d)):
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list)):
            out.update(flat(v, key + "."))
        elif not any(t in key for t in TIMES):
            out[key] = v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path, help="the other checkout (a git worktree)")
    ap.add_argument("recipe", type=Path)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    recipe = args.recipe.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        a = flat(distill(args.before.resolve(), recipe, args.set, Path(tmp) / "before"))
        b = flat(distill(ROOT, recipe, args.set, Path(tmp) / "after"))
    only = sorted(set(a) ^ set(b))
    differ = [k for k in sorted(set(a) & set(b)) if a[k] != b[k]]
    for k in only:
        print(f"only in {'before' if k in a else 'after'}: {k} = {a.get(k, b.get(k))}")
    for k in differ:
        print(f"differs: {k}: before {a[k]}, after {b[k]}")
    acc = {k: v for k, v in b.items() if k.endswith("acc") or ".branch_acc." in k}
    print(f"{recipe.name}: {len(set(a) & set(b))} values compared, {len(differ)} differ; after: {acc}")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
