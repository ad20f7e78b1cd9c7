"""Evaluation harness: batched option scoring, registered metrics, side effects."""

from mechunlearn.evals.harness import (
    EvalResult,
    FormatResult,
    evaluate,
    evaluate_split,
    known_facts,
)
from mechunlearn.evals.lm_loss import lm_loss
from mechunlearn.evals.metrics import METRICS, mean_and_sem, per_record
from mechunlearn.evals.scoring import ItemScore, score_items

__all__ = [
    "METRICS",
    "EvalResult",
    "FormatResult",
    "ItemScore",
    "evaluate",
    "evaluate_split",
    "known_facts",
    "lm_loss",
    "mean_and_sem",
    "per_record",
    "score_items",
]
