"""Accuracy by path length and by edge order (Brinkmann et al. 2024, arXiv:2402.11917:
whole-path accuracy on held-out trees, broken down by the number of reasoning steps).

Whole-path accuracy is teacher-forced argmax at every path step (equal to greedy decoding, see
``reasoning.train``); the evaluation set is the held-out split (``trees.heldout_trees``),
``per_length`` trees per path length, once in the task's own edge-order mix and once per pure
order (reversed topological, shuffled), so a failure tied to one order is visible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mechunlearn.models.handle import HookedModel
from mechunlearn.reasoning.train import TreeAccuracy, evaluate_accuracy
from mechunlearn.reasoning.trees import TreeTaskConfig, heldout_trees

ORDERS = ("backward", "random")


@dataclass
class AccuracyResult:
    """Held-out whole-path accuracy: the task's mix (``overall``/``by_length``) and each order."""

    overall: float
    by_length: dict[int, float]
    counts: dict[int, int]
    token_accuracy: float
    loss: float
    by_order: dict[str, dict[str, Any]] = field(default_factory=dict)
    per_length: int = 0
    seed: int = 0

    @property
    def min_length_accuracy(self) -> float:
        return min(self.by_length.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "overall": self.overall,
            "by_length": {str(k): v for k, v in self.by_length.items()},
            "counts": {str(k): v for k, v in self.counts.items()},
            "token_accuracy": self.token_accuracy,
            "loss": self.loss,
            "by_order": self.by_order,
            "per_length": self.per_length,
            "seed": self.seed,
        }


def _order_entry(accuracy: TreeAccuracy) -> dict[str, Any]:
    return {
        "overall": accuracy.overall,
        "by_length": {str(k): v for k, v in accuracy.by_length.items()},
    }


def accuracy_analysis(
    hm: HookedModel,
    task: TreeTaskConfig,
    per_length: int = 100,
    seed: int = 0,
    batch_size: int = 1024,
) -> AccuracyResult:
    """Whole-path accuracy by path length, overall and per edge order."""
    mixed = evaluate_accuracy(hm.model, heldout_trees(task, per_length, seed=seed), batch_size)
    by_order = {
        order: _order_entry(
            evaluate_accuracy(
                hm.model,
                heldout_trees(task, per_length, seed=seed, edge_order=order),
                batch_size,
            )
        )
        for order in ORDERS
    }
    return AccuracyResult(
        overall=mixed.overall,
        by_length=mixed.by_length,
        counts=mixed.counts,
        token_accuracy=mixed.token_accuracy,
        loss=mixed.loss,
        by_order=by_order,
        per_length=per_length,
        seed=seed,
    )
