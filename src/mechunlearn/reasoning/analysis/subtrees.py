"""What the edge separators hold beyond their own edge: the subtree below the edge's target
(Brinkmann et al. 2024, arXiv:2402.11917, Sec. 5: register tokens hold subpaths that later
layers merge; the small models trained here gather each edge at its separator, so the
question is asked there).

In reversed topological order (the order the analyses use) every edge below ``v`` is printed
before the edge ``u -> v``, so the separator after that edge (its comma, or ``|`` after the
last edge) can gather ``v``'s whole subtree by attention alone. After each layer, a
multi-label linear probe (``probes.fit_multilabel_probe``, trees split in halves as for the
other probes) reads the set of ``v``'s descendants at that separator. Its recall on the
descendants ``h`` edges below ``v``, for every ``h``, says how deep a subtree each layer has
gathered:
- chaining among edge positions adds about one level per layer;
- pointer doubling, where separators read separators that already hold subtrees, adds about
  ``2**layer`` levels.

The false-positive rate on the other nodes is reported beside it, because a probe that calls
every node a descendant has full recall. ``held_depth[row]`` is the largest ``h`` such that
recall is at least ``MIN_RECALL`` at every hop up to ``h``, provided the false-positive rate
is at most ``MAX_FALSE_POSITIVES``; 0 means the separator holds no descendant reliably.
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
    residual_labels,
)
from mechunlearn.reasoning.analysis.probes import (
    DEFAULT_L2,
    fit_multilabel_probe,
    residual_batches,
    split_trees,
)
from mechunlearn.reasoning.trees import TreeTaskConfig

MIN_RECALL = 0.8
MAX_FALSE_POSITIVES = 0.1


@dataclass
class SubtreeResult:
    rows: list[str]
    hops: list[int]  # h = 1 .. n-2
    recall: list[list[float | None]]  # [row][hop index]; None: no descendant that deep
    false_positive_rate: list[float]  # [row]
    held_depth: list[int]  # [row]
    counts: list[int]  # [hop index]: held-out descendants h below their edge's target
    n_edges: int  # held-out separators
    n_trees: int
    edge_order: str

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "hops": self.hops,
            "recall": self.recall,
            "false_positive_rate": self.false_positive_rate,
            "held_depth": self.held_depth,
            "counts": self.counts,
            "n_edges": self.n_edges,
            "n_trees": self.n_trees,
            "edge_order": self.edge_order,
            "min_recall": MIN_RECALL,
            "max_false_positives": MAX_FALSE_POSITIVES,
        }

    def markdown(self) -> str:
        hops = [h for h, c in zip(self.hops, self.counts, strict=True) if c]
        header = " | ".join(f"h = {h}" for h in hops)
        lines = [
            f"| residual | {header} | false positives | subtree depth held |",
            "|---" * (len(hops) + 3) + "|",
        ]
        for row, label in enumerate(self.rows):
            cells = [
                "-" if r is None else f"{r:.2f}"
                for r, c in zip(self.recall[row], self.counts, strict=True)
                if c
            ]
            lines.append(
                f"| {label} | {' | '.join(cells)} | {self.false_positive_rate[row]:.2f} | "
                f"{self.held_depth[row]} |"
            )
        counts = ", ".join(f"h = {h}: {c}" for h, c in zip(self.hops, self.counts, strict=True))
        lines.append("")
        lines.append(
            f"Recall of a multi-label probe for the descendants of each edge's target, at the "
            f"separator after the edge, by how many edges below the target they are (held-out "
            f"descendants: {counts}; {self.n_edges} held-out separators). Subtree depth held: the "
            f"deepest h with recall >= {MIN_RECALL} at every hop up to it, with false positives "
            f"<= {MAX_FALSE_POSITIVES}."
        )
        return "\n".join(lines) + "\n"


def descendant_hops(parent: torch.Tensor) -> torch.Tensor:
    """``[B, n, n]`` long: ``hops[b, v, x]`` = edges from ``v`` down to its descendant ``x``,
    0 where ``x`` is not below ``v`` (``parent[b, v]`` = -1 for the root)."""
    B, n = parent.shape
    hops = torch.zeros(B, n, n, dtype=torch.long)
    rows = torch.arange(B)
    ancestor = parent.clone()
    for h in range(1, n):
        alive = ancestor >= 0  # [B, n] over x
        b, x = torch.nonzero(alive, as_tuple=True)
        hops[b, ancestor[b, x], x] = h
        ancestor = torch.where(alive, parent[rows[:, None], ancestor.clamp(min=0)], -1)
    return hops


def held_depth(recall: list[float | None], false_positives: float) -> int:
    """The deepest hop up to which every hop is recalled (see module docstring)."""
    if false_positives > MAX_FALSE_POSITIVES:
        return 0
    depth = 0
    for value in recall:
        if value is None or value < MIN_RECALL:
            break
        depth += 1
    return depth


def _separator_rows(hm: HookedModel, data: TreeData, batch_size: int) -> torch.Tensor:
    """``[R, B*(n-1), d]``: every residual row at the separator after each edge."""
    separators = torch.arange(data.n - 1) * 3 + 2
    parts = [
        stacked[:, :, separators].flatten(1, 2)
        for _, stacked in residual_batches(hm, data, batch_size)
    ]
    return torch.cat(parts, 1)


def subtree_analysis(
    hm: HookedModel,
    task: TreeTaskConfig,
    settings: AnalysisSettings | None = None,
    l2: float = DEFAULT_L2,
) -> SubtreeResult:
    """Probe the descendant set of each edge's target at its separator, after every layer."""
    settings = settings or AnalysisSettings()
    check_tree_model(hm, task)
    data = analysis_trees(task, settings)
    n = data.n
    x = _separator_rows(hm, data, settings.batch_size)
    trees = data.trees
    hops = descendant_hops(trees.parent)  # [B, n, n]
    targets = trees.edges[..., 1]  # [B, n-1]
    edge_hops = hops[torch.arange(len(data))[:, None], targets].flatten(0, 1)  # [B*(n-1), n]
    labels = edge_hops > 0
    train = split_trees(len(data), settings.seed).repeat_interleave(n - 1)
    test_hops = edge_hops[~train]
    negatives = ~labels[~train]
    hop_values = list(range(1, n - 1))
    counts = [int((test_hops == h).sum()) for h in hop_values]
    recall, false_positives, depth = [], [], []
    for row in range(x.shape[0]):
        probe = fit_multilabel_probe(x[row, train], labels[train], l2=l2)
        predicted = probe.predict(x[row, ~train])
        per_hop = [
            float(predicted[test_hops == h].float().mean()) if count else None
            for h, count in zip(hop_values, counts, strict=True)
        ]
        fp = float(predicted[negatives].float().mean()) if negatives.any() else 0.0
        recall.append(per_hop)
        false_positives.append(fp)
        depth.append(held_depth([r for r in per_hop if r is not None], fp))
    return SubtreeResult(
        rows=residual_labels(hm.dims.n_layers),
        hops=hop_values,
        recall=recall,
        false_positive_rate=false_positives,
        held_depth=depth,
        counts=counts,
        n_edges=int((~train).sum()),
        n_trees=len(data),
        edge_order=settings.edge_order,
    )
