"""The model registry: ``@register_model`` on a factory, ``create_model(name, num_classes=..., **kw)``."""
from __future__ import annotations

import difflib
from typing import Callable

import torch.nn as nn

from ..errors import UserError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, list(_MODELS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(list_models())}"
    return f"unknown architecture '{name}'{hint}"


def check_model_name(name: str) -> None:
    """For schema validators: raises ValueError, which the recipe loader turns into a one-line error."""
    if name not in _MODELS:
        raise ValueError(_unknown(name))


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
    if name not in _MODELS:
        raise UserError(_unknown(name))
    model = _MODELS[name](num_classes=num_classes, **kwargs)
    model.arch = name
    return model
