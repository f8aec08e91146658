"""Reading a recipe: YAML with ``yaml.safe_load``, ``--set key.path=value`` overrides, paths made
absolute, and the schema's verdict as one line naming the key."""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import UserError
from ..plugins import failure_hint, load_plugins
from .messages import first_error, known_keys, schema_at
from .schema import EKD_STUDENT_KEYS, PLANNED_KEYS, Recipe, StudentConfig


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise UserError(f"--set {item!r}: expected key.path=value")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to the raw recipe mapping."""
    if isinstance(overrides, str):  # one override given bare, not in a list: not its characters one by one
        overrides = [overrides]
    for item in overrides or []:
        parts, value = _parse_override(item)
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise UserError(f"--set {item}: '{where}' is not an index of a list of {len(node)}")
                node = node[int(part)]
            elif isinstance(node, dict):
                if node.get(part) is None:
                    _check_known_path(parts[: i + 1], item)
                    node[part] = {}
                node = node[part]
            else:  # the value reached so far holds no keys (a number, a string, false)
                raise UserError(f"--set {item}: '{'.'.join(parts[:i])}' is {_one_line(node)}, not a mapping")
        last = parts[-1]
        if not isinstance(node, (list, dict)):  # data.augment: false, say: a key inside a value that has none
            _refuse_key_inside_value(parts, item, node)
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise UserError(f"--set {item}: '{'.'.join(parts)}' is not an index of a list of {len(node)}")
            node[int(last)] = value
        else:
            _check_known_path(parts, item)
            node[last] = value
    return raw


def _refuse_key_inside_value(parts: list[str], item: str, node: Any) -> None:
    """``--set a.b.c=v`` where the recipe gives ``a.b`` a plain value: one line. Where the schema lets ``a.b``
    be a mapping (``data.augment: false``), the key is checked for typos and the line shows how to replace
    the value whole, with ``v`` as it was typed; elsewhere (``seed.x``) ``a.b`` simply has no keys."""
    where, shown = ".".join(parts[:-1]), _one_line(node)
    if schema_at(Recipe, _loc(parts[:-1])) is None:
        raise UserError(f"--set {item}: '{where}' holds a value ({shown}), not keys")
    _check_known_path(parts, item)
    typed = item.split("=", 1)[1].strip()
    raise UserError(f"--set {item}: '{where}' is {shown}, not a mapping; replace it whole (its other keys then take "
                    f"their defaults): --set '{where}={{{parts[-1]}: {typed}}}'")


def _one_line(value: Any) -> str:
    """A recipe value as YAML on one line (false, 3, [0.5, 1.0])."""
    return yaml.safe_dump(value, default_flow_style=True).splitlines()[0]


def _loc(parts: list[str]) -> tuple:
    """A dotted path's parts as the schema indexes them (list positions as numbers)."""
    return tuple(int(p) if p.isdigit() else p for p in parts)


def _check_known_path(parts: list[str], item: str) -> None:
    owner = schema_at(Recipe, _loc(parts[:-1]))
    if owner is None:
        return
    known = known_keys(owner)
    if parts[-1] not in known:
        close = difflib.get_close_matches(parts[-1], known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
        raise UserError(f"--set {item}: unknown key '{'.'.join(parts)}'{hint}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML keeps the last silently: a recipe
    that says ``mode: ekd`` and, further down, ``mode: ce`` would train ``ce`` without a word)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *defaults' merges, later keys override
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    given = key in first_line
                except TypeError:  # an unhashable key: the base class says so
                    break
                if given:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key '{key}' is given twice (first on line {first_line[key] + 1})",
                        key_node.start_mark)
                first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str):
    """YAML as a recipe reads it: safe, and a key given twice in one mapping is an error."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict:
    if not path.exists():
        raise UserError(f"recipe not found: {path}")
    if path.is_dir():
        raise UserError(f"recipe {path} is a folder, not a YAML file")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise UserError(f"{path}: not valid YAML{at}: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file") from None
    except RecursionError:
        raise UserError(f"{path}: nested too deeply to be a recipe") from None
    if raw is None:
        raise UserError(f"{path}: the recipe is empty (a YAML mapping of keys to values is expected)")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of keys to values, got {type(raw).__name__}")
    return raw


def _resolve_paths(recipe: Recipe, base: Path) -> None:
    """Relative data roots and checkpoints are read relative to the working directory, which is how
    people usually type them, else relative to the recipe file's folder. A path found either way is made
    absolute, so the run folder's recipe.yaml works from any directory (``ekdc export``, ``--resume``)."""

    def fix(p: str | None) -> str | None:
        if p is None or os.path.isabs(p):
            return p
        for cand in (Path(p), base / p):
            if cand.exists():
                return str(cand.resolve())
        # not there (yet: a torchvision root with download; or gone): absolute all the same, so that the
        # run's recipe.yaml says where it was looked for, and is read alike from any folder
        return str(Path(p).resolve())

    recipe.data.root = fix(recipe.data.root)
    recipe.data.urls = _fix_urls(recipe.data.urls, base)
    recipe.data.val_urls = _fix_urls(recipe.data.val_urls, base)
    recipe.data.val_root = fix(recipe.data.val_root)
    for t in recipe.teachers:
        t.weights = fix(t.weights)
        t.onnx = fix(t.onnx)
    recipe.distill.teacher_cache.path = fix(recipe.distill.teacher_cache.path)


def _fix_urls(urls, base: Path):
    """Shard URLs as ``_resolve_paths`` makes paths absolute: a local pattern's folder is looked for in the
    working directory, then beside the recipe; ``pipe:`` and remote URLs are left as they are."""
    if urls is None:
        return None

    def fix(u: str) -> str:
        if u.startswith("file:") and "://" not in u:
            return "file:" + fix(u[len("file:"):])
        if "://" in u or u.startswith("pipe:") or os.path.isabs(u):
            return u
        for cand in (Path(u), base / u):
            if cand.parent.is_dir():
                return str(cand.parent.resolve() / cand.name)
        return str(Path(u).parent.resolve() / Path(u).name)

    return fix(urls) if isinstance(urls, str) else [fix(u) for u in urls]


def recipe_from_dict(raw: dict, where: str = "recipe") -> Recipe:
    load_plugins()  # the names installed plugins add (students, terms, data sets, models) are known first
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        message = first_error(err, where)
        raise UserError(message + (failure_hint() if "unknown" in message else "")) from None


def student_from_dict(raw: Any, where: str) -> StudentConfig:
    """One ``student:`` mapping on its own (a candidate of ``ekdc plan --candidates``)."""
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping of student keys (trunk_width, branch_widths, ...), "
                        f"got {type(raw).__name__}")
    try:
        return StudentConfig.model_validate(raw)
    except ValidationError as err:
        raise UserError(first_error(err, where, StudentConfig)) from None


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, override (``--set key.path=value``) and validate a recipe."""
    path = Path(path)
    load_plugins()
    raw = apply_overrides(_read_yaml(path), overrides)
    recipe = recipe_from_dict(raw, where=str(path))
    _resolve_paths(recipe, path.resolve().parent)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    raw = recipe.model_dump(mode="json")
    if recipe.student.latency_ms is not None:  # the planner's keys hold defaults: written out, they would clash
        raw["student"] = {k: v for k, v in raw["student"].items() if k not in PLANNED_KEYS}
    if recipe.student.arch != "ekd_student":  # ekd_student's keys are not this family's
        raw["student"] = {k: v for k, v in raw["student"].items() if k not in EKD_STUDENT_KEYS}
    return yaml.safe_dump(raw, sort_keys=False)
