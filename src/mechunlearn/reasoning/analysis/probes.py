"""Linear probes on the residual stream of the tree model, per layer and position kind
(Brinkmann et al. 2024, arXiv:2402.11917; the reference's "edge aggregation",
"goal aggregation" and "children of the current node" probes).

Each probe reads one variable from one kind of position at every residual row (``embed`` =
``blocks.0.resid_pre``, then ``blocks.L.resid_post``):

- ``source_at_target``: at every edge's target token, the edge's source (edge merging puts it
  there in layer 0; at ``embed`` it is at chance);
- ``source_at_separator``: the same at the comma after each edge (the other merging site);
- ``goal_at_path``: at the query positions, the goal (goal copying);
- ``current_at_path`` / ``next_at_path``: the current node ``p_i`` (the token itself: a sanity
  check, decodable from ``embed``) and the answer ``p_{i+1}``;
- ``chain_at_path``: after layer ``l``, the backward-chain node ``a_l`` (``common``), the
  variable the causal-scrubbing hypothesis assigns to that layer;
- ``children_at_path`` / ``nonleaf_children_at_path`` (multi-label, one-step lookahead): the
  set of children of the current node, and of those that are not leaves.

Multi-class probes are multinomial logistic regressions (``localize.probes.fit_probe``);
multi-label probes are one logistic regression per node (binary cross-entropy, fitted jointly
with L-BFGS, standardised features, L2 on the weights). Trees, not positions, are split into
train and held-out halves (seeded), so no tree is seen on both sides. Chance: the most
frequent training label (multi-class) or label set (multi-label subset accuracy) scored on the
held-out half; for the multi-label F1, guessing each node with its training frequency.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mechunlearn.localize.probes import fit_probe, fit_standardised_linear
from mechunlearn.models.handle import HookedModel
from mechunlearn.reasoning.analysis.common import (
    AnalysisSettings,
    TreeData,
    analysis_trees,
    check_tree_model,
    residual_labels,
    residual_sites,
    separator_positions,
)
from mechunlearn.reasoning.trees import TreeTaskConfig

DEFAULT_L2 = 1e-3


@dataclass
class ProbeCurve:
    """Held-out accuracy of one probe at every residual row (``None``: not probed there)."""

    name: str
    position: str
    kind: str  # "multiclass" | "multilabel"
    test_accuracy: list[float | None]
    train_accuracy: list[float | None]
    chance: float
    n_train: int
    n_test: int
    test_f1: list[float | None] = field(default_factory=list)  # multi-label only
    chance_f1: float | None = None

    def best(self) -> tuple[int, float]:
        """(row, held-out accuracy) of the best row."""
        rows = [(i, a) for i, a in enumerate(self.test_accuracy) if a is not None]
        return max(rows, key=lambda item: item[1])

    def to_json(self) -> dict[str, Any]:
        out = {
            "position": self.position,
            "kind": self.kind,
            "test_accuracy": self.test_accuracy,
            "train_accuracy": self.train_accuracy,
            "chance": self.chance,
            "n_train": self.n_train,
            "n_test": self.n_test,
        }
        if self.kind == "multilabel":
            out |= {"test_f1": self.test_f1, "chance_f1": self.chance_f1}
        return out


@dataclass
class ProbeResult:
    rows: list[str]
    curves: dict[str, ProbeCurve]
    n_trees: int
    edge_order: str

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "probes": {name: curve.to_json() for name, curve in self.curves.items()},
            "n_trees": self.n_trees,
            "edge_order": self.edge_order,
        }


# ---- multi-label probe ------------------------------------------------------------------


@dataclass
class MultiLabelProbe:
    weight: torch.Tensor  # [k, d]
    bias: torch.Tensor  # [k]
    mean: torch.Tensor
    scale: torch.Tensor

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        z = (x.float() - self.mean) / self.scale
        return (z @ self.weight.T + self.bias) > 0


def fit_multilabel_probe(
    x: torch.Tensor, y: torch.Tensor, l2: float = DEFAULT_L2, max_iter: int = 200
) -> MultiLabelProbe:
    """One logistic regression per label column of ``y [n, k]`` (0/1), fitted jointly:
    ``mean BCE + l2 * ||W||^2 / 2`` with L-BFGS from zero (deterministic)."""
    y = y.float()
    weight, bias, mean, scale = fit_standardised_linear(
        x, y.shape[1], lambda logits: F.binary_cross_entropy_with_logits(logits, y), l2, max_iter
    )
    return MultiLabelProbe(weight, bias, mean, scale)


def subset_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred.bool() == y.bool()).all(1).float().mean())


def micro_f1(pred: torch.Tensor, y: torch.Tensor) -> float:
    pred, y = pred.bool(), y.bool()
    tp = float((pred & y).sum())
    denominator = float(pred.sum() + y.sum())
    return 2 * tp / denominator if denominator else 1.0


# ---- data -------------------------------------------------------------------------------


@torch.no_grad()
def residual_batches(
    hm: HookedModel, data: TreeData, batch_size: int
) -> Iterator[tuple[TreeData, torch.Tensor]]:
    """Each batch of ``data`` with its residual rows ``[R, b, T, d]`` on the CPU (``embed``,
    then after every layer): what every probe reads."""
    sites = residual_sites(hm.dims.n_layers)
    for _, part in data.batches(batch_size):
        with hm.hooks(cache=sites) as cache:
            hm.model(input_ids=part.inputs.to(hm.device))
        yield part, torch.stack([cache[site].float().cpu() for site in sites])


def _gather(
    hm: HookedModel, data: TreeData, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Residual rows at edge target tokens ``[R, B*(n-1), d]``, at the commas after edges
    ``[R, B*(n-2), d]`` and at queries ``[R, Q, d]``."""
    targets = torch.arange(data.n - 1) * 3 + 1
    commas = separator_positions(data.n)
    at_targets, at_commas, at_queries = [], [], []
    for part, stacked in residual_batches(hm, data, batch_size):
        q = part.queries
        at_targets.append(stacked[:, :, targets].flatten(1, 2))
        at_commas.append(stacked[:, :, commas].flatten(1, 2))
        at_queries.append(stacked[:, q.rows, q.positions])
    return torch.cat(at_targets, 1), torch.cat(at_commas, 1), torch.cat(at_queries, 1)


def split_trees(n_trees: int, seed: int) -> torch.Tensor:
    """Bool ``[n_trees]``: the training half of the trees (seeded)."""
    order = torch.randperm(n_trees, generator=torch.Generator().manual_seed(seed))
    train = torch.zeros(n_trees, dtype=torch.bool)
    train[order[: n_trees // 2]] = True
    return train


def _majority_chance(y_train: torch.Tensor, y_test: torch.Tensor) -> float:
    values, counts = torch.unique(y_train, return_counts=True)
    return float((y_test == values[counts.argmax()]).float().mean())


def _multiclass_curve(
    name: str,
    position: str,
    x: torch.Tensor,
    labels: list[torch.Tensor | None],
    train: torch.Tensor,
    n_classes: int,
    l2: float,
) -> ProbeCurve:
    """``labels[row]``: the label of every sample at that row (None: skip the row)."""
    test_acc, train_acc, chances = [], [], []
    for row, y in enumerate(labels):
        if y is None or len(set(y[train].tolist())) < 2:
            test_acc.append(None)
            train_acc.append(None)
            continue
        probe = fit_probe(x[row, train], y[train], n_classes=n_classes, l2=l2)
        test_acc.append(probe.accuracy(x[row, ~train], y[~train]))
        train_acc.append(probe.accuracy(x[row, train], y[train]))
        chances.append(_majority_chance(y[train], y[~train]))
    return ProbeCurve(
        name=name,
        position=position,
        kind="multiclass",
        test_accuracy=test_acc,
        train_accuracy=train_acc,
        chance=max(chances) if chances else float("nan"),
        n_train=int(train.sum()),
        n_test=int((~train).sum()),
    )


def _multilabel_curve(
    name: str, position: str, x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, l2: float
) -> ProbeCurve:
    y_train, y_test = y[train], y[~train]
    sets, counts = torch.unique(y_train, dim=0, return_counts=True)
    common = sets[counts.argmax()]
    chance = float((y_test == common).all(1).float().mean())
    prior = y_train.float().mean(0)
    expected_tp = float((prior * y_test.float()).sum())
    expected_pred = float(prior.sum()) * y_test.shape[0]
    positives = float(y_test.sum())
    chance_f1 = 2 * expected_tp / (expected_pred + positives) if expected_pred + positives else 0.0
    test_acc, train_acc, test_f1 = [], [], []
    for row in range(x.shape[0]):
        probe = fit_multilabel_probe(x[row, train], y_train, l2=l2)
        prediction = probe.predict(x[row, ~train])
        test_acc.append(subset_accuracy(prediction, y_test))
        test_f1.append(micro_f1(prediction, y_test))
        train_acc.append(subset_accuracy(probe.predict(x[row, train]), y_train))
    return ProbeCurve(
        name=name,
        position=position,
        kind="multilabel",
        test_accuracy=test_acc,
        train_accuracy=train_acc,
        chance=chance,
        n_train=int(train.sum()),
        n_test=int((~train).sum()),
        test_f1=test_f1,
        chance_f1=chance_f1,
    )


def probe_analysis(
    hm: HookedModel,
    task: TreeTaskConfig,
    settings: AnalysisSettings | None = None,
    l2: float = DEFAULT_L2,
) -> ProbeResult:
    """Fit every probe of the module docstring at every residual row."""
    settings = settings or AnalysisSettings()
    check_tree_model(hm, task)
    data = analysis_trees(task, settings)
    n, n_rows = data.n, hm.dims.n_layers + 1
    at_targets, at_commas, at_queries = _gather(hm, data, settings.batch_size)
    train_trees = split_trees(len(data), settings.seed)
    q = data.queries
    train_q = train_trees[q.rows]
    train_t = train_trees.repeat_interleave(n - 1)
    trees = data.trees
    path = trees.path
    curves: dict[str, ProbeCurve] = {}

    sources = trees.edges[..., 0].flatten()
    curves["source_at_target"] = _multiclass_curve(
        "source_at_target", "edge targets", at_targets, [sources] * n_rows, train_t, n, l2
    )
    comma_sources = trees.edges[:, : n - 2, 0].flatten()
    train_c = train_trees.repeat_interleave(n - 2)
    curves["source_at_separator"] = _multiclass_curve(
        "source_at_separator", "commas", at_commas, [comma_sources] * n_rows, train_c, n, l2
    )
    goal = trees.goal[q.rows]
    current = path[q.rows, q.step]
    nxt = path[q.rows, q.step + 1]
    for name, y in (("goal_at_path", goal), ("current_at_path", current), ("next_at_path", nxt)):
        curves[name] = _multiclass_curve(name, "path", at_queries, [y] * n_rows, train_q, n, l2)
    chain = [None] + [data.chain_node(layer) for layer in range(n_rows - 1)]
    curves["chain_at_path"] = _multiclass_curve(
        "chain_at_path", "path", at_queries, chain, train_q, n, l2
    )
    children = data.children[q.rows, current]  # [Q, n]
    has_children = data.children.any(-1)  # [B, n]
    nonleaf = children & has_children[q.rows]
    curves["children_at_path"] = _multilabel_curve(
        "children_at_path", "path", at_queries, children, train_q, l2
    )
    curves["nonleaf_children_at_path"] = _multilabel_curve(
        "nonleaf_children_at_path", "path", at_queries, nonleaf, train_q, l2
    )
    return ProbeResult(
        rows=residual_labels(hm.dims.n_layers),
        curves=curves,
        n_trees=len(data),
        edge_order=settings.edge_order,
    )
