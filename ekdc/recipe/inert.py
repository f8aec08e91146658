"""Settings of the student's objective that change nothing: one rule, for ``ekdc distill`` and every row of
``ekdc compare``.

A weight given to a term the mode does not train on, the settings of a term that does not train
(``distill.kd`` in mode ``ce``, or with ``weights.kd: 0``), DKD with both its parts weighed 0, a temperature
or a teacher-output cache where no term reads the teachers: each trains exactly what the recipe without
it trains, under another name, and is refused in one line naming the key. A setting left at its default
is never refused: a recipe cannot say it less.

The rule is checked where a run starts (``check_recipe``), not by the schema: a run folder's recipe.yaml
written before it still loads (``ekdc export``, ``ekdc compare --report-only``). ``effective`` is the
configuration a recipe trains, without such settings: what ``--resume`` and a comparison grid compare.
"""
from __future__ import annotations

import copy
from typing import Optional

from ..errors import UserError
from ..losses import get_term, list_terms, terms_of_mode


def _differs(settings, default) -> Optional[str]:
    """The first key where a term's settings differ from its defaults."""
    a, b = settings.model_dump(), default.model_dump()
    return next((k for k in a if a[k] != b.get(k)), None)


def inert_setting(mode: str, distill) -> Optional[str]:
    """Why a setting of ``distill`` (a ``DistillConfig``) does nothing in ``mode``, naming its key; or None."""
    applies = terms_of_mode(mode)
    active = distill.active_terms(mode)
    for name in list_terms():
        term, w = get_term(name), distill.weights.get(name, 0.0)
        if name not in applies and w > 0 and w != term.default_weight:
            return (f"distill.weights.{name}: {w:g} does nothing in mode {mode}: the {name} term trains in mode "
                    f"{' and '.join(term.modes)} only; leave it out (or {term.default_weight:g})")
    settings = distill.term_settings()
    for name, s in settings.items():
        term = get_term(name)
        if name in active or term.settings is None:
            continue
        key = _differs(s, term.settings())
        if key is not None:
            why = f"mode {mode} has no {name} term" if name not in applies else f"distill.weights.{name} is 0"
            return (f"distill.{name}.{key}: {getattr(s, key)} does nothing: {why}; leave distill.{name} out "
                    f"(--set distill.{name}=null)")
    kd = settings.get("kd")
    if "kd" in active and kd is not None and kd.loss == "dkd" and kd.alpha == 0 and kd.beta == 0:
        return ("distill.kd: alpha and beta are both 0: DKD's two parts weigh nothing, so the KD term does nothing; "
                "give alpha or beta, or turn the term off with distill.weights.kd: 0")
    if not any(get_term(n).needs_teachers for n in active):
        if distill.temperature != type(distill).model_fields["temperature"].default:
            return (f"distill.temperature: {distill.temperature:g} does nothing: no term of mode {mode} "
                    f"({', '.join(active)}) reads the teachers' softened logits; leave it out")
        if distill.teacher_cache.views:
            return (f"distill.teacher_cache.views: {distill.teacher_cache.views} does nothing: no term of mode {mode} "
                    f"({', '.join(active)}) reads the teachers; set views: 0")
    return None


def check_recipe(recipe, where: str = "recipe") -> None:
    """One line (exit 2) naming the first setting of ``recipe`` that changes nothing."""
    problem = inert_setting(recipe.mode, recipe.distill)
    if problem:
        raise UserError(f"{where}: {problem}")


def effective(raw: dict) -> dict:
    """A recipe mapping (``model_dump(mode="json")``) without what changes nothing in its mode: the weights
    of terms the mode does not train on, the settings of terms that do not train, KL's unused alpha and
    beta, the temperature and teacher-output cache where no term reads the teachers, and how often a stage
    is scored while it trains (``val_every``)."""
    raw = copy.deepcopy(raw)
    # how often a stage is scored while it trains: watching, which changes no weight
    for t in raw.get("teachers") or []:
        if isinstance(t, dict) and isinstance(t.get("train"), dict):
            t["train"].pop("val_every", None)
    d = raw.get("distill")
    if isinstance(d, dict):
        d.pop("val_every", None)
    if not isinstance(d, dict) or raw.get("mode") is None:
        return raw
    applies = terms_of_mode(raw["mode"])
    weights = d.get("weights") if isinstance(d.get("weights"), dict) else {}
    active = [n for n in applies if (weights.get(n, get_term(n).default_weight) or 0) > 0]
    for name in list_terms():
        if name not in applies:
            weights.pop(name, None)
        if name not in active:
            d.pop(name, None)
    kd = d.get("kd")
    if isinstance(kd, dict) and kd.get("loss", "kl") == "kl":
        kd.pop("alpha", None), kd.pop("beta", None)
    if not any(get_term(n).needs_teachers for n in active):
        d.pop("temperature", None)
        d.pop("teacher_cache", None)
    return raw
