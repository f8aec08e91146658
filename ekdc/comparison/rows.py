"""The rows of a comparison: which student, trained how.

A row is ``[STUDENT:]BASE[+MOD...]``:

    BASE     recipe (the recipe's own mode and KD loss), ce, avg_kd, ekd
    MOD      dkd (decoupled KD, with its warm-up: the KD term ramps up over 1/12 of the epochs, DKD's 20 of
             240, unless the recipe gives distill.kd.warmup_epochs), conf (confidence-weighted teachers,
             avg_kd), feat (feature matching, ekd), k<K> (the teachers' outputs read from a cache of K views
             an image)
    STUDENT  plain: one branch, widened to the recipe student's MACs (within 5%)
             planned: one branch, the most MACs within the recipe student's measured p50 latency
             (none: the recipe's own student); a one-branch row of an ekd recipe trains with avg_kd,
             since one branch cannot pair with several teachers

so ``plain:avg_kd+dkd`` is an equal-cost one-branch student distilled with DKD from the teachers' mean.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Sequence

from ..data.config import MAX_SEED
from ..errors import UserError
from ..losses import get_term, list_terms, terms_of_mode

BASES = ("recipe", "ce", "avg_kd", "ekd")
STUDENTS = ("recipe", "plain", "planned")
# DKD (Zhao et al., CVPR 2022) ramps its loss up over its first 20 of 240 epochs: its NCKD term, weighted by
# beta = 8, is large at the start and destabilises training without the ramp. A +dkd row keeps that fraction.
DKD_WARMUP_FRACTION = 20 / 240
DEFAULT_ROWS = ("recipe", "ce", "plain:recipe")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str  # as given
    student: str  # STUDENTS
    base: str  # BASES
    dkd: bool = False
    confidence: bool = False
    feat: bool = False
    views: Optional[int] = None  # a teacher-output cache of this many views (None: the recipe's)

    @property
    def slug(self) -> str:
        """A folder and file name: ``plain-avg_kd-dkd``."""
        return re.sub(r"[:+]", "-", self.name)

    @property
    def one_branch(self) -> bool:
        return self.student != "recipe"


def parse_row(text: str) -> Row:
    text = text.strip()
    student, _, rest = text.rpartition(":")
    student = student or "recipe"
    base, *mods = rest.split("+")
    if student not in STUDENTS or base not in BASES:
        raise UserError(f"--rows: '{text}' is not a row: [plain:|planned:]BASE[+dkd][+conf][+feat][+k<K>], BASE one "
                        f"of {', '.join(BASES)}")
    kw: dict = {}
    for k, m in enumerate(mods):
        part = "k<K>" if re.fullmatch(r"k\d+", m) else m
        if part in ["k<K>" if re.fullmatch(r"k\d+", o) else o for o in mods[:k]]:
            raise UserError(f"--rows: '{text}': +{part} is given twice")
        if m in ("dkd", "conf", "feat"):
            kw[{"conf": "confidence"}.get(m, m)] = True
        elif re.fullmatch(r"k\d+", m):
            kw["views"] = int(m[1:])
        else:
            raise UserError(f"--rows: '{text}': unknown part '+{m}' (known: +dkd, +conf, +feat, +k<K>)")
    row = Row(text, student, base, **kw)
    if row.one_branch and row.base == "ekd":
        raise UserError(f"--rows: '{text}': ekd trains branch i from teacher i, so a one-branch student cannot use it; "
                        "use avg_kd")
    if row.base == "ce" and (row.dkd or row.confidence or row.feat or row.views):
        raise UserError(f"--rows: '{text}': ce trains the student alone: +dkd, +conf, +feat and +k<K> change nothing "
                        "there")
    if row.feat and row.base == "avg_kd":
        raise UserError(f"--rows: '{text}': feature matching pairs branch i with teacher i: it applies to ekd")
    if row.confidence and row.base == "ekd":
        raise UserError(f"--rows: '{text}': confidence weighting mixes the teachers for every branch: it applies to "
                        "avg_kd")
    return row


def parse_rows(text: str | list[str] | tuple[str, ...]) -> list[Row]:
    items = [t for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not items:
        raise UserError("--rows: give at least one row")
    rows = [parse_row(t) for t in items]
    slugs = [r.slug for r in rows]
    dup = next((s for s in slugs if slugs.count(s) > 1), None)
    if dup:
        raise UserError(f"--rows: '{dup}' is listed twice")
    return rows


def parse_seeds(seeds: str | Sequence[int]) -> list[int]:
    """``--seeds``: ``"0,1,2"`` or a sequence of ints, each a recipe seed (0 .. 2**32-1), each once, in the
    order given. A seed listed twice is an error, as a row listed twice is: it would ask for a cell twice."""
    items = [t.strip() for t in seeds.split(",") if t.strip()] if isinstance(seeds, str) else list(seeds)
    if not items:
        raise UserError("--seeds: give at least one seed, such as 0,1,2")
    out: list[int] = []
    for item in items:
        if isinstance(item, str) and re.fullmatch(r"[+-]?\d+", item):
            seed = int(item)
        elif isinstance(item, int) and not isinstance(item, bool):
            seed = item
        else:
            raise UserError(f"--seeds: '{item}' is not an integer (expected comma-separated seeds such as 0,1,2)")
        if not 0 <= seed <= MAX_SEED:
            raise UserError(f"--seeds: {seed} is out of range (a seed is 0 .. {MAX_SEED})")
        if seed in out:
            raise UserError(f"--seeds: {seed} is listed twice")
        out.append(seed)
    return out


def row_recipe(raw: dict, row: Row, student: Optional[dict]) -> dict:
    """The recipe mapping of one row (``raw``: the base recipe's, teachers already resolved); ``student``
    replaces the recipe's student (``create_model`` keys) for one-branch rows.

    What the row's mode cannot use is left at its default, so that a row never carries a setting that
    changes nothing (``ekdc.recipe.inert`` refuses those): a ``ce`` row drops the KD settings, temperature
    and cache; an ``avg_kd`` row the feature weight; a KL row DKD's alpha and beta. What a modifier asks
    for is kept, and refused where it changes nothing (``recipe+feat`` on an ``avg_kd`` recipe)."""
    raw = {**raw, "distill": {**raw["distill"]}, "student": dict(raw["student"])}
    if row.base != "recipe":
        raw["mode"] = row.base
    if row.one_branch and raw["mode"] == "ekd":  # one branch cannot pair with N teachers: its ekd is avg_kd
        raw["mode"] = "avg_kd"
    mode = raw["mode"]
    kd = dict(raw["distill"].get("kd") or {})
    if row.base != "recipe":
        kd.update(loss="kl", teachers="mean")
    if row.dkd:
        kd["loss"] = "dkd"
        warmup = round(raw["distill"]["epochs"] * DKD_WARMUP_FRACTION)
        if not kd.get("warmup_epochs") and warmup >= 2:  # a ramp of 1 epoch is full weight from the start
            kd["warmup_epochs"] = warmup
    if row.confidence:
        kd["teachers"] = "confidence"
    if kd.get("loss", "kl") == "kl":  # alpha and beta weigh DKD's two parts: with KL, their defaults
        kd.pop("alpha", None), kd.pop("beta", None)
    raw["distill"]["kd"] = kd
    weights = dict(raw["distill"].get("weights") or {})
    for name in list_terms():  # a term the mode does not train on: its default weight and settings
        if name not in terms_of_mode(mode):
            weights.pop(name, None)
            raw["distill"].pop(name, None)
    if row.feat:
        weights["feat"] = weights.get("feat") or 1.0
    raw["distill"]["weights"] = weights
    if not any(get_term(n).needs_teachers for n in terms_of_mode(mode)):  # ce: no teacher is read
        raw["distill"].pop("temperature", None)
        raw["distill"]["teacher_cache"] = {**raw["distill"]["teacher_cache"], "views": 0}
    if row.views is not None:
        raw["distill"]["teacher_cache"] = {**raw["distill"]["teacher_cache"], "views": row.views}
    if student is not None:
        raw["student"] = {"arch": raw["student"].get("arch", "ekd_student"), **student}
    return raw
