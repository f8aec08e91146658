"""The loss-term registry: one entry per term of the distillation objective.

A term says what it matches (``matches``), in which modes it applies (``modes``), what it needs from the
step (``needs``: the teachers' logits, their pooled features, the labels, the epoch), its default weight,
and its own settings (a small pydantic model). The recipe schema takes all of it from here:
``distill.weights.<term>`` is the term's weight, ``distill.<term>: {...}`` its settings. Adding a term is
one ``@register_term`` function (plus its test); the recipe, the teacher-output cache and DDP follow.

    @register_term("toy", matches="the branch logits' norm", modes=MODES, needs=("labels",),
                   settings=ToySettings)
    def toy(x: TermInputs, s: ToySettings) -> torch.Tensor: ...
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Callable, Optional

import torch
from pydantic import BaseModel

from ..models import BranchOutputs

# ce: the student alone; avg_kd: every branch from the teachers together; ekd: branch i from teacher i
MODES = ("ce", "avg_kd", "ekd")
NEEDS = ("teacher_logits", "teacher_features", "labels", "epoch")
# names a term may not take: they are the student schedule's own keys under distill:
RESERVED = frozenset({"epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "nesterov", "schedule",
                      "warmup_epochs", "label_smoothing", "ema_decay", "temperature", "weights", "teacher_cache",
                      "teacher_runtime"})


@dataclasses.dataclass
class TermInputs:
    """What a term is given at one training step."""

    out: BranchOutputs  # the student's per-branch logits [N,B,C], features, adapted features
    labels: torch.Tensor  # int64 [B]
    mode: str
    epoch: int  # 0-based
    epochs: int
    temperature: float
    label_smoothing: float
    teacher_logits: Optional[torch.Tensor] = None  # [M,B,C], one row per teacher (needs teacher_logits)
    teacher_features: Optional[list[torch.Tensor]] = None  # teacher m's pooled features [B,D_m]

    @property
    def num_branches(self) -> int:
        return int(self.out.logits.shape[0])


Compute = Callable[[TermInputs, Optional[BaseModel]], torch.Tensor]
Check = Callable[[Optional[BaseModel], str, int], Optional[str]]


@dataclasses.dataclass(frozen=True)
class LossTerm:
    name: str
    compute: Compute
    matches: str
    modes: tuple[str, ...]
    needs: frozenset[str]
    default_weight: float
    settings: Optional[type[BaseModel]]
    # (settings, mode, number of teachers) -> why these settings cannot apply, or None
    check: Optional[Check]

    @property
    def needs_teachers(self) -> bool:
        return bool(self.needs & {"teacher_logits", "teacher_features"})


_TERMS: dict[str, LossTerm] = {}


def register_term(name: str, *, matches: str, modes: tuple[str, ...] = MODES, needs: tuple[str, ...] = (),
                  default_weight: float = 0.0, settings: Optional[type[BaseModel]] = None,
                  check: Optional[Check] = None) -> Callable[[Compute], Compute]:
    """Register ``fn(inputs, settings) -> loss`` as the term ``name`` (settings is None without a model)."""
    if not name.isidentifier() or name in RESERVED:
        raise ValueError(f"a loss term cannot be named {name!r} (an identifier, and not one of distill's own keys)")
    bad = [m for m in modes if m not in MODES] + [n for n in needs if n not in NEEDS]
    if bad:
        raise ValueError(f"loss term {name}: unknown mode or need {bad[0]!r} (modes: {MODES}; needs: {NEEDS})")

    def deco(fn: Compute) -> Compute:
        if name in _TERMS:
            raise ValueError(f"loss term {name!r} is registered already")
        _TERMS[name] = LossTerm(name, fn, matches, tuple(modes), frozenset(needs), float(default_weight), settings, check)
        return fn

    return deco


def unregister_term(name: str) -> None:
    """Remove a term (a test's own, say)."""
    _TERMS.pop(name, None)


def list_terms() -> list[str]:
    """The registered terms, in registration order."""
    return list(_TERMS)


def get_term(name: str) -> LossTerm:
    if name not in _TERMS:
        close = difflib.get_close_matches(name, list(_TERMS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise KeyError(f"unknown loss term '{name}'{hint}; terms: {', '.join(_TERMS)}")
    return _TERMS[name]


def terms_of_mode(mode: str) -> list[str]:
    """The terms a mode trains on (where their weight is above 0)."""
    return [n for n, t in _TERMS.items() if mode in t.modes]


def term_settings() -> dict[str, type[BaseModel]]:
    """Each term that has settings, and their model: the ``distill.<term>`` keys of a recipe."""
    return {n: t.settings for n, t in _TERMS.items() if t.settings is not None}
