"""The one base of ekdc's own settings models (the recipe, ``data:``, loss-term and student-family settings).

A setting is plain data a person writes: an unknown key, ``nan``/``inf``, ``true`` where a number belongs
or a number where true/false does is a mistake to name, not a value to coerce (pydantic's lax mode reads
``epochs: true`` as 1 and ``hflip: 0`` as false).
"""
from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Optional, Union

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

_NUMBERS = (int, float)
_UNIONS = (Union, types.UnionType)  # Optional[int] and int | None


def _number_bool_mixup(annotation, value: Any) -> Optional[str]:
    """What is wrong where ``value`` holds a bool that ``annotation`` reads as a number ('must be a number, not
    true', after 'item 1: ' or 'key: ' inside a list, tuple or mapping), or a number where it takes only a bool;
    None where there is none (or a bool is one of the types a number field takes)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _number_bool_mixup(args[0], value)
    if annotation in _NUMBERS:
        return f"must be a number, not {str(value).lower()}" if isinstance(value, bool) else None
    if annotation is bool:  # the other way round: lax mode reads 1 as true and 0 as false
        wrong = isinstance(value, (int, float)) and not isinstance(value, bool)
        return f"must be true or false, not {value}" if wrong else None
    if origin in _UNIONS:
        members = [a for a in args if a is not type(None)]
        plain = [typing.get_args(a)[0] if typing.get_origin(a) is Annotated else a for a in members]
        if isinstance(value, bool):  # lax mode would make it the number member's: wrong unless a member takes bools
            takes_bool = any(a is bool or a is Any or (typing.get_origin(a) is typing.Literal
                                                       and any(isinstance(x, bool) for x in typing.get_args(a)))
                             for a in plain)
            wrong = any(a in _NUMBERS for a in plain) and not takes_bool
            return f"must be a number, not {str(value).lower()}" if wrong else None
        if isinstance(value, (int, float)):  # a number: wrong only where the field takes bools and no number
            takes_number = any(a in _NUMBERS or a is Any or (typing.get_origin(a) is typing.Literal
                                                             and value in typing.get_args(a)) for a in plain)
            return f"must be true or false, not {value}" if bool in plain and not takes_number else None
        shape = dict if isinstance(value, dict) else (list, tuple, set, frozenset)
        holders = [a for a in plain if isinstance(typing.get_origin(a), type) and issubclass(typing.get_origin(a), shape)]
        found = [_number_bool_mixup(a, value) for a in holders]  # wrong only where every member of its shape says so
        return found[0] if found and all(found) else None
    if not args:  # bare list, dict, ...: nothing says their items are numbers
        return None
    if origin in (list, tuple, set, frozenset) and isinstance(value, (list, tuple, set, frozenset)):
        for i, item in enumerate(value):
            item_type = args[0] if origin is not tuple or (len(args) == 2 and args[1] is ...) else \
                (args[i] if i < len(args) else None)
            inner = _number_bool_mixup(item_type, item) if item_type is not None else None
            if inner is not None:
                return f"item {i}: {inner}"
    if origin is dict and len(args) == 2 and isinstance(value, dict):
        for key, item in value.items():
            inner = _number_bool_mixup(args[1], item)
            if inner is not None:
                return f"{key}: {inner}"
    return None


class StrictSettings(BaseModel):
    """Unknown keys, non-finite floats, bools given for numbers and numbers for bools are refused."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_number_bool_mixup(cls, v: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        wrong = _number_bool_mixup(field.annotation, v) if field is not None else None
        if wrong is not None:
            raise ValueError(wrong)
        return v
