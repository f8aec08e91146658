"""Fold a trained student into one deploy-time module that computes the same function.

Each student family owns its fold (``student.fold(layout)``, RepVGG's way: the training-time form and
the deploy-time form, converted exactly): the EKD student's is ``ekdc.models.student_fold``, FastNet's
``ekdc.models.fastnet_student``. A family says which layouts it folds to (``fold_layouts``); ``none``, the
trained student as it is (eval mode, training-only adapters dropped), works for every family.

The tests check equivalence the RepVGG way (random BatchNorm statistics, ``eval()``, compare), and
``ekdc export`` compares every folded file with the trained student before writing it.
"""
from __future__ import annotations

import copy
from typing import Literal

import torch.nn as nn

from ..errors import UserError
from ..models.folding import fuse_conv_bn, merge_convs  # noqa: F401  (the helpers a family's fold uses)

# grouped: branches' later convolutions grouped; separate: N convolutions side by side; padded (FastNet):
# grouped, every width padded with zeros to a multiple of 16 (ekdc.models.folding.PAD_CHANNELS)
Layout = Literal["grouped", "separate", "padded", "none"]
LAYOUTS = ("grouped", "separate", "padded", "none")


def fold_layouts(student: nn.Module) -> list[str]:
    """The layouts worth timing for ``student`` (``--fold auto`` times each and keeps the fastest)."""
    return list(getattr(student, "fold_layouts", ()))


def accepted_layouts(student: nn.Module) -> list[str]:
    """What ``--fold`` takes for ``student``: its family's ``accepted_layouts`` where it has them (a layout
    that would give this student the same graph as another is not timed, but is taken), else ``fold_layouts``."""
    return list(getattr(student, "accepted_layouts", ())) or fold_layouts(student)


def _plain_student(student: nn.Module) -> nn.Module:
    """The trained student as is (eval mode), training-only adapters dropped: layout ``none``."""
    s = copy.deepcopy(student)
    s.adapters = None
    return s.eval()


def fold(student: nn.Module, layout: Layout = "grouped") -> nn.Module:
    """A module computing ``student(x)`` (the mean of branch logits) in eval mode, in one graph; ``none``
    returns the student unchanged but for dropped adapters."""
    if layout == "none":
        return _plain_student(student)
    if layout not in accepted_layouts(student):
        raise UserError(f"--fold {layout}: student {getattr(student, 'arch', type(student).__name__)} folds to "
                        f"{', '.join(accepted_layouts(student) + ['none'])}")
    was = student.training
    student.eval()
    try:
        return student.fold(layout).eval()
    finally:
        student.train(was)
