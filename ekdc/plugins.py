"""Plugins: installed packages that extend ekdc through Python entry points, pytest's way.

A package declares, in its ``pyproject.toml``::

    [project.entry-points."ekdc.students"]
    tiny = "my_pkg.students"          # a module whose import registers (@register_student) its students

Groups: ``ekdc.terms`` (loss terms), ``ekdc.datasets`` (data sets), ``ekdc.students`` (student families),
``ekdc.models`` (teacher architectures). Loading an entry point imports its module, whose registry
decorators do the rest; the group only says what kind of thing the package means to add. A recipe names
what it uses and can never import code itself: only installed packages extend ekdc.

``load_plugins()`` runs once, before any recipe is read. A plugin that fails to import does not stop
ekdc: the names it would have added are missing, and a recipe that names one is refused in one line that
says which plugin failed and why. A run records the plugins its recipe uses (``plugins.json``), so that a
command that needs one that is not installed can say which to install.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

GROUPS = ("ekdc.terms", "ekdc.datasets", "ekdc.students", "ekdc.models")
PLUGINS_FILE = "plugins.json"


@dataclasses.dataclass
class Plugin:
    distribution: str  # the installed package's name
    version: str
    group: str
    entry: str  # name = value, as the package declares it
    provides: dict[str, list[str]]  # registry -> names its import added
    error: Optional[str] = None  # why it could not be loaded


_LOADED: Optional[list[Plugin]] = None


class _Held:
    """A stream that holds what is written while a plugin loads (a failing one's output becomes its error
    line: argparse's usage, a sys.exit message) and, once released, passes everything on to the stream it
    stands in for: a logging handler the plugin bound to it keeps writing where it should."""

    def __init__(self, stream):
        self._stream, self._parts, self._holding = stream, [], True

    @property
    def held(self) -> str:
        return "".join(self._parts)

    def write(self, text: str) -> int:
        if self._holding:
            self._parts.append(text)
            return len(text)
        return self._stream.write(text) if self._stream is not None else len(text)

    def flush(self) -> None:
        if not self._holding and self._stream is not None:
            self._stream.flush()

    def replay(self) -> None:
        if self._stream is not None and self._parts:
            self._stream.write(self.held)

    def release(self) -> None:
        self._holding, self._parts = False, []

    def __getattr__(self, name):  # isatty, fileno, encoding: the real stream's
        return getattr(self._stream, name)


def _registered() -> dict[str, set[str]]:
    from .data import list_datasets
    from .losses import list_terms
    from .models import list_models, list_students

    return {"terms": set(list_terms()), "datasets": set(list_datasets()), "students": set(list_students()),
            "models": set(list_models()) - set(list_students())}


def load_plugins() -> list[Plugin]:
    """Import every installed ekdc plugin once; the plugins, with what each added (or why it failed)."""
    global _LOADED
    if _LOADED is not None:
        return _LOADED
    _LOADED = []
    for group in GROUPS:
        for ep in sorted(metadata.entry_points(group=group), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "?"
            version = ep.dist.version if ep.dist is not None else "?"
            before = _registered()
            error = None
            out, err_ = _Held(sys.stdout), _Held(sys.stderr)
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err_):
                    ep.load()
            except (Exception, SystemExit) as err:  # noqa: BLE001 - a broken plugin must not break ekdc
                # SystemExit too: a module that parses sys.argv or calls sys.exit() at import would end ekdc
                error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")
                printed = [line for line in (out.held + err_.held).splitlines() if line.strip()]
                if printed:
                    error += f" (it printed: {printed[-1].strip()[:160]})"
            else:  # a plugin that loads: what it said while loading is said now
                out.replay(), err_.replay()
            out.release(), err_.release()
            after = _registered()
            added = {k: sorted(after[k] - before[k]) for k in after if after[k] - before[k]}
            _LOADED.append(Plugin(dist, version, group, f"{ep.name} = {ep.value}", added, error))
    return _LOADED


def failed_plugins() -> list[tuple[str, str]]:
    """(package, why) of each plugin that failed to load, each once: one package's entry points fail alike."""
    return list(dict.fromkeys((p.distribution, p.error) for p in load_plugins() if p.error))


def failure_hint() -> str:
    """A clause for 'unknown name' errors: the plugins that failed to load, or ''."""
    bad = failed_plugins()
    return "; plugins that failed to load: " + ", ".join(f"{dist} ({why})" for dist, why in bad) if bad else ""


def origin(kind: str, name: str) -> str:
    """' (plugin DIST)' where an installed plugin added ``name`` to the ``kind`` registry ("students",
    "models", "terms", "datasets"), else '': an error about a plugin's code names the package to fix."""
    if _LOADED is None:  # no plugin loaded in this process: nothing came from one
        return ""
    found = next((p.distribution for p in _LOADED if name in p.provides.get(kind, [])), None)
    return f" (plugin {found})" if found else ""


def used_by(recipe) -> list[dict]:
    """The loaded plugins whose names ``recipe`` uses, and which names (what a run records)."""
    names = {"students": {recipe.student.arch}, "datasets": {recipe.data.dataset},
             "terms": set(recipe.distill.active_terms(recipe.mode)),
             "models": {t.arch for t in recipe.teachers if t.arch}}
    out = []
    for p in load_plugins():
        uses = {k: sorted(set(v) & names.get(k, set())) for k, v in p.provides.items()}
        uses = {k: v for k, v in uses.items() if v}
        if uses:
            out.append({"distribution": p.distribution, "version": p.version, "entry": p.entry, "uses": uses})
    return out


def write_used(recipe, run_path: Path) -> None:
    from ._io import write_json

    used = used_by(recipe)
    if used:
        write_json(run_path / PLUGINS_FILE, {"plugins": used})


def missing_hint(run_path: Path) -> str:
    """For a run whose recipe no longer loads: the plugins it recorded that are not installed now."""
    try:
        recorded = json.loads((run_path / PLUGINS_FILE).read_text())["plugins"]
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    installed = {p.distribution for p in load_plugins() if not p.error}
    gone = [p for p in recorded if p.get("distribution") not in installed]
    if not gone:
        return ""
    return "; this run used plugin " + ", ".join(
        f"{p['distribution']} {p.get('version', '')} ({', '.join(n for v in p.get('uses', {}).values() for n in v)})"
        for p in gone) + ": install it"
