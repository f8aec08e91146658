"""Weight files from anywhere: a bare state dict, ekdc's own checkpoints, and the checkpoint dicts that
torchvision's and timm's training scripts save (the state dict under ``model`` or ``state_dict``, with
their ``args`` as an ``argparse.Namespace`` beside it).

Files are read with ``torch.load(weights_only=True)``: tensors and plain data only, plus exactly the
harmless types those scripts store (``argparse.Namespace`` and paths), so a weight file cannot run code.
"""
from __future__ import annotations

import argparse
import os
import pathlib
from typing import Optional

import torch
import torch.nn as nn

from .._io import UNREADABLE_TORCH_FILE, existing_file
from ..errors import UserError

# what torchvision's references/classification/train.py and timm's train.py put into a checkpoint
# besides tensors: the parsed command line, which may hold paths
SAFE_TYPES = [argparse.Namespace, pathlib.Path, pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath,
              pathlib.PureWindowsPath]
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")


def read_weights(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(the state dict, the file's other fields) of a weight file; one line naming the file on failure."""
    path = existing_file(path, what, "a weight file")
    try:
        with torch.serialization.safe_globals(SAFE_TYPES):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE_TORCH_FILE as err:
        import re

        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", str(err))
        if found:  # a readable file that stores code objects: refused, not run
            hint = "; save model.state_dict(), not the model" if found.group(1).startswith("torch.nn") else ""
            raise UserError(f"{what} {path} holds a Python object ekdc does not load ({found.group(1)}{hint}); only tensors, "
                            "plain data and the training scripts' args are read") from None
        raise UserError(f"{what} {path} is corrupt or not a weight file (it cannot be read as tensors and plain data)") from None
    if not isinstance(obj, dict):
        raise UserError(f"{what} {path} holds a {type(obj).__name__}, not a state dict (save model.state_dict())")
    for key in STATE_DICT_KEYS:
        if isinstance(obj.get(key), dict):
            fields = {k: v for k, v in obj.items() if k != key}
            return _strip_prefix(obj[key]), fields
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _strip_prefix(obj), {}
    raise UserError(f"{what} {path} is neither a state dict nor a checkpoint with one under "
                    f"{', '.join(STATE_DICT_KEYS)}")


def _strip_prefix(sd: dict) -> dict[str, torch.Tensor]:
    """DistributedDataParallel's ``module.`` prefix, when every key has it."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def first_mismatch(model: nn.Module, sd: dict[str, torch.Tensor]) -> Optional[str]:
    """The first key or shape in which ``sd`` does not fit ``model``, in words; None if it fits."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in sd:
            return f"the model's '{k}' is missing from the file"
        if tuple(sd[k].shape) != tuple(v.shape):
            return f"'{k}' has shape {list(sd[k].shape)} in the file but {list(v.shape)} in the model"
    extra = next((k for k in sd if k not in own), None)
    return f"the file's '{extra}' is not in the model" if extra else None


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], path, what: str, arch: str) -> None:
    problem = first_mismatch(model, sd)
    if problem:
        raise UserError(f"{what} {path} does not fit {arch}: {problem}")
    model.load_state_dict(sd)
