"""Evaluation harness: batched option scoring, registered metrics, side effects, ROME's
CounterFact metrics and latent-knowledge probes."""

from mechunlearn.evals.counterfact_metrics import rome_metrics
from mechunlearn.evals.harness import (
    EvalResult,
    FormatResult,
    evaluate,
    evaluate_split,
    known_facts,
)
from mechunlearn.evals.latent_probes import LatentProbeResult, latent_probe_accuracy
from mechunlearn.evals.lm_loss import lm_loss
from mechunlearn.evals.metrics import METRICS, mean_and_sem, per_record
from mechunlearn.evals.scoring import ItemScore, score_items

__all__ = [
    "METRICS",
    "EvalResult",
    "FormatResult",
    "ItemScore",
    "LatentProbeResult",
    "evaluate",
    "evaluate_split",
    "known_facts",
    "latent_probe_accuracy",
    "lm_loss",
    "mean_and_sem",
    "per_record",
    "rome_metrics",
    "score_items",
]
