"""Deduction heads: the backward-chaining step (Brinkmann et al. 2024, arXiv:2402.11917,
Fig. 1 C; the reference's K-composition analysis ``M_qk2``).

After goal copying, the query position holds the goal ``a_0``. A deduction head in layer ``l``
holds chain node ``a_{l-1}`` in its query, attends to the *target token* of the edge
``a_l -> a_{l-1}`` (its key matches the target node; after edge merging that position also
holds the source) and copies the source ``a_l``, the parent: one level up the tree per layer.
The chain is useful until it reaches the next path node ``p_{i+1}``: for a query at distance
``d = L - i`` from the goal, layers ``1 <= l <= d - 1`` should attend to the edge into
``a_{l-1}`` (chain nodes as defined in ``common``).

Scores, for every layer and head:

- ``scores[l][h]``: the mean attention weight from the query to the target token of the edge
  into ``a_{l-1}``, over the (query, layer) pairs where that step is needed (``l <= d - 1``);
  ``uniform[l]`` is ``1 / (query position + 1)`` averaged over the same pairs;
- ``profile[l][h][k]``: the mean weight on the edge into ``a_k`` for every ``k <= d - 1``
  (queries where ``a_k`` exists); its arg-max shows which chain step each layer performs, so a
  chain that starts a layer late, or does two steps in one layer with two heads, is visible;
- ``answer_edge[l][h]``: the weight on the edge ``p_i -> p_{i+1}`` (the answer's own edge).

The edge is read where edge merging put it: at its target token (the paper's model), or at the
separator after it (``3e + 2``: a comma, or ``|`` after the last edge), where the small models
trained here merge edges. Both sites are scored; ``separator`` holds the second result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from mechunlearn.models.handle import HookedModel
from mechunlearn.reasoning.analysis.common import (
    AnalysisSettings,
    TreeData,
    analysis_trees,
    check_tree_model,
)
from mechunlearn.reasoning.analysis.patterns import run_patterns
from mechunlearn.reasoning.trees import TreeTaskConfig


@dataclass
class DeductionResult:
    scores: list[list[float | None]]  # [layer][head]; layer 0 and unneeded layers: None
    uniform: list[float | None]  # [layer]
    counts: list[int]  # [layer]: (query, layer) pairs that need step l
    profile: list[list[list[float | None]]]  # [layer][head][k]
    profile_counts: list[int]  # [k]
    answer_edge: list[list[float]]  # [layer][head]
    n_trees: int
    edge_order: str
    site: str = "target"
    separator: DeductionResult | None = None  # the same scores at the separator site

    def layer_score(self, layer: int) -> float | None:
        """The best head's score in ``layer``."""
        values = [v for v in self.scores[layer] if v is not None]
        return max(values) if values else None

    def best_steps(self) -> list[int | None]:
        """Per layer, the chain step ``k`` (edge into ``a_k``) the best head attends most."""
        out: list[int | None] = []
        for layer_profile in self.profile:
            best, best_k = -1.0, None
            for head in layer_profile:
                for k, value in enumerate(head):
                    if value is not None and value > best:
                        best, best_k = value, k
            out.append(best_k)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "scores": self.scores,
            "uniform": self.uniform,
            "counts": self.counts,
            "layer_scores": [self.layer_score(layer) for layer in range(len(self.scores))],
            "best_steps": self.best_steps(),
            "profile": self.profile,
            "profile_counts": self.profile_counts,
            "answer_edge": self.answer_edge,
            "n_trees": self.n_trees,
            "edge_order": self.edge_order,
            "site": self.site,
            "separator": None if self.separator is None else self.separator.to_json(),
        }


EdgeSite = Literal["target", "separator"]


@dataclass
class _Sums:
    """Running sums of one batch's deduction statistics (``deduction_sums``)."""

    step: torch.Tensor  # [L, H] weight on the edge into a_{l-1}, needed pairs
    step_count: torch.Tensor  # [L]
    step_uniform: torch.Tensor  # [L]
    profile: torch.Tensor  # [L, H, K]
    profile_count: torch.Tensor  # [K]
    answer: torch.Tensor  # [L, H]

    def __add__(self, other: _Sums) -> _Sums:
        return _Sums(
            *(a + b for a, b in zip(vars(self).values(), vars(other).values(), strict=True))
        )


def deduction_sums(
    patterns: dict[int, torch.Tensor], data: TreeData, site: EdgeSite = "target"
) -> _Sums:
    """The statistics of the module docstring, summed over the queries of ``data``, with each
    edge read at ``site``; ``patterns``: layer -> ``[B, H, T, T]`` (all layers)."""
    offset = 0 if site == "target" else 1
    q = data.queries
    d = q.distance
    n_layers = len(patterns)
    K = data.n - 1
    H = next(iter(patterns.values())).shape[1]
    # weight[l, Q, H, k]: attention from each query to the target token of the edge into a_k
    weights = torch.zeros(n_layers, len(q), H, K)
    exists = torch.zeros(len(q), K, dtype=torch.bool)
    for k in range(K):
        valid = d - 1 >= k
        exists[:, k] = valid
        position = (data.target_position_of(q.rows, data.chain_node(k)) + offset).clamp(min=0)
        for layer in range(n_layers):
            pattern = patterns[layer].cpu().float()
            weights[layer, :, :, k] = torch.where(
                valid[:, None], pattern[q.rows, :, q.positions, position], 0.0
            )
    profile = weights.sum(1)
    profile_count = exists.sum(0).float()
    step = torch.zeros(n_layers, H)
    step_count = torch.zeros(n_layers)
    step_uniform = torch.zeros(n_layers)
    uniform = 1.0 / (q.positions + 1).float()
    for layer in range(1, n_layers):
        needed = d - 1 >= layer  # step l reads the edge into a_{l-1}, needs l <= d - 1
        step[layer] = weights[layer, needed, :, layer - 1].sum(0)
        step_count[layer] = needed.sum()
        step_uniform[layer] = uniform[needed].sum()
    answer_k = (d - 1).clamp(max=K - 1)
    every = torch.arange(len(q))
    answer = torch.stack([weights[layer, every, :, answer_k].sum(0) for layer in range(n_layers)])
    return _Sums(step, step_count, step_uniform, profile, profile_count, answer)


def deduction_analysis(
    hm: HookedModel, task: TreeTaskConfig, settings: AnalysisSettings | None = None
) -> DeductionResult:
    """Per layer and head: attention on the next backward-chaining edge (see module docstring),
    at the target site; ``.separator`` holds the separator site."""
    settings = settings or AnalysisSettings()
    check_tree_model(hm, task)
    data = analysis_trees(task, settings)
    totals: dict[EdgeSite, _Sums] = {}
    for _, part in data.batches(settings.batch_size):
        _, patterns = run_patterns(hm, part.inputs)
        for site in ("target", "separator"):
            sums = deduction_sums(patterns, part, site)
            totals[site] = totals[site] + sums if site in totals else sums
    result = deduction_result(totals["target"], len(data), settings.edge_order)
    result.separator = deduction_result(
        totals["separator"], len(data), settings.edge_order, site="separator"
    )
    return result


def deduction_result(
    total: _Sums, n_trees: int, edge_order: str, site: EdgeSite = "target"
) -> DeductionResult:
    L, H = total.step.shape
    K = total.profile.shape[-1]
    scores = [
        [
            None
            if total.step_count[layer] == 0
            else float(total.step[layer, h] / total.step_count[layer])
            for h in range(H)
        ]
        for layer in range(L)
    ]
    uniform = [
        None
        if total.step_count[layer] == 0
        else float(total.step_uniform[layer] / total.step_count[layer])
        for layer in range(L)
    ]
    profile = [
        [
            [
                None
                if total.profile_count[k] == 0
                else float(total.profile[layer, h, k] / total.profile_count[k])
                for k in range(K)
            ]
            for h in range(H)
        ]
        for layer in range(L)
    ]
    n_queries = float(total.profile_count[0]) or 1.0
    return DeductionResult(
        scores=scores,
        uniform=uniform,
        counts=[int(c) for c in total.step_count],
        profile=profile,
        profile_counts=[int(c) for c in total.profile_count],
        answer_edge=(total.answer / n_queries).tolist(),
        n_trees=n_trees,
        edge_order=edge_order,
        site=site,
    )
