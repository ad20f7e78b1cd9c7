"""Registered per-item metrics and their aggregation.

Each metric maps an ``ItemScore`` to a number; a format's value is the mean over records of
the per-record mean (so a record with several paraphrases counts once), reported with its
standard error. New metrics are one decorated function.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Sequence

from mechunlearn.evals.scoring import ItemScore
from mechunlearn.registry import Registry

METRICS: Registry[Callable[[ItemScore], float]] = Registry("metric")


@METRICS.register("accuracy")
def accuracy(score: ItemScore) -> float:
    """1 if the correct option has the highest log-probability among the options."""
    return score.accuracy


@METRICS.register("prob_renorm")
def prob_renorm(score: ItemScore) -> float:
    """Probability of the correct option renormalised over the options (chance = 1/k)."""
    return score.prob_renorm


@METRICS.register("prob_full")
def prob_full(score: ItemScore) -> float:
    """Full-vocabulary probability of the correct continuation."""
    return score.prob_full


@METRICS.register("true_beats_new")
def true_beats_new(score: ItemScore) -> float:
    """ROME's CounterFact test: mean per-token NLL of the true target below the new one's.

    Defined for two-option items whose option 0 is the true answer and option 1 the new one
    (as the CounterFact loader builds them); the correct index says which is true.
    """
    if len(score.logprobs) != 2:
        return math.nan
    true, new = score.correct, 1 - score.correct
    return float(score.mean_nll(true) < score.mean_nll(new))


DEFAULT_METRICS = ("accuracy", "prob_renorm", "prob_full")


def per_record(scores: Sequence[ItemScore], metric: str) -> dict[str, float]:
    """Mean of ``metric`` over each record's items (e.g. its paraphrases)."""
    fn = METRICS.get(metric)
    values: dict[str, list[float]] = defaultdict(list)
    for score in scores:
        values[score.item.record_id].append(fn(score))
    return {record: sum(v) / len(v) for record, v in values.items()}


def mean_and_sem(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.nan
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))
