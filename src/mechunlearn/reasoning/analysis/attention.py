"""Attention patterns of the two input-reading steps of backward chaining (Brinkmann et al.
2024, arXiv:2402.11917, Fig. 1 A/B):

- *edge merging*: in layer 0 each edge's target token ``>B`` (position ``3e + 1``) attends to
  its source token ``A`` (``3e``), so the target position holds the whole edge. A model may
  merge the edge one position later instead, at its separator ``,`` (``3e + 2``, which sees
  both tokens); small models trained here do, so that site is scored too (``separator_merging``:
  the separator's weight on its own source plus target, against a uniform ``2 / (pos + 1)``);
- *goal copying*: the query positions (the path tokens from the root on, which predict the
  next node) attend to the goal token (position ``3n - 3``) and copy the goal.

For every layer and head the score is the mean attention weight on the expected key over all
queries of that kind in the analysed trees; the reference is the uniform weight
``1 / (query position + 1)`` a causal head would give every visible key. The patterns are
recomputed from the residual stream (``patterns``), averaged over trees into ``mean_patterns``
for the figure (positions are fixed by the layout, so averaging is meaningful).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mechunlearn.models.handle import HookedModel
from mechunlearn.reasoning.analysis.common import (
    AnalysisSettings,
    TreeData,
    analysis_trees,
    check_tree_model,
    separator_positions,
)
from mechunlearn.reasoning.analysis.patterns import run_patterns
from mechunlearn.reasoning.trees import TreeTaskConfig


@dataclass
class AttentionResult:
    """``[layer][head]`` mean attention on the expected key, and the uniform reference."""

    edge_merging: list[list[float]]
    edge_merging_uniform: float
    separator_merging: list[list[float]]
    separator_merging_uniform: float
    goal_copying: list[list[float]]
    goal_copying_uniform: float
    n_trees: int
    edge_order: str
    mean_patterns: list[torch.Tensor] = field(default_factory=list, repr=False)
    """Per layer ``[H, T, T]``, averaged over trees (figures only, not in the JSON)."""

    def best(self, kind: str) -> tuple[int, int, float]:
        """(layer, head, score) of the highest ``edge_merging`` / ``goal_copying`` score."""
        table = getattr(self, kind)
        return max(
            (
                (layer, head, value)
                for layer, row in enumerate(table)
                for head, value in enumerate(row)
            ),
            key=lambda item: item[2],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "edge_merging": self.edge_merging,
            "edge_merging_uniform": self.edge_merging_uniform,
            "separator_merging": self.separator_merging,
            "separator_merging_uniform": self.separator_merging_uniform,
            "goal_copying": self.goal_copying,
            "goal_copying_uniform": self.goal_copying_uniform,
            "best_edge_merging": dict(
                zip(("layer", "head", "score"), self.best("edge_merging"), strict=True)
            ),
            "best_separator_merging": dict(
                zip(("layer", "head", "score"), self.best("separator_merging"), strict=True)
            ),
            "best_goal_copying": dict(
                zip(("layer", "head", "score"), self.best("goal_copying"), strict=True)
            ),
            "n_trees": self.n_trees,
            "edge_order": self.edge_order,
        }


def edge_merging_mass(patterns: dict[int, torch.Tensor], data: TreeData) -> torch.Tensor:
    """``[layers, heads]`` summed attention from every edge's target token to its source."""
    targets = torch.arange(data.n - 1) * 3 + 1
    # pattern[:, :, targets, targets - 1] is [B, H, E]: the weight of each target on its source
    return torch.stack(
        [
            patterns[layer].cpu()[:, :, targets, targets - 1].sum(dim=(0, 2))
            for layer in sorted(patterns)
        ]
    )


def separator_merging_mass(patterns: dict[int, torch.Tensor], data: TreeData) -> torch.Tensor:
    """``[layers, heads]`` summed attention from every comma to its own edge (source + target)."""
    commas = separator_positions(data.n)
    return torch.stack(
        [
            (
                patterns[layer].cpu()[:, :, commas, commas - 2]
                + patterns[layer].cpu()[:, :, commas, commas - 1]
            ).sum(dim=(0, 2))
            for layer in sorted(patterns)
        ]
    )


def goal_copying_mass(patterns: dict[int, torch.Tensor], data: TreeData) -> torch.Tensor:
    """``[layers, heads]`` summed attention from every query position to the goal token."""
    q = data.queries
    goal = torch.full_like(q.positions, data.layout.goal)
    # advanced indices split by the head slice: the result is [Q, H]
    return torch.stack(
        [patterns[layer].cpu()[q.rows, :, q.positions, goal].sum(0) for layer in sorted(patterns)]
    )


def attention_analysis(
    hm: HookedModel, task: TreeTaskConfig, settings: AnalysisSettings | None = None
) -> AttentionResult:
    """Edge-merging and goal-copying scores for every layer and head."""
    settings = settings or AnalysisSettings()
    check_tree_model(hm, task)
    data = analysis_trees(task, settings)
    L, H = hm.dims.n_layers, hm.dims.n_heads
    merge, separator, goal = torch.zeros(L, H), torch.zeros(L, H), torch.zeros(L, H)
    pattern_sum: torch.Tensor | None = None
    for _, part in data.batches(settings.batch_size):
        _, patterns = run_patterns(hm, part.inputs)
        merge += edge_merging_mass(patterns, part)
        separator += separator_merging_mass(patterns, part)
        goal += goal_copying_mass(patterns, part)
        total = torch.stack([patterns[layer].float().sum(0).cpu() for layer in range(L)])
        pattern_sum = total if pattern_sum is None else pattern_sum + total
    n_edges = len(data) * (data.n - 1)
    n_queries = len(data.queries)
    targets = torch.arange(data.n - 1) * 3 + 1
    commas = separator_positions(data.n)
    assert pattern_sum is not None
    return AttentionResult(
        edge_merging=(merge / n_edges).tolist(),
        edge_merging_uniform=float((1.0 / (targets + 1).float()).mean()),
        separator_merging=(separator / (len(data) * len(commas))).tolist(),
        separator_merging_uniform=float((2.0 / (commas + 1).float()).mean()),
        goal_copying=(goal / n_queries).tolist(),
        goal_copying_uniform=float((1.0 / (data.queries.positions + 1).float()).mean()),
        n_trees=len(data),
        edge_order=settings.edge_order,
        mean_patterns=list(pattern_sum / len(data)),
    )
