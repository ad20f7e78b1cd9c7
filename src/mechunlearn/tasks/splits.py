"""Forget/retain splits and the known-facts filter.

Unlearning is measured on facts the model knew before (``filter_known``), split into the facts
to forget and the facts that must survive: a whole group (e.g. one sport, as in Guo et al.
2024) or a random subset.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.tasks.records import FactRecord


@dataclass(frozen=True)
class Split:
    """Facts to forget and facts to retain; disjoint, together the input records."""

    forget: list[FactRecord]
    retain: list[FactRecord]

    def ids(self) -> tuple[list[str], list[str]]:
        """Record ids of (forget, retain), e.g. for saving a split next to results."""
        return [r.id for r in self.forget], [r.id for r in self.retain]


def _answer(record: FactRecord) -> Hashable:
    return record.answer


def _checked(split: Split, what: str) -> Split:
    if not split.forget:
        raise DataError(f"forget split is empty ({what})")
    if not split.retain:
        raise DataError(f"retain split is empty ({what}); nothing is left to retain")
    return split


def split_by_group(
    records: Sequence[FactRecord],
    forget_value: Hashable,
    key: Callable[[FactRecord], Hashable] = _answer,
) -> Split:
    """Forget every record whose ``key`` equals ``forget_value`` (default key: the answer)."""
    if not records:
        raise DataError("cannot split an empty list of records")
    values = {key(r) for r in records}
    if forget_value not in values:
        available = ", ".join(sorted(map(str, values)))
        raise DataError(f"no record has group value {forget_value!r}; available: {available}")
    forget = [r for r in records if key(r) == forget_value]
    retain = [r for r in records if key(r) != forget_value]
    return _checked(Split(forget, retain), f"group {forget_value!r}")


def split_random(records: Sequence[FactRecord], n_forget: int, seed: int) -> Split:
    """Forget ``n_forget`` records drawn with ``seed``; the draw depends on the ids, not order."""
    if isinstance(n_forget, bool) or not isinstance(n_forget, int):
        raise ConfigError(f"n_forget must be an integer, got {n_forget!r}")
    if not 0 < n_forget < len(records):
        raise DataError(
            f"n_forget must be between 1 and {len(records) - 1} for {len(records)} records, "
            f"got {n_forget}"
        )
    by_id = sorted(range(len(records)), key=lambda i: records[i].id)
    chosen = set(random.Random(seed).sample(by_id, n_forget))
    forget = [r for i, r in enumerate(records) if i in chosen]
    retain = [r for i, r in enumerate(records) if i not in chosen]
    return _checked(Split(forget, retain), f"random {n_forget} of {len(records)}")


def filter_known(
    records: Sequence[FactRecord], scores: Mapping[str, float], threshold: float
) -> list[FactRecord]:
    """Keep facts the model knows (score >= threshold): unlearning unknown facts means nothing.

    ``scores`` maps record id to the model's probability of the true answer.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be a probability in [0, 1], got {threshold}")
    missing = [r.id for r in records if r.id not in scores]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DataError(f"{len(missing)} record(s) have no score: {shown}")
    kept = [r for r in records if scores[r.id] >= threshold]
    if not kept:
        raise DataError(
            f"the model knows none of the {len(records)} facts at threshold {threshold}"
        )
    return kept
