"""Paired differences between two rows of an experiment, with bootstrap confidence intervals.

A claim such as "fact-lookup edits resist relearning better than causal-tracing edits" is the
difference of one metric between two localizations of the same experiment. Both rows edit the
same facts under the same seed, so the difference is taken fact by fact within each seed
(paired), and its uncertainty comes from a two-level bootstrap: seeds are resampled with
replacement, then facts within each drawn seed (the hierarchical bootstrap of Davison &
Hinkley 1997, Sec. 3.8). The statistic is the mean over seeds of the per-seed mean difference,
and the interval is the percentile interval of the resampled statistics. With one seed only
the facts are resampled, which understates the uncertainty (seed-to-seed variation of the
training is then unseen); the table says how many seeds it had.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mechunlearn.errors import DataError

N_RESAMPLES = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class PairedDifference:
    """``mean`` of ``a - b`` and its ``level`` bootstrap interval ``[low, high]``."""

    mean: float
    low: float
    high: float
    n_seeds: int
    n_facts: int  # paired (seed, fact) values in all

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def bootstrap_mean(
    values_by_seed: Sequence[Sequence[float]],
    n_resamples: int = N_RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean over seeds of each seed's mean, and its percentile
    interval from resampling seeds, then facts within each drawn seed."""
    groups = [np.asarray(v, dtype=np.float64) for v in values_by_seed if len(v)]
    if not groups:
        raise DataError("no values to bootstrap: every seed is empty")
    rng = np.random.default_rng(seed)
    n_groups = len(groups)
    estimate = float(np.mean([g.mean() for g in groups]))
    # draws[j]: the j-th drawn seed of every resample; each draw resamples its facts afresh
    chosen = rng.integers(0, n_groups, size=(n_resamples, n_groups)) if n_groups > 1 else None
    total = np.zeros(n_resamples)
    for j in range(n_groups):
        means = np.stack(
            [g[rng.integers(0, len(g), size=(n_resamples, len(g)))].mean(1) for g in groups]
        )  # [seed, resample]
        pick = chosen[:, j] if chosen is not None else np.zeros(n_resamples, dtype=int)
        total += means[pick, np.arange(n_resamples)]
    stats = total / n_groups
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return estimate, float(low), float(high)


def paired_values(
    a: Mapping[int, Mapping[str, float]], b: Mapping[int, Mapping[str, float]]
) -> dict[int, list[float]]:
    """Per seed, ``a[fact] - b[fact]`` over the facts both rows scored (``{seed: {fact: v}}``)."""
    out = {}
    for seed in sorted(set(a) & set(b)):
        facts = sorted(set(a[seed]) & set(b[seed]))
        if facts:
            out[seed] = [a[seed][f] - b[seed][f] for f in facts]
    return out


def paired_difference(
    a: Mapping[int, Mapping[str, float]],
    b: Mapping[int, Mapping[str, float]],
    n_resamples: int = N_RESAMPLES,
    level: float = LEVEL,
) -> PairedDifference:
    """``a - b`` paired by seed and fact, with its bootstrap interval; ``DataError`` when the
    two rows share no (seed, fact)."""
    diffs = paired_values(a, b)
    if not diffs:
        raise DataError("the two rows share no (seed, fact) to compare")
    mean, low, high = bootstrap_mean(list(diffs.values()), n_resamples, level)
    return PairedDifference(mean, low, high, len(diffs), sum(len(v) for v in diffs.values()))


def verdict(diff: PairedDifference, lower_is_better: bool, name: str = "FLU") -> str:
    """``"<name> better"`` / ``"<name> worse"`` when the interval excludes zero, else
    ``"no decidable difference"``."""
    if not diff.excludes_zero():
        return "no decidable difference"
    better = (diff.high < 0) == lower_is_better
    return f"{name} better" if better else f"{name} worse"
