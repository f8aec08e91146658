"""The statistics a comparison reports, in one place: mean and sample std over seeds, and gaps paired
by seed (cells of one seed share the training subset, the initialisation and the batch order, so a gap
taken seed by seed leaves out the noise two rows have in common)."""
from __future__ import annotations

import statistics
from typing import Mapping, Optional, Sequence


def mean_std(xs: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """(mean, sample std): None with no value, std None with fewer than two."""
    return (statistics.mean(xs) if xs else None), (statistics.stdev(xs) if len(xs) > 1 else None)


def paired_diffs(row: Mapping, ref: Mapping) -> list[float]:
    """``row[seed] - ref[seed]`` over the seeds both have, in ``row``'s order."""
    return [row[s] - ref[s] for s in row if s in ref]


def paired_gap(row: Mapping, ref: Mapping) -> dict:
    """The row minus the reference, paired by seed: seeds, mean, std, and in how many the row is ahead."""
    diffs = paired_diffs(row, ref)
    mean, std = mean_std(diffs)
    return {"seeds": len(diffs), "mean": mean, "std": std, "ahead": sum(d > 0 for d in diffs)}


def pct(x: Optional[float], signed: bool = False) -> str:
    """A fraction in percent, 2 decimals; ``signed``: with an explicit + or − (a gap)."""
    if x is None:
        return "–"
    return f"{100 * x:+.2f}".replace("-", "−") if signed else f"{100 * x:.2f}"


def pct_mean_std(xs: Sequence[float], signed: bool = False) -> str:
    """Fractions as the pages show them: mean ± std in percent."""
    mean, std = mean_std(xs)
    return pct(mean, signed) + (f" ± {100 * std:.2f}" if std is not None else "")
