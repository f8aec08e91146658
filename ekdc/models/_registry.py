"""The model registries: ``@register_model`` on a factory, ``create_model(name, num_classes=..., **kw)``;
and the students (``@register_student``, ``student.arch`` in a recipe), which are models too.

A student family is a factory ``(num_classes, num_branches, **settings) -> nn.Module`` whose module keeps
the student protocol (``FoldableStudent``); ``settings`` is the pydantic model of its own ``student:``
keys (None for ``ekd_student``, whose keys are the recipe schema's ``StudentConfig`` fields).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Callable, Optional, Protocol

import torch.nn as nn

from ..errors import UserError

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if fn.__name__ in _MODELS and _MODELS[fn.__name__] is not fn:
        raise ValueError(f"a model named '{fn.__name__}' is registered already: give the factory another name")
    _MODELS[fn.__name__] = fn
    return fn


class FoldableStudent(Protocol):
    """What distill, evaluation, export and compare need of a student."""

    config: dict  # its factory's keyword arguments (num_branches included): saved, and rebuilt from
    num_branches: int
    num_classes: int
    num_features: int  # each branch's pooled feature size (feature matching's adapters read it)
    adapters: Optional[nn.ModuleList]  # training-only: dropped from checkpoints and folds
    fold_layouts: tuple[str, ...]  # the layouts ``fold`` takes (``ekdc export --fold``)

    def __call__(self, x, return_branches: bool = False): ...  # mean logits, or BranchOutputs
    def set_adapters(self, teacher_dims: list[int]) -> None: ...
    def fold(self, layout: str) -> nn.Module: ...  # one eval-mode graph computing the mean logits


@dataclasses.dataclass(frozen=True)
class PlanSpace:
    """How ``ekdc plan`` searches a student family for a latency budget."""

    # (the recipe student's factory keywords) -> the default candidates, each a mapping of the family's own
    # keys (what a ``--candidates`` file would hold); keys a candidate leaves out come from ``kept`` or defaults
    grid: Callable[[dict], list[dict]]
    # a config's number of resolution stages: ``ekdc compare`` plans its equal-latency student among the
    # candidates of the recipe student's depth, so that the two differ in width and branches only
    stages: Callable[[dict], int]
    kept: tuple[str, ...] = ()  # keys a candidate takes from the recipe's student when it does not give them
    # (the chosen candidate, the next larger one, which missed the budget) -> the students between them, timed
    # in a second, finer pass: a grid coarse enough to time in minutes leaves a chosen student well under
    # its budget (``widths_between``; None: the family's grid is all that is timed)
    between: Optional[Callable[[dict, dict], list[dict]]] = None


def widths_between(a: dict, b: dict, step: int, keys: tuple[str, ...], most: int = 4) -> list[dict]:
    """Up to ``most`` configs evenly between ``a`` and ``b``, every width rounded to a multiple of ``step``.
    ``keys`` are the width keys (an int, or a list of ints of one length, each); [] when the two differ in
    any other key (depth, block kind) or in the number of stages, or are a step apart."""
    moved = [k for k in a.keys() | b.keys() if a.get(k) != b.get(k)]
    widths = {k: (_ints(a.get(k)), _ints(b.get(k))) for k in moved}
    if any(k not in keys or x is None or y is None or len(x) != len(y) for k, (x, y) in widths.items()):
        return []
    n = max((abs(q - p) for x, y in widths.values() for p, q in zip(x, y)), default=0) // step
    ks = sorted({round(i * n / (most + 1)) for i in range(1, most + 1)}) if n - 1 > most else range(1, n)
    rnd = lambda v: max(step, step * round(v / step))  # noqa: E731
    out: list[dict] = []
    for k_ in ks:
        mid = {**a}
        for k in moved:
            w = [rnd(p + k_ / n * (q - p)) for p, q in zip(*widths[k])]
            mid[k] = w if isinstance(a[k], list) else w[0]
        if mid not in out and mid != a and mid != b:
            out.append(mid)
    return out


def _ints(v) -> Optional[list]:
    """A width key's value as a list of widths; None when it is not an int or a list of ints (or is missing)."""
    v = v if isinstance(v, list) else [v]
    return v if all(isinstance(x, int) and not isinstance(x, bool) for x in v) else None


@dataclasses.dataclass(frozen=True)
class StudentFamily:
    name: str
    build: Callable[..., nn.Module]
    settings: Optional[type]  # pydantic model of its student: keys (None: StudentConfig's own, ekd_student)
    # (config, factor) -> a one-branch config of the same layout, every width scaled by factor: how
    # ``ekdc compare`` finds the one-branch student of equal MACs (None: the family has no such row)
    one_branch_widened: Optional[Callable[[dict, float], dict]] = None
    plan: Optional[PlanSpace] = None  # None: ``ekdc plan`` cannot search this family


_STUDENTS: dict[str, StudentFamily] = {}


def register_student(fn: Optional[Callable[..., nn.Module]] = None, *, settings: Optional[type] = None,
                     one_branch_widened: Optional[Callable[[dict, float], dict]] = None,
                     plan: Optional[PlanSpace] = None):
    """``@register_student`` or ``@register_student(settings=Model, one_branch_widened=fn, plan=PlanSpace(...))``
    on a student factory ``(num_classes, num_branches, **settings) -> module``."""

    def add(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if f.__name__ in _STUDENTS and _STUDENTS[f.__name__].build is not f:
            raise ValueError(f"a student named '{f.__name__}' is registered already: give the factory another name")
        _STUDENTS[f.__name__] = StudentFamily(f.__name__, f, settings, one_branch_widened, plan)
        return register_model(f)

    return add(fn) if fn is not None else add


def check_student(model: nn.Module, num_classes: int, image_size: int) -> None:
    """One forward of two blank images, before anything trains: a student (a plugin's above all) whose
    outputs break the protocol is named in one line, not met as an index error deep in a loss after the
    teachers have trained. Eval mode, so that BatchNorm's running statistics are left as they are."""
    import torch

    from ..plugins import origin

    name = getattr(model, "arch", type(model).__name__)
    who = f"student '{name}'{origin('students', name)}"
    n = int(getattr(model, "num_branches", 1))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(2, 3, image_size, image_size, device=next(model.parameters()).device)
            mean, branches = model(x), model(x, return_branches=True)
    except Exception as err:  # noqa: BLE001 - whatever the family raises, it is the family's to fix
        raise UserError(f"{who} fails on a batch of 2 images of {image_size} px: {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}") from None
    finally:
        model.train(was_training)
    logits = getattr(branches, "logits", None)
    shapes = {"model(x)": (tuple(getattr(mean, "shape", ())), (2, num_classes)),
              "model(x, return_branches=True).logits": (tuple(getattr(logits, "shape", ())), (n, 2, num_classes))}
    for call, (got, want) in shapes.items():
        if got != want:
            raise UserError(f"{who} returns {call} of shape {list(got)} for 2 images; expected {list(want)} "
                            f"({n} branch(es), {num_classes} classes)")


def list_students() -> list[str]:
    return sorted(_STUDENTS)


def unknown_student(name: str) -> str:
    """The one-line message for a student name no family has (the schema and ``get_student`` say the same)."""
    close = difflib.get_close_matches(name, list(_STUDENTS), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown student '{name}' ({hint}students: {', '.join(list_students())})"


def get_student(name: str) -> StudentFamily:
    if name not in _STUDENTS:
        raise UserError(unknown_student(name))
    return _STUDENTS[name]


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
