#!/usr/bin/env python3
"""Copy a recipe's exact training and validation images into OUT/train and OUT/val (ImageFolder layout).

    python experiments/copy_split.py recipes/cifar10-limited.yaml data/cifar10-5k

A machine without the whole folder (a lent GPU machine, with a size limit on what travels) then trains
on the very split this one does, with ``--set data.root=OUT/train --set data.val_root=OUT/val``: the
recipe's ``per_class`` and ``val_per_class`` then take every image there. Files are copied, not
re-encoded, so every pixel is the same.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ekdc import load_recipe
from ekdc.data import index_splits


def copy_split(recipe: str | Path, out: str | Path) -> None:
    index = index_splits(load_recipe(recipe).data)
    for split in ("train", "val"):
        part = index.part(split)
        for pos in part.positions:
            src = Path(part.source.files[pos])
            dst = Path(out) / split / index.classes[int(part.source.labels[pos])] / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        print(f"{split}: {len(part.positions)} images -> {Path(out) / split}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("out")
    args = ap.parse_args()
    copy_split(args.recipe, args.out)


if __name__ == "__main__":
    main()
