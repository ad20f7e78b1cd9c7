"""Calibrating one knob of a method to a target on validation data, shared by the matched
comparisons: LAT refusal at matched benign compliance (``lat_measure.match_benign``) and LAT
unlearning at matched forgetting (``forget_match``).

A try is a dict holding the knob's value (``value_key``) and what it gave on the validation
data (``measure_key``). A grid of tries comes first; ``next_bracketing_value`` then proposes
bisection tries between the two adjacent values whose measures lie on either side of the
target, because a coarse grid can leave two compared methods far apart on either side of it.
"""

from __future__ import annotations

import itertools
import math
from typing import Any


def closest_to_target(
    tried: list[dict[str, Any]], target: float, value_key: str, measure_key: str
) -> float:
    """The tried value whose measure is closest to ``target`` (ties: the smaller value)."""
    best = min(tried, key=lambda t: (abs(t[measure_key] - target), t[value_key]))
    return best[value_key]


def next_bracketing_value(
    tried: list[dict[str, Any]], target: float, value_key: str, measure_key: str
) -> float | None:
    """The next value to try: halfway (the geometric mean; the arithmetic one next to 0)
    between the two adjacent tried values whose measures lie on either side of ``target``;
    when noise makes several such pairs, the pair whose nearer, then farther, end is nearest
    the target. None when no pair brackets it, one value hits it, or the pair is too close to
    split (4 significant digits)."""
    ordered = sorted(tried, key=lambda t: t[value_key])
    if any(t[measure_key] == target for t in ordered):
        return None
    pairs = [
        (low, high)
        for low, high in itertools.pairwise(ordered)
        if (low[measure_key] - target) * (high[measure_key] - target) < 0
    ]
    if not pairs:
        return None
    low, high = min(pairs, key=lambda p: sorted(abs(t[measure_key] - target) for t in p))
    a, b = low[value_key], high[value_key]
    value = float(f"{(math.sqrt(a * b) if a > 0 else (a + b) / 2):.4g}")
    return value if a < value < b else None
