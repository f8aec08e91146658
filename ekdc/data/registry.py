"""The data-set registry: a name a recipe's ``data.dataset`` can give, and the factory that turns
``data:`` into image sources (``sources.py``), as timm's model registry turns a name into a model.

    @register_dataset("my_shards")
    def my_shards(cfg) -> Sources: ...      # Sources(train=..., val=... or None)
"""
from __future__ import annotations

import difflib
from typing import Callable, NamedTuple, Optional

from .sources import ImageSource


class Sources(NamedTuple):
    train: ImageSource
    val: Optional[ImageSource] = None  # None: the validation split is carved from train (random access only)


Factory = Callable[..., Sources]
_DATASETS: dict[str, Factory] = {}


def register_dataset(name: str) -> Callable[[Factory], Factory]:
    def deco(fn: Factory) -> Factory:
        if name in _DATASETS:
            raise ValueError(f"data set {name!r} is registered already")
        _DATASETS[name] = fn
        return fn

    return deco


def unregister_dataset(name: str) -> None:
    _DATASETS.pop(name, None)


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def check_dataset_name(name: str) -> None:
    """For the recipe schema: a ValueError (one line, the closest name suggested) for an unknown name."""
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, list(_DATASETS), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise ValueError(f"unknown data set '{name}' ({hint}known: {', '.join(list_datasets())})")


def get_dataset(name: str) -> Factory:
    check_dataset_name(name)
    return _DATASETS[name]
