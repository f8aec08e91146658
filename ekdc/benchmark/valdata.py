"""The validation images a bench scores models on: a recipe's or a run's split, and how each model is
fed them (ekdc's exports say so in their metadata; a model from elsewhere through --classes and
--preprocess)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..contract import IMAGENET_MEAN, IMAGENET_STD, META_RUN_DIR
from ..data import index_splits
from ..data.fingerprint import check_held_out
from ..errors import UserError
from ..onnx_graph import ModelInfo
from ..recipe import load_recipe
from ..run import RunDir
from .settings import Entry, PathLike, ValData, say


def resolve_data(data: Optional[PathLike], first: ModelInfo, console) -> Optional[ValData]:
    """``--data`` (a recipe or a run folder), else the run folder named in the first model's metadata."""
    if data is not None:
        recipe, source = _recipe_from(Path(data))
        return _load_val(recipe, source, explicit=True, run_path=Path(data) if Path(data).is_dir() else None,
                         console=console)
    run_dir = first.metadata.get(META_RUN_DIR)
    if not run_dir:
        say(console, "no accuracy: no --data given and the model names no run folder (pass --data RECIPE|RUN_DIR)")
        return None
    if not (Path(run_dir) / "recipe.yaml").is_file():
        say(console, f"no accuracy: the model's run folder {run_dir} is not there (pass --data RECIPE|RUN_DIR)")
        return None
    try:
        return _load_val(RunDir(run_dir).recipe(), run_dir, explicit=False, run_path=Path(run_dir), console=console)
    except UserError as err:  # found, not asked for: a note, not a failure
        say(console, f"no accuracy: {err}")
        return None


def _recipe_from(path: Path):
    if not path.exists():
        raise UserError(f"--data {path}: no such recipe or run folder")
    if path.is_dir():
        return RunDir(path).recipe(), str(path)
    return load_recipe(path), str(path)


def _load_val(recipe, source: str, explicit: bool, run_path: Optional[Path] = None, console=None) -> ValData:
    index = index_splits(recipe.data)  # only the validation images are decoded
    if run_path is not None:  # a run's split: the images it held out, never ones it trained on
        note = check_held_out(run_path, index)
        if note:
            say(console, note)
    x, y = index.take("val")
    return ValData(x=x.numpy(), y=y.numpy().astype(np.int64, copy=False), classes=list(index.classes), source=source,
                    explicit=explicit)


def parse_preprocess(text: str) -> dict:
    """``raw`` (RGB in [0,1], what ekdc's exports take), ``imagenet``, or ``R,G,B/R,G,B`` (mean/std)."""
    t = text.strip().lower()
    if t == "raw":
        return {"mean": None, "std": None}
    if t == "imagenet":
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    try:
        mean, std = ([float(v) for v in part.split(",")] for part in t.split("/"))
        if len(mean) == len(std) == 3 and all(v > 0 for v in std):
            return {"mean": mean, "std": std}
    except ValueError:
        pass
    raise UserError(f"--preprocess {text!r}: expected raw, imagenet, or mean/std as R,G,B/R,G,B "
                    "(e.g. 0.485,0.456,0.406/0.229,0.224,0.225)")


def parse_classes(text: Optional[str]) -> Optional[list[str]]:
    """``--classes``: ``a,b,c``, or ``@FILE`` with one class name a line."""
    if text is None:
        return None
    if text.startswith("@"):
        try:
            # utf-8-sig: a byte-order mark (as Notepad saves) is not part of the first class name
            names = [line.strip() for line in Path(text[1:]).read_text(encoding="utf-8-sig").splitlines()
                     if line.strip()]
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"--classes {text}: cannot read the file ({getattr(err, 'strerror', None) or err})") from None
    else:
        names = [c.strip() for c in text.split(",") if c.strip()]
    if not names or len(set(names)) != len(names):
        raise UserError(f"--classes {text}: expected distinct class names")
    return names


def foreign_feed(classes: Optional[Sequence[str]], preprocess: Optional[str]) -> Optional[dict]:
    if classes is None and preprocess is None:
        return None
    if classes is None or preprocess is None:
        raise UserError("--classes and --preprocess go together: a model from elsewhere needs both for accuracy")
    return {"classes": list(classes), **parse_preprocess(preprocess)}


def _output_width(info) -> Optional[int]:
    """C of a model's [B,C] output: the graph's where it fixes it, else one image's through ONNX Runtime here
    (a TensorRT plan, which runs on a GPU only, is checked by the worker when it runs)."""
    if info.num_outputs is not None or info.runtime != "onnxruntime":
        return info.num_outputs
    from ..contract import ort_session

    try:
        session = ort_session(info.path, threads=1)
        x = np.zeros((info.fixed_batch or 1, 3, *info.input_hw), np.float32)
        return int(session.run([info.output_name], {info.input_name: x})[0].shape[1])
    except Exception:  # noqa: BLE001 - a model ONNX Runtime cannot run: the worker says so, in one line
        return None


def _feed_for(e: Entry, val: ValData, foreign: Optional[dict]) -> tuple[Optional[dict], Optional[str]]:
    """(how to feed this model the validation images, or the problem that rules accuracy out)."""
    h, w = int(val.x.shape[2]), int(val.x.shape[3])
    if e.info.input_hw is not None and tuple(e.info.input_hw) != (h, w):
        ih, iw = e.info.input_hw
        return None, f"validation images of {val.source} are {h}x{w} but {e.name} takes {ih}x{iw}"
    if e.info.from_ekdc:
        if len(e.info.classes) != len(val.classes):
            return None, f"{val.source} has {len(val.classes)} classes but {e.name} predicts {len(e.info.classes)}"
        model_classes = list(e.info.classes)
        if model_classes == list(val.classes):
            return {}, None
        missing = [c for c in val.classes if c not in model_classes]
        if missing:  # the same count of unrelated names: an accuracy would compare unrelated labels
            return None, (f"{val.source}'s class '{missing[0]}' is not among {e.name}'s classes "
                          f"({', '.join(model_classes[:4])}{', ...' if len(model_classes) > 4 else ''})")
        # the same classes in another order: the model's outputs read by name, in the data's order
        return {"class_index": [model_classes.index(c) for c in val.classes], "width": len(model_classes)}, None
    if foreign is None:
        return None, (f"{e.name} carries no ekdc metadata, so nothing says how to feed it: give --classes "
                      "(its outputs in order) and --preprocess")
    width = _output_width(e.info)
    if width is not None and width != len(foreign["classes"]):  # else the accuracy would read the wrong columns
        return None, f"--classes names {len(foreign['classes'])} classes but {e.name} outputs {width} values an image"
    missing = [c for c in val.classes if c not in foreign["classes"]]
    if missing:
        return None, f"--classes lacks the data's class '{missing[0]}'"
    return {"class_index": [foreign["classes"].index(c) for c in val.classes], "width": len(foreign["classes"]),
            "mean": foreign["mean"], "std": foreign["std"]}, None


def check_data_fits(val: ValData, entries: list[Entry], console, foreign: Optional[dict] = None) -> Optional[ValData]:
    """Each model gets the validation images at its input size, fed as it expects, or no accuracy."""
    for e in entries:
        e.feed, problem = _feed_for(e, val, foreign)
        if foreign is not None and e.info.from_ekdc:  # its metadata is the file's own truth: said, not silently
            say(console, f"--classes and --preprocess do not apply to {e.name}: its ekdc metadata says how to feed it")
        if problem is not None:
            if val.explicit and (e.info.from_ekdc or foreign is not None):
                raise UserError(f"--data: {problem}")
            say(console, f"no accuracy for {e.name}: {problem}")
    return val if any(e.feed is not None for e in entries) else None


def save_val(val: ValData, tmp: Path) -> tuple[str, str]:
    xp, yp = tmp / "val_x.npy", tmp / "val_y.npy"
    np.save(xp, val.x)
    np.save(yp, val.y)
    return str(xp), str(yp)
