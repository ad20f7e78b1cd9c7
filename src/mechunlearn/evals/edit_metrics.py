"""Per-format metrics of an edit: does the model now give the new answer, and is the old one gone?

After editing fact ``s -> o`` to ``s -> o*`` (Mechanistic Unlearning, Guo et al. 2024, Sec. 5;
ROME's efficacy, Meng et al. 2022), every prompt format is scored once and read two ways from
the same option log-probabilities:

- ``edit_success``: ``o*`` has the highest probability among the options;
- ``p_new``: ``P(o* | options)`` (renormalised over the options, chance = 1/k);
- ``original_accuracy``: ``o`` still has the highest probability;
- ``p_original``: ``P(o | options)``: the number that must fall for the edit to have erased ``o``.

Values are means over records (a record's several prompts, e.g. paraphrases or MCQ orders,
averaged first), with their standard error.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch

from mechunlearn.errors import DataError
from mechunlearn.evals.metrics import mean_and_sem
from mechunlearn.evals.scoring import ItemScore

EDIT_METRICS = ("edit_success", "p_new", "original_accuracy", "p_original")


def _item_values(score: ItemScore, original: str, new: str) -> dict[str, float]:
    labels = list(score.item.labels)
    if original not in labels or new not in labels:
        raise DataError(
            f"{score.item.record_id} ({score.item.format}): options {labels} must contain both the "
            f"original answer {original!r} and the new answer {new!r}"
        )
    probs = torch.tensor(score.logprobs, dtype=torch.float64).softmax(0)
    best = int(probs.argmax())
    i_old, i_new = labels.index(original), labels.index(new)
    return {
        "edit_success": float(best == i_new),
        "p_new": float(probs[i_new]),
        "original_accuracy": float(best == i_old),
        "p_original": float(probs[i_old]),
    }


def edit_metrics_per_record(
    scores: Sequence[ItemScore], targets: Mapping[str, tuple[str, str]]
) -> dict[str, dict[str, dict[str, float]]]:
    """``format -> metric -> {record id: value}`` for edited facts (a record's prompts
    averaged): the per-fact values paired comparisons and bootstrap intervals resample.

    ``targets`` maps record id to ``(original answer, new answer)``; scores of other records
    are ignored (so retain facts may share the score list).
    """
    per_record: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for score in scores:
        if score.item.record_id not in targets:
            continue
        original, new = targets[score.item.record_id]
        for metric, value in _item_values(score, original, new).items():
            per_record[score.item.format][score.item.record_id][metric].append(value)
    if not per_record:
        raise DataError("no scored prompt belongs to an edited fact")
    return {
        fmt: {
            metric: {rid: sum(v[metric]) / len(v[metric]) for rid, v in records.items()}
            for metric in EDIT_METRICS
        }
        for fmt, records in per_record.items()
    }


def edit_metrics(
    scores: Sequence[ItemScore], targets: Mapping[str, tuple[str, str]]
) -> dict[str, dict[str, dict[str, float]]]:
    """``format -> metric -> {"mean", "sem"}`` over edited facts (see
    ``edit_metrics_per_record``)."""
    result: dict[str, dict[str, dict[str, float]]] = {}
    for fmt, metrics in edit_metrics_per_record(scores, targets).items():
        result[fmt] = {}
        for metric, values in metrics.items():
            mean, sem = mean_and_sem(list(values.values()))
            result[fmt][metric] = {"mean": mean, "sem": sem}
    return result
