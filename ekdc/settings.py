"""The one base of ekdc's own settings models (the recipe, ``data:``, loss-term and student-family settings).

A setting is plain data a person writes: an unknown key, ``nan``/``inf``, or ``true`` where a number
belongs is a mistake to name, not a value to coerce (pydantic's lax mode reads ``epochs: true`` as 1).
"""
from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

_NUMBERS = (int, float)
_UNIONS = (Union, types.UnionType)  # Optional[int] and int | None


def _bool_for_number(annotation, value: Any) -> Optional[str]:
    """What is wrong where ``value`` holds a bool that ``annotation`` reads as a number ('must be a number, not
    true', after 'item 1: ' or 'key: ' inside a list, tuple or mapping); None where there is none (or a bool is
    one of the types the field takes)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _bool_for_number(args[0], value)
    if annotation in _NUMBERS:
        return f"must be a number, not {str(value).lower()}" if isinstance(value, bool) else None
    if origin in _UNIONS:
        members = [a for a in args if a is not type(None)]
        if isinstance(value, bool):  # lax mode would make it the number member's: wrong unless a member takes bools
            plain = [typing.get_args(a)[0] if typing.get_origin(a) is Annotated else a for a in members]
            takes_bool = any(a is bool or a is Any or (typing.get_origin(a) is typing.Literal
                                                       and any(isinstance(x, bool) for x in typing.get_args(a)))
                             for a in plain)
            wrong = any(a in _NUMBERS for a in plain) and not takes_bool
            return f"must be a number, not {str(value).lower()}" if wrong else None
        found = (_bool_for_number(a, value) for a in members)
        return next((f for f in found if f), None)
    if not args:  # bare list, dict, ...: nothing says their items are numbers
        return None
    if origin in (list, tuple, set, frozenset) and isinstance(value, (list, tuple, set, frozenset)):
        for i, item in enumerate(value):
            item_type = args[0] if origin is not tuple or (len(args) == 2 and args[1] is ...) else \
                (args[i] if i < len(args) else None)
            inner = _bool_for_number(item_type, item) if item_type is not None else None
            if inner is not None:
                return f"item {i}: {inner}"
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        for key, item in value.items():
            inner = _bool_for_number(args[1], item)
            if inner is not None:
                return f"{key}: {inner}"
    return None


class StrictSettings(BaseModel):
    """Unknown keys, non-finite floats and bools given for numbers are refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        wrong = _bool_for_number(field.annotation, v) if field is not None else None
        if wrong is not None:
            raise ValueError(wrong)
        return v
