"""Shared inputs of the tree-model analyses (Brinkmann et al. 2024, arXiv:2402.11917):
the analysed trees, the positions the model predicts from, the backward chain each prediction
needs, and the residual-stream rows the probes read.

Notation used by every analysis (layout of ``reasoning.tokens``): a tree with path
``root = p_0 -> p_1 -> ... -> p_L = goal`` is predicted from the *query positions*
``root + i`` for ``i < L`` (the token there is ``p_i``, the "current node"; the target is
``p_{i+1}``). The backward chain of query ``i`` starts at the goal and climbs one edge per
step: ``a_k = p_{max(L - k, i + 1)}`` (``a_0`` is the goal; the chain stops at the next node
``p_{i+1}``, reached after ``d - 1`` steps where ``d = L - i`` is the query's distance to the
goal). The edge that leads into ``a_k`` is printed at ``3e`` (source) / ``3e + 1`` (target).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
from pydantic import BaseModel, Field

from mechunlearn.errors import ConfigError
from mechunlearn.models.handle import HookedModel
from mechunlearn.reasoning.tokens import TreeLayout, TreeVocab, encode_batch
from mechunlearn.reasoning.trees import TreeBatch, TreeTaskConfig, heldout_trees
from mechunlearn.schema import STRICT_CONFIG

AnalysisOrder = Literal["backward", "random", "forward"]


class AnalysisSettings(BaseModel):
    """Which trees the mechanism analyses look at and how they are batched."""

    model_config = STRICT_CONFIG

    n_trees: int = Field(default=512, ge=8, description="held-out trees, stratified by length")
    seed: int = 0
    edge_order: AnalysisOrder = Field(
        default="backward",
        description="edge order of the analysed trees (the paper analyses reversed order)",
    )
    batch_size: int = Field(default=256, ge=1)


@dataclass
class Queries:
    """The query positions of a batch, flattened: one entry per (tree, path step ``i < L``)."""

    rows: torch.Tensor  # [Q] tree index
    positions: torch.Tensor  # [Q] token position root + i
    step: torch.Tensor  # [Q] i
    length: torch.Tensor  # [Q] L of the tree

    @property
    def distance(self) -> torch.Tensor:
        """``d = L - i``: edges from the current node to the goal."""
        return self.length - self.step

    def __len__(self) -> int:
        return int(self.rows.shape[0])


@dataclass
class TreeData:
    """A batch of analysed trees with the derived indices every analysis needs."""

    trees: TreeBatch

    @property
    def n(self) -> int:
        return self.trees.n

    @cached_property
    def layout(self) -> TreeLayout:
        return TreeLayout(self.n)

    @cached_property
    def vocab(self) -> TreeVocab:
        return TreeVocab(self.n)

    @cached_property
    def tokens(self) -> torch.Tensor:
        """``[B, 4n-1]`` token ids; the model reads ``tokens[:, :-1]``."""
        return encode_batch(self.trees)

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    def __len__(self) -> int:
        return len(self.trees)

    def select(self, rows: torch.Tensor | slice) -> TreeData:
        if isinstance(rows, slice):
            rows = torch.arange(len(self))[rows]
        return TreeData(self.trees.select(rows))

    def batches(self, size: int) -> Iterator[tuple[int, TreeData]]:
        for start in range(0, len(self), size):
            yield start, self.select(slice(start, start + size))

    @cached_property
    def queries(self) -> Queries:
        lengths = self.trees.path_length
        steps = torch.arange(self.n - 1)
        valid = steps[None, :] < lengths[:, None]
        rows, step = torch.nonzero(valid, as_tuple=True)
        return Queries(rows, self.layout.root + step, step, lengths[rows])

    @cached_property
    def query_mask(self) -> torch.Tensor:
        """``[B, T]`` bool over the model's input positions: True at query positions."""
        mask = torch.zeros(len(self), self.layout.n_positions, dtype=torch.bool)
        q = self.queries
        mask[q.rows, q.positions] = True
        return mask

    @cached_property
    def edge_of_target(self) -> torch.Tensor:
        """``[B, n]``: index of the edge whose target is node ``v`` (-1 for the root)."""
        B, n = len(self), self.n
        out = torch.full((B, n), -1, dtype=torch.long)
        edges = torch.arange(n - 1).expand(B, n - 1)
        out.scatter_(1, self.trees.edges[..., 1], edges)
        return out

    def target_position_of(self, rows: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
        """Token position of the target token of the edge into ``nodes`` (-1 for a root)."""
        edge = self.edge_of_target[rows, nodes]
        return torch.where(edge >= 0, 3 * edge + 1, -1)

    def chain_node(self, k: int | torch.Tensor) -> torch.Tensor:
        """``[Q]`` the chain node ``a_k`` of every query (see module docstring)."""
        q = self.queries
        index = torch.maximum(q.length - k, q.step + 1)
        return self.trees.path[q.rows, index]

    @cached_property
    def children(self) -> torch.Tensor:
        """``[B, n, n]`` bool: ``children[b, u, v]`` when ``u -> v`` is an edge."""
        B, n = len(self), self.n
        out = torch.zeros(B, n, n, dtype=torch.bool)
        rows = torch.arange(B)[:, None].expand(B, n - 1)
        out[rows, self.trees.edges[..., 0], self.trees.edges[..., 1]] = True
        return out


def analysis_trees(task: TreeTaskConfig, settings: AnalysisSettings) -> TreeData:
    """``settings.n_trees`` held-out trees (never trained on), an equal share per path
    length 1..n-1, in ``settings.edge_order``."""
    lengths = task.n_nodes - 1
    per_length = max(1, -(-settings.n_trees // lengths))
    trees = heldout_trees(task, per_length, seed=settings.seed, edge_order=settings.edge_order)
    return TreeData(trees)


def check_tree_model(hm: HookedModel, task: TreeTaskConfig) -> None:
    """The analyses need the GPT-2 tree model of ``task``'s size (ConfigError otherwise)."""
    adapter = hm.require_adapter()
    if adapter.family != "gpt2":
        raise ConfigError(
            f"tree analyses need the GPT-2 path-finding model, got a {adapter.family} model"
        )
    layout = TreeLayout(task.n_nodes)
    if hm.dims.vocab_size != layout.vocab_size:
        raise ConfigError(
            f"model vocabulary {hm.dims.vocab_size} does not fit trees of n={task.n_nodes} "
            f"(needs {layout.vocab_size})"
        )
    layout.check_model_positions(hm.model.config.n_positions)


def separator_positions(n: int) -> torch.Tensor:
    """The commas after edges ``0..n-3`` (the last edge's separator is ``|``, another token)."""
    return torch.arange(n - 2) * 3 + 2


def residual_sites(n_layers: int) -> list[str]:
    """Residual rows: ``embed`` (= ``blocks.0.resid_pre``), then ``blocks.L.resid_post``."""
    return ["blocks.0.resid_pre"] + [f"blocks.{layer}.resid_post" for layer in range(n_layers)]


def residual_labels(n_layers: int) -> list[str]:
    return ["embed"] + [f"L{layer}" for layer in range(n_layers)]


def log_probs_of_targets(logits: torch.Tensor, data: TreeData) -> torch.Tensor:
    """``[B, T]`` log-probability of the true next token at every position."""
    logp = logits.float().log_softmax(-1)
    return logp.gather(-1, data.tokens[:, 1:].to(logp.device)[..., None]).squeeze(-1).cpu()
