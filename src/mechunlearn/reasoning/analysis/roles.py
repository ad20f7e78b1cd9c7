"""Where the path positions read: attention mass by key role, per layer and head.

The mechanism analyses of Brinkmann et al. 2024 (arXiv:2402.11917) each test one expected read
(the goal token, the target of one chain edge). A model that solves the task another way
fails them all without saying what it does instead. This map partitions every visible key of
a query position (``common``: the path token ``p_i`` predicting ``p_{i+1}``) into roles and
reports the attention mass on each, so the rows of a layer sum to one:

- ``remaining path edges (source | target | separator)``: the tokens of the edges
  ``p_i -> p_{i+1} -> ... -> goal`` still to be walked, i.e. what backward chaining climbs;
  the separator is the comma after the edge (``|`` after the last edge);
- ``other edges (source | target | separator)``: every other edge's tokens;
- ``goal``, ``colon`` and ``path so far`` (the root and the path tokens up to the query).

A deduction head of the paper shows up as mass on remaining-path targets concentrated in one
chain step per layer (``deduction``); a model that reads the whole remaining path at once puts
the mass here without passing the per-step test.

A second map says *which* separators are read (``SEPARATOR_GROUPS``), because the deeper
models trained here read the remaining path's separators directly. Each edge ``u -> v`` is:
- ``answer edge``: ``v = p_{i+1}``;
- ``rest of remaining path``: ``v`` is ``p_{i+2}`` .. goal;
- ``walked path``: ``v`` is ``p_1`` .. ``p_i``;
- ``current node's other children``: ``u = p_i``, ``v`` not on the path;
- ``off the path``: every other edge.
A read keyed on "the goal is below this edge" takes the walked path with the remaining one; a
read keyed on the current node takes its other children with the answer edge. Most current
nodes have one child, so the decisive number is the *choice*: on the queries whose current
node has a second child, the weight on the answer edge against the weight on that other
child. A goal-blind read of the children (one-step lookahead) splits it evenly; a read that
already knows which child leads to the goal does not.
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
)
from mechunlearn.reasoning.analysis.patterns import run_patterns
from mechunlearn.reasoning.trees import TreeTaskConfig

ROLES = (
    "remaining path edges: source",
    "remaining path edges: target",
    "remaining path edges: separator",
    "other edges: source",
    "other edges: target",
    "other edges: separator",
    "goal",
    "colon",
    "path so far",
)
SEPARATOR_GROUPS = (
    "answer edge",
    "rest of remaining path",
    "walked path",
    "current node's other children",
    "off the path",
)


@dataclass
class RoleResult:
    """``mass[layer][head][role]``: mean attention mass from the query positions on each role
    (``ROLES``); ``uniform[role]``: the same for a head that spreads evenly over visible keys."""

    roles: list[str]
    mass: list[list[list[float]]]
    uniform: list[float]
    n_queries: int
    edge_order: str
    # the same for the separators of each group of edges (``SEPARATOR_GROUPS``)
    separator_groups: list[str]
    separator_mass: list[list[list[float]]]
    separator_uniform: list[float]
    # queries whose current node has a second child: mass on [answer edge, other child]
    choice_queries: int
    choice_mass: list[list[list[float]]]

    def columns(self) -> list[tuple[str, list[float]]]:
        """(label, mass per role) for every (layer, head), then the uniform head."""
        return _head_columns(self.mass) + [("uniform", self.uniform)]

    def markdown(self) -> str:
        """Roles as rows, one column per (layer, head), the uniform head last (percent)."""
        columns = self.columns()
        rows = [
            "| key role | " + " | ".join(name for name, _ in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        for index, role in enumerate(self.roles):
            cells = " | ".join(f"{100 * mass[index]:.0f}" for _, mass in columns)
            rows.append(f"| {role} | {cells} |")
        rows += [
            "",
            "Of that, on the separators of each group of edges (the edge into the next path "
            "node, the rest of the remaining path, the path already walked, the current "
            "node's other children, the rest):",
            "",
            "| separator of | " + " | ".join(name for name, _ in columns) + " |",
            "|---|" + "---|" * len(columns),
        ]
        groups = _head_columns(self.separator_mass) + [("uniform", self.separator_uniform)]
        for index, group in enumerate(self.separator_groups):
            cells = " | ".join(f"{100 * mass[index]:.0f}" for _, mass in groups)
            rows.append(f"| {group} | {cells} |")
        choice = _head_columns(self.choice_mass)
        rows += [
            "",
            f"The choice, on the {self.choice_queries} of {self.n_queries} queries whose current "
            "node has a second child: attention on the answer edge's separator / on the other "
            "child's (%; a goal-blind read of the children splits evenly).",
            "",
            "| " + " | ".join(name for name, _ in choice) + " |",
            "|" + "---|" * len(choice),
            "| " + " | ".join(f"{100 * a:.0f} / {100 * b:.0f}" for _, (a, b) in choice) + " |",
        ]
        return "\n".join(rows) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "roles": self.roles,
            "mass": self.mass,
            "uniform": self.uniform,
            "n_queries": self.n_queries,
            "edge_order": self.edge_order,
            "separator_groups": self.separator_groups,
            "separator_mass": self.separator_mass,
            "separator_uniform": self.separator_uniform,
            "choice_queries": self.choice_queries,
            "choice_mass": self.choice_mass,
        }


def _head_columns(per_layer: list[list[list[float]]]) -> list[tuple[str, list[float]]]:
    """(``L3`` or ``L3H1``, values) for every (layer, head) of a ``[layer][head][...]`` table."""
    return [
        (f"L{layer}" if len(heads) == 1 else f"L{layer}H{head}", values)
        for layer, heads in enumerate(per_layer)
        for head, values in enumerate(heads)
    ]


def key_roles(data: TreeData) -> torch.Tensor:
    """``[Q, T]`` role index (into ``ROLES``) of every key position for every query; keys
    after the query get -1 (invisible)."""
    q = data.queries
    layout = data.layout
    n, T = data.n, layout.n_positions
    edge_count = n - 1
    # remaining[Q, e]: edge e leads into p_{i+1} .. goal (the answer edge or the rest after it)
    remaining = separator_groups(data) <= SEPARATOR_GROUPS.index("rest of remaining path")
    roles = torch.full((len(q), T), -1, dtype=torch.long)
    for part in range(3):  # source, target, separator
        positions = torch.arange(edge_count) * 3 + part
        roles[:, positions] = torch.where(remaining, part, 3 + part)
    roles[:, layout.goal] = 6
    roles[:, layout.colon] = 7
    path_positions = torch.arange(layout.root, T)
    roles[:, path_positions] = 8
    visible = torch.arange(T)[None, :] <= q.positions[:, None]
    return torch.where(visible, roles, -1)


def separator_groups(data: TreeData) -> torch.Tensor:
    """``[Q, E]`` group index (into ``SEPARATOR_GROUPS``) of every edge for every query."""
    q = data.queries
    n = data.n
    path = data.trees.path[q.rows]  # [Q, n], -1 past the goal
    index_on_path = torch.full((len(q), n), -1, dtype=torch.long)
    for k in range(n):
        node = path[:, k]
        has = node >= 0
        index_on_path[has.nonzero(as_tuple=True)[0], node[has]] = k
    sources = data.trees.edges[q.rows, :, 0]
    k = index_on_path.gather(1, data.trees.edges[q.rows, :, 1])  # target's path index
    step = q.step[:, None]
    current = path.gather(1, q.step[:, None])
    groups = torch.full(k.shape, 4, dtype=torch.long)
    groups[(k >= 1) & (k <= step)] = 2
    groups[(k < 0) & (sources == current)] = 3
    groups[k > step + 1] = 1
    groups[k == step + 1] = 0
    return groups


@dataclass
class SeparatorSums:
    """``separator_group_sums`` of one batch: totals over its queries."""

    mass: torch.Tensor  # [L, H, G]
    uniform: torch.Tensor  # [G]
    choice: torch.Tensor  # [L, H, 2]: answer edge, other child; choice queries only
    choice_queries: int


def separator_group_sums(patterns: dict[int, torch.Tensor], data: TreeData) -> SeparatorSums:
    """Attention mass on each group's separators (and a uniform head's), summed over the
    queries of ``data``; and the choice between the answer edge and the current node's other
    child, summed over the queries that have one (module docstring)."""
    q = data.queries
    groups = separator_groups(data)  # [Q, E]
    one_hot = torch.nn.functional.one_hot(groups, len(SEPARATOR_GROUPS)).float()  # [Q, E, G]
    separators = torch.arange(data.n - 1) * 3 + 2
    mass = torch.stack(
        [
            torch.einsum(
                "qhe,qeg->qhg",
                patterns[layer].cpu().float()[q.rows, :, q.positions][..., separators],
                one_hot,
            )
            for layer in sorted(patterns)
        ]
    )  # [L, Q, H, G]
    uniform = (one_hot.sum(1) / (q.positions + 1).float()[:, None]).sum(0)
    other = SEPARATOR_GROUPS.index("current node's other children")
    has_choice = (groups == other).any(1)
    answer = SEPARATOR_GROUPS.index("answer edge")
    choice = mass[:, has_choice][..., [answer, other]].sum(1)
    return SeparatorSums(mass.sum(1), uniform, choice, int(has_choice.sum()))


def role_sums(patterns: dict[int, torch.Tensor], data: TreeData) -> torch.Tensor:
    """``[L, H, R]`` attention mass summed over the queries of ``data``."""
    q = data.queries
    roles = key_roles(data)  # [Q, T]
    one_hot = torch.zeros(*roles.shape, len(ROLES))
    valid = roles >= 0
    one_hot[valid.nonzero(as_tuple=True) + (roles[valid],)] = 1.0
    return torch.stack(
        [
            torch.einsum(
                "qht,qtr->hr", patterns[layer].cpu().float()[q.rows, :, q.positions], one_hot
            )
            for layer in sorted(patterns)
        ]
    )


def role_uniform_sums(data: TreeData) -> torch.Tensor:
    """``[R]``: the mass a uniform causal head would give each role, summed over queries."""
    roles = key_roles(data)
    counts = torch.stack([(roles == r).sum(1) for r in range(len(ROLES))], 1).float()
    return (counts / counts.sum(1, keepdim=True)).sum(0)


def role_analysis(
    hm: HookedModel, task: TreeTaskConfig, settings: AnalysisSettings | None = None
) -> RoleResult:
    """Attention mass of every layer and head on each key role (module docstring)."""
    settings = settings or AnalysisSettings()
    check_tree_model(hm, task)
    data = analysis_trees(task, settings)
    total = torch.zeros(hm.dims.n_layers, hm.dims.n_heads, len(ROLES))
    uniform = torch.zeros(len(ROLES))
    group_total = torch.zeros(hm.dims.n_layers, hm.dims.n_heads, len(SEPARATOR_GROUPS))
    group_uniform = torch.zeros(len(SEPARATOR_GROUPS))
    choice = torch.zeros(hm.dims.n_layers, hm.dims.n_heads, 2)
    choice_queries = 0
    for _, part in data.batches(settings.batch_size):
        _, patterns = run_patterns(hm, part.inputs)
        total += role_sums(patterns, part)
        uniform += role_uniform_sums(part)
        sums = separator_group_sums(patterns, part)
        group_total += sums.mass
        group_uniform += sums.uniform
        choice += sums.choice
        choice_queries += sums.choice_queries
    n_queries = len(data.queries)
    return RoleResult(
        roles=list(ROLES),
        mass=(total / n_queries).tolist(),
        uniform=(uniform / n_queries).tolist(),
        n_queries=n_queries,
        edge_order=settings.edge_order,
        separator_groups=list(SEPARATOR_GROUPS),
        separator_mass=(group_total / n_queries).tolist(),
        separator_uniform=(group_uniform / n_queries).tolist(),
        choice_queries=choice_queries,
        choice_mass=(choice / max(choice_queries, 1)).tolist(),
    )
