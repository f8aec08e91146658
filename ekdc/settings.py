"""The one base of ekdc's own settings models (the recipe, ``data:``, loss-term and student-family settings).

A setting is plain data a person writes: an unknown key, ``nan``/``inf``, or ``true`` where a number
belongs is a mistake to name, not a value to coerce (pydantic's lax mode reads ``epochs: true`` as 1).
"""
from __future__ import annotations

import typing
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

_NUMBERS = (int, float)


def _number_slots(annotation) -> str:
    """Where a field holds numbers and no bools: 'value' (int, float, Optional of one), 'items' (a list
    of them), 'values' (a mapping to them), or '' (anything else, bools allowed)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _NUMBERS:
        return "value"
    if origin is Union:
        members = [a for a in args if a is not type(None)]
        return "value" if members and all(a in _NUMBERS for a in members) else ""
    if origin is list and len(args) == 1 and args[0] in _NUMBERS:
        return "items"
    if origin is dict and len(args) == 2 and args[1] in _NUMBERS:
        return "values"
    return ""


class StrictSettings(BaseModel):
    """Unknown keys, non-finite floats and bools given for numbers are refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        slots = _number_slots(field.annotation) if field is not None else ""
        given = {"value": [(None, v)], "items": list(enumerate(v)) if isinstance(v, list) else [],
                 "values": list(v.items()) if isinstance(v, dict) else []}.get(slots, [])
        for key, x in given:
            if isinstance(x, bool):
                which = "" if key is None else f"item {key}: " if slots == "items" else f"{key}: "
                raise ValueError(f"{which}must be a number, not {str(x).lower()}")
        return v
