"""Where the goal enters the computation: attention to the goal token blocked one layer at a
time (Brinkmann et al. 2024, arXiv:2402.11917, Fig. 1 B: goal copying in layer 0).

The path can only be found with the goal, and the goal token comes after every edge. So every
route from the goal to the prediction starts with some position attending to the goal token, or
to the ``:`` after it (which can gather it in an earlier layer). For each layer ``l`` and each
of the two keys, this analysis zeroes the attention weight from every later position onto that
key in layer ``l`` only (the key still reads itself). It reports the mean loss at the path
positions, in nats; ``all layers`` blocks it in every layer at once.

The goal copying test reads one attention weight. This says where the goal is actually
*needed*:
- one layer whose block costs most of the loss: a single goal read, as in the paper's layer 0;
- many small costs that add up only when every layer is blocked: a read spread over layers
  (each can stand in for the others);
- a late layer: a model that collects candidates goal-blind (the choice in ``roles``) and
  picks among them late.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mechunlearn.models.handle import HookedModel
from mechunlearn.reasoning.analysis.common import (
    AnalysisSettings,
    TreeData,
    analysis_trees,
    check_tree_model,
    log_probs_of_targets,
)
from mechunlearn.reasoning.analysis.patterns import attention_control
from mechunlearn.reasoning.trees import TreeTaskConfig

KEYS = ("goal", "colon")


@dataclass
class GoalReadResult:
    clean_loss: float  # mean nats at the path positions
    blocked_loss: dict[str, list[float]]  # key -> per layer
    blocked_all_layers: dict[str, float]
    n_queries: int
    edge_order: str

    def to_json(self) -> dict[str, Any]:
        return {
            "clean_loss": self.clean_loss,
            "blocked_loss": self.blocked_loss,
            "blocked_all_layers": self.blocked_all_layers,
            "n_queries": self.n_queries,
            "edge_order": self.edge_order,
        }

    def markdown(self) -> str:
        n_layers = len(next(iter(self.blocked_loss.values())))
        header = " | ".join(f"L{layer}" for layer in range(n_layers))
        lines = [f"| reads of | {header} | all layers |", "|---|" + "---|" * (n_layers + 1)]
        for key, losses in self.blocked_loss.items():
            cells = " | ".join(f"{loss:.3f}" for loss in losses)
            lines.append(f"| {key} | {cells} | {self.blocked_all_layers[key]:.3f} |")
        lines += [
            "",
            f"Mean loss (nats) at the {self.n_queries} path positions when every position's "
            f"attention to that token is blocked in one layer (clean: {self.clean_loss:.4f}).",
        ]
        return "\n".join(lines) + "\n"


def key_block(data: TreeData, key: int) -> torch.Tensor:
    """``[B, T, T]`` bool: every query's weight on position ``key``, except ``key`` itself."""
    B, T = len(data), data.layout.n_positions
    mask = torch.zeros(B, T, T, dtype=torch.bool)
    mask[:, :, key] = True
    mask[:, key, key] = False
    return mask


def _path_loss(hm: HookedModel, data: TreeData, knockout: dict[int, torch.Tensor]) -> float:
    """Summed loss at the path positions under ``knockout``."""
    with torch.no_grad(), attention_control(hm, knockout=knockout):
        logits = hm.model(input_ids=data.inputs.to(hm.device)).logits
    q = data.queries
    return float(-log_probs_of_targets(logits, data)[q.rows, q.positions].sum())


def goal_read_analysis(
    hm: HookedModel, task: TreeTaskConfig, settings: AnalysisSettings | None = None
) -> GoalReadResult:
    """The path positions' loss with the goal (or ``:``) read blocked, layer by layer."""
    settings = settings or AnalysisSettings()
    check_tree_model(hm, task)
    data = analysis_trees(task, settings)
    layout = data.layout
    positions = {"goal": layout.goal, "colon": layout.colon}
    n_layers = hm.dims.n_layers
    clean = 0.0
    per_layer = {key: [0.0] * n_layers for key in KEYS}
    every = dict.fromkeys(KEYS, 0.0)
    for _, part in data.batches(settings.batch_size):
        clean += _path_loss(hm, part, {})
        for key in KEYS:
            mask = key_block(part, positions[key])
            for layer in range(n_layers):
                per_layer[key][layer] += _path_loss(hm, part, {layer: mask})
            every[key] += _path_loss(hm, part, dict.fromkeys(range(n_layers), mask))
    n_queries = len(data.queries)
    return GoalReadResult(
        clean_loss=clean / n_queries,
        blocked_loss={key: [v / n_queries for v in values] for key, values in per_layer.items()},
        blocked_all_layers={key: value / n_queries for key, value in every.items()},
        n_queries=n_queries,
        edge_order=settings.edge_order,
    )
