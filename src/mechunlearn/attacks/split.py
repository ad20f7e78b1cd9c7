"""The train/held-out split every attack uses, so attacks are judged on facts they never saw.

Relearning and soft-prompt attacks (Guo et al. 2024, "Mechanistic Unlearning"; Deeb & Roger
2024) train on part of the forget set and measure recovery on the rest: recovery there means
the knowledge was still in the model, not re-taught by the attack.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.tasks.records import FactRecord


def split_records(
    records: Sequence[FactRecord], fraction: float = 0.5, seed: int = 0
) -> tuple[list[FactRecord], list[FactRecord]]:
    """Seeded split into ``(train, heldout)``: disjoint, both non-empty, record order kept.

    ``round(fraction * n)`` facts train (at least one, at most ``n - 1``).
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"train fraction must be in (0, 1), got {fraction}")
    records = list(records)
    if len({r.id for r in records}) != len(records):
        raise DataError("the facts to split contain duplicate ids")
    if len(records) < 2:
        raise DataError(
            f"an attack needs at least 2 forget facts (one to train on, one to test), got "
            f"{len(records)}"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    k = min(max(round(fraction * len(records)), 1), len(records) - 1)
    chosen = set(order[:k])
    train = [r for i, r in enumerate(records) if i in chosen]
    heldout = [r for i, r in enumerate(records) if i not in chosen]
    return train, heldout
