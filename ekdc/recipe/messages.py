"""Validation errors as one line each: the key path, what is wrong, and for an unknown key the closest
known one (``distill.temprature: unknown key (did you mean 'temperature'?)``)."""
from __future__ import annotations

import difflib
import re
import typing
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

from .schema import Recipe


def _format_loc(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p not in ("function-after", "function-before"))


def _models_in(annotation) -> Optional[type[BaseModel]]:
    """The pydantic model a field's annotation holds (through Optional, Union, list), if any."""
    found = None
    for c in [annotation, *typing.get_args(annotation)]:
        for cc in [c, *typing.get_args(c)]:
            if isinstance(cc, type) and issubclass(cc, BaseModel):
                found = cc
    return found


def known_keys(model: type[BaseModel]) -> list[str]:
    """A model's fields and, where it takes them, its extension keys (``distill.<term>``)."""
    ext = getattr(model, "extensions", None)
    return [*model.model_fields, *(ext() if ext else {})]


def schema_at(model: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model that owns the key after ``loc``: None where ``loc`` leads into a field that holds
    no model (a mapping of plain values, such as ``distill.weights``); the last model reached where a
    part of ``loc`` is not a key of it (for 'did you mean')."""
    cls: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(part)
        ext = getattr(cls, "extensions", None)
        if field is None and ext is not None and part in ext():
            cls = ext()[part]
            if cls is None:  # a key that holds plain values (a student family's setting)
                return None
            continue
        if field is None:
            return cls
        nxt = _models_in(field.annotation)
        if nxt is None:
            return None
        cls = nxt
    return cls


def _union_tags() -> set[str]:
    """The names pydantic puts into an error's location for the union member it tried (``Augment``,
    ``bool``): every model class's name, and the plain types'."""
    names, todo = {"bool", "int", "float", "str"}, [BaseModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            names.add(sub.__name__)
            todo.append(sub)
    return names


def first_error(err: ValidationError, where: str, schema: type[BaseModel] | None = None) -> str:
    e = err.errors()[0]
    loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    # drop the union tags pydantic adds, not the user's own keys (which may be capitalised)
    tags = _union_tags()
    unknown_key = len(loc) - 1 if e["type"] == "extra_forbidden" else None  # the user's key, whatever its name
    loc = tuple(p for i, p in enumerate(loc) if not (i > 0 and i != unknown_key and p in tags))
    path = _format_loc(loc)
    if e["type"] == "extra_forbidden":
        owner = schema_at(schema or Recipe, loc[:-1])
        hint = ""
        if owner is not None:
            close = difflib.get_close_matches(str(loc[-1]), known_keys(owner), n=1)
            if close:
                hint = f" (did you mean '{close[0]}'?)"
        return f"{where}: unknown key '{path}'{hint}"
    if e["type"] == "missing":
        return f"{where}: {path}: required key is missing"
    if e["type"] == "string_pattern_mismatch":
        return f"{where}: {path}: must be a file name of letters, digits, '_', '.' and '-' (not '.' or '..')"
    msg = e["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    if e["type"] == "string_type" and isinstance(e.get("input"), (int, float)) and not isinstance(e["input"], bool):
        msg += f" (YAML read {e['input']!r} as a number: quote it, '{e['input']}')"
    msg = re.sub(r"Input should be a valid dictionary or instance of \w+", "must be a mapping of keys to values", msg)
    msg = msg.replace("Input should be", "must be").replace("greater than or equal to", ">=")
    msg = msg.replace("greater than", ">").replace("less than or equal to", "<=").replace("less than", "<")
    return f"{where}: {path}: {msg}" if path else f"{where}: {msg}"
