"""Random binary trees with a root-to-goal path: the task of Brinkmann et al. 2024, "A
Mechanistic Analysis of a Transformer Trained on a Symbolic Multi-Step Reasoning Task"
(arXiv:2402.11917, Sec. 2: data generation), generated in batches.

The paper's generator (``generate_example_secondary_path`` in the authors' repository) builds a
tree of ``n`` nodes in three phases: (1) a path root -> ... -> goal whose length (in edges) is
uniform in 1..n-1; (2) if the path leaves nodes over, a second branch off the root, a chain
whose length is uniform in 1..(n-1-path length), so the root always has two children and the
model cannot find the path by following the root's only child; (3) every other node is
attached to a uniformly chosen node already in the tree that has fewer than two children and
is not the goal (so the goal stays a leaf and the path length is exact). Node labels are a
random permutation. The edge list is printed either in reversed topological order (the
reverse of networkx's ``topological_sort``: breadth-first from the root, children in
ascending label order, edges sorted by their target's position) or shuffled; the paper's
training set alternates the two, which ``edge_order="mixed"`` reproduces (50 / 50 by default).

Differences from the reference code, both deliberate: phase (3) attaches the remaining nodes in
random order instead of ascending label order (the reference's order correlates a node's label
with its depth, a shortcut a model could learn); and generation is vectorised over a batch (one
loop over the ``n`` insertion steps, each a handful of tensor operations on ``[batch, n]``):
about 10^5 trees per second (generated and tokenized) on one CPU thread at n = 16, ten times a
per-tree Python loop.

Held-out split: every tree (its labelled parent structure plus the goal; the edge order is not
part of the identity, so the same tree listed in another order is the same example) has an
integer hash (``tree_hash``); trees whose hash falls in the lowest ``heldout_fraction`` of 2^20
buckets form the evaluation split and are filtered out of every training batch
(``TreeBatch.heldout``, ``training_trees``). The evaluation set is drawn from a separate seed
stream, stratified by path length (``heldout_trees``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, Field, model_validator

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.schema import STRICT_CONFIG

EdgeOrder = Literal["mixed", "backward", "random", "forward"]
MIN_NODES = 3
_HASH_SEED = 0x7EE5EED
_HASH_BUCKETS = 1 << 20

ORDER_CODES = {"backward": 0, "random": 1, "forward": 2}


def check_n_nodes(n: int) -> int:
    """``n`` if a tree of ``n`` nodes fits the task's layout, else ConfigError saying why."""
    if not isinstance(n, int) or n < MIN_NODES:
        raise ConfigError(
            f"n_nodes={n!r} is too small for the tree layout: it needs at least {MIN_NODES} nodes "
            "(a root, a path of at least one edge to the goal and a second branch off the root)"
        )
    return n


class TreeTaskConfig(BaseModel):
    """What trees look like and how the held-out split is drawn."""

    model_config = STRICT_CONFIG

    n_nodes: int = Field(default=16, description="nodes per tree (paper: 16)")
    edge_order: EdgeOrder = Field(
        default="mixed", description="mixed = reversed topological order or shuffled, per tree"
    )
    backward_fraction: float = Field(
        default=0.5, ge=0.0, le=1.0, description="with mixed: share of reversed-order trees"
    )
    second_branch: bool = Field(default=True, description="add the second branch off the root")
    heldout_fraction: float = Field(
        default=0.02, gt=0.0, lt=1.0, description="share of tree identities kept for evaluation"
    )

    @model_validator(mode="after")
    def _check_layout(self) -> TreeTaskConfig:
        check_n_nodes(self.n_nodes)
        return self

    @property
    def max_path_length(self) -> int:
        return self.n_nodes - 1


@dataclass(frozen=True)
class TreeExample:
    """One example in plain Python: the edge list as printed, the goal, and the path
    (``path[0]`` is the root, ``path[-1]`` the goal)."""

    n: int
    edges: tuple[tuple[int, int], ...]
    goal: int
    path: tuple[int, ...]

    @property
    def root(self) -> int:
        return self.path[0]

    @property
    def path_length(self) -> int:
        """Number of edges on the root-to-goal path (the number of predicted tokens)."""
        return len(self.path) - 1


@dataclass
class TreeBatch:
    """A batch of trees as tensors (labels are node ids ``0..n-1``).

    ``edges[b, e] = (source, target)`` in printed order; ``parent[b, v]`` is ``v``'s parent
    (-1 for the root); ``path[b, :path_length[b] + 1]`` runs root -> goal, padded with -1;
    ``order[b]`` is the edge order's code (``ORDER_CODES``).
    """

    n: int
    edges: torch.Tensor  # [B, n-1, 2] long
    parent: torch.Tensor  # [B, n] long
    root: torch.Tensor  # [B] long
    goal: torch.Tensor  # [B] long
    path: torch.Tensor  # [B, n] long
    path_length: torch.Tensor  # [B] long
    order: torch.Tensor  # [B] long

    def __len__(self) -> int:
        return int(self.edges.shape[0])

    def select(self, rows: torch.Tensor) -> TreeBatch:
        """The rows ``rows`` (indices or boolean mask) as a new batch."""
        return TreeBatch(
            n=self.n,
            **{k: getattr(self, k)[rows] for k in _TENSOR_FIELDS},
        )

    @staticmethod
    def cat(batches: Sequence[TreeBatch]) -> TreeBatch:
        if not batches:
            raise DataError("cannot concatenate an empty list of tree batches")
        n = batches[0].n
        if any(b.n != n for b in batches):
            raise DataError("cannot concatenate tree batches of different sizes n")
        return TreeBatch(
            n=n, **{k: torch.cat([getattr(b, k) for b in batches]) for k in _TENSOR_FIELDS}
        )

    def example(self, i: int) -> TreeExample:
        length = int(self.path_length[i])
        return TreeExample(
            n=self.n,
            edges=tuple((int(s), int(t)) for s, t in self.edges[i].tolist()),
            goal=int(self.goal[i]),
            path=tuple(int(v) for v in self.path[i, : length + 1].tolist()),
        )

    def examples(self) -> list[TreeExample]:
        return [self.example(i) for i in range(len(self))]

    def tree_hash(self) -> torch.Tensor:
        """Per tree, an integer identifying (parent structure, goal); see ``tree_hash``."""
        return tree_hash(self.parent, self.goal, self.n)

    def heldout(self, fraction: float) -> torch.Tensor:
        """Boolean mask of the trees that belong to the held-out evaluation split."""
        return heldout_mask(self.tree_hash(), fraction)

    def distinct_by_length(self) -> dict[int, int]:
        """Path length -> number of distinct tree identities (structure and goal; the edge
        order aside) among these trees. Small trees repeat: n = 5 has 660 identities in all,
        so a large sample can stand on a handful of held-out trees."""
        hashes = self.tree_hash()
        return {
            int(length): len(torch.unique(hashes[self.path_length == length]))
            for length in torch.unique(self.path_length)
        }


_TENSOR_FIELDS = ("edges", "parent", "root", "goal", "path", "path_length", "order")


def _generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(seed: int, *keys: int) -> int:
    """A seed for item ``keys`` of the stream ``seed`` (e.g. one training step), so any batch
    can be regenerated on its own (resume needs no saved generator state)."""
    value = _splitmix64(int(seed) & _MASK64)
    for key in keys:
        value = _splitmix64(value ^ _splitmix64(int(key) & _MASK64))
    return value >> 1  # torch seeds are at most 64 bits; keep it positive


def generate_trees(
    n: int,
    batch_size: int,
    seed: int | torch.Generator = 0,
    *,
    path_lengths: torch.Tensor | int | None = None,
    max_path_length: int | None = None,
    edge_order: EdgeOrder = "mixed",
    backward_fraction: float = 0.5,
    second_branch: bool = True,
) -> TreeBatch:
    """``batch_size`` random trees of ``n`` nodes (the paper's distribution, see the module
    docstring); ``path_lengths`` fixes each tree's path length (default: uniform 1..n-1, or
    1..``max_path_length``)."""
    check_n_nodes(n)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if edge_order not in ("mixed", *ORDER_CODES):
        raise ConfigError(
            f"unknown edge_order {edge_order!r}; known: mixed, {', '.join(ORDER_CODES)}"
        )
    gen = _generator(seed)
    B = batch_size
    if max_path_length is not None and not 1 <= max_path_length <= n - 1:
        raise ConfigError(f"max_path_length must lie in 1..{n - 1} for n={n}")
    if path_lengths is None:
        plen = torch.randint(1, (max_path_length or n - 1) + 1, (B,), generator=gen)
    else:
        plen = torch.as_tensor(path_lengths, dtype=torch.long).expand(B).clone()
        if bool(((plen < 1) | (plen > n - 1)).any()):
            raise ConfigError(f"path lengths must lie in 1..{n - 1} for n={n}")
    # Second branch: a chain of uniform length 1..(n-1-path) hanging off the root.
    room = n - 1 - plen
    branch = torch.zeros(B, dtype=torch.long)
    if second_branch:
        u = torch.rand(B, generator=gen)
        branch = torch.minimum(torch.where(room > 0, 1 + (u * room).long(), 0), room)
    labels = torch.argsort(torch.rand(B, n, generator=gen), dim=1)  # insertion slot -> label

    rows = torch.arange(B)
    slots = torch.arange(n)
    parent_slot = torch.full((B, n), -1, dtype=torch.long)
    children = torch.zeros(B, n, dtype=torch.long)
    depth = torch.zeros(B, n, dtype=torch.long)
    # Slots 0..plen are the path (slot plen is the goal), then the second branch, then the rest.
    goal_slot = plen
    for k in range(1, n):
        chain = slots.new_full((B,), k - 1)
        branch_start = (k == plen + 1) & (branch > 0)
        rest = k > plen + branch
        valid = (slots < k) & (children < 2) & (slots != goal_slot[:, None])
        scores = torch.rand(B, n, generator=gen).masked_fill(~valid, -1.0)
        random_parent = scores.argmax(dim=1)
        par = torch.where(rest, random_parent, torch.where(branch_start, 0, chain))
        parent_slot[:, k] = par
        children[rows, par] += 1
        depth[:, k] = depth[rows, par] + 1

    # Back to labels.
    parent = torch.full((B, n), -1, dtype=torch.long)
    parent_label = torch.gather(labels, 1, parent_slot[:, 1:].clamp(min=0))
    parent.scatter_(1, labels[:, 1:], parent_label)
    root = labels[:, 0]
    goal = labels[rows, goal_slot]
    path = torch.where(slots[None, :] <= plen[:, None], labels, torch.full_like(labels, -1))
    node_depth = torch.empty_like(depth).scatter_(1, labels, depth)

    # Forward (topological) edge order: targets in breadth-first order, children by label.
    bfs = _bfs_rank(parent, node_depth, n)
    targets = labels[:, 1:]
    forward = torch.gather(targets, 1, torch.argsort(torch.gather(bfs, 1, targets), dim=1))
    if edge_order == "mixed":
        order = torch.where(
            torch.rand(B, generator=gen) < backward_fraction,
            ORDER_CODES["backward"],
            ORDER_CODES["random"],
        )
    else:
        order = torch.full((B,), ORDER_CODES[edge_order], dtype=torch.long)
    shuffled = torch.gather(forward, 1, torch.argsort(torch.rand(B, n - 1, generator=gen), dim=1))
    code = order[:, None]
    target_order = torch.where(
        code == ORDER_CODES["backward"],
        forward.flip(1),
        torch.where(code == ORDER_CODES["random"], shuffled, forward),
    )
    edges = torch.stack([torch.gather(parent, 1, target_order), target_order], dim=-1)
    return TreeBatch(
        n=n,
        edges=edges,
        parent=parent,
        root=root,
        goal=goal,
        path=path,
        path_length=plen,
        order=order,
    )


def _bfs_rank(parent: torch.Tensor, depth: torch.Tensor, n: int) -> torch.Tensor:
    """Each node's position in a breadth-first walk from the root that visits children in
    ascending label order (networkx's ``topological_sort`` on these trees).

    The position sorts by (depth, parent's position, label). Starting from a ranking by
    (depth, label), each refinement fixes one more depth level, so ``max depth`` rounds suffice.
    """
    labels = torch.arange(n).expand_as(parent)
    rank = torch.argsort(torch.argsort(depth * n + labels, dim=1), dim=1)
    for _ in range(int(depth.max()) - 1):
        parent_rank = torch.gather(rank, 1, parent.clamp(min=0))
        parent_rank = torch.where(parent < 0, 0, parent_rank)
        key = (depth * n + parent_rank) * n + labels
        rank = torch.argsort(torch.argsort(key, dim=1), dim=1)
    return rank


def _hash_table(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(_HASH_SEED + n)
    high = 1 << 40  # n * 2^40 stays far below 2^63: sums never overflow
    edge_table = torch.randint(0, high, (n, n + 1), generator=gen, dtype=torch.long)
    goal_table = torch.randint(0, high, (n,), generator=gen, dtype=torch.long)
    return edge_table, goal_table


def tree_hash(parent: torch.Tensor, goal: torch.Tensor, n: int) -> torch.Tensor:
    """Per tree, ``sum_v T[v, parent(v)] + G[goal]`` with fixed random 40-bit tables: equal
    for the same labelled tree and goal whatever the edge order; two different trees collide
    with probability about 2^-40."""
    edge_table, goal_table = _hash_table(n)
    par = torch.where(parent < 0, n, parent)
    nodes = torch.arange(n).expand_as(par)
    return edge_table[nodes, par].sum(dim=1) + goal_table[goal]


def heldout_mask(hashes: torch.Tensor, fraction: float) -> torch.Tensor:
    """True for hashes in the lowest ``fraction`` of the buckets (the evaluation split)."""
    # The hash is a sum of uniform random 40-bit numbers, so its low 20 bits are uniform.
    bucket = torch.remainder(hashes, _HASH_BUCKETS)
    return bucket < int(round(fraction * _HASH_BUCKETS))


# Draws that may come back empty before a split is declared empty. A draw holds at least 64
# trees of which a share ``heldout_fraction`` (or 1 - that) is expected to be kept, so a split
# that has trees at all fills within a few draws; small trees (n <= 5) have so few distinct
# identities that a path length's held-out split can hold none, and the loop would never end.
MAX_EMPTY_DRAWS = 30


def _empty_split(trees: str, draws: int, fraction: float, split: str) -> DataError:
    """The error for a split that kept nothing in ``draws`` draws (``trees``: which were drawn);
    built only when raised, so that the training loop formats nothing."""
    return DataError(
        f"no {trees} falls in the {split} split "
        f"(heldout_fraction {fraction}) after {draws} draws: trees this small have too "
        "few distinct identities (structure and goal) to split; use more nodes or another "
        "heldout_fraction"
    )


def training_trees(
    task: TreeTaskConfig,
    batch_size: int,
    seed: int,
    step: int,
    max_path_length: int | None = None,
) -> TreeBatch:
    """Batch ``step`` of the training stream: fresh trees, held-out identities removed
    (about ``heldout_fraction`` of them; the batch is topped up from the same stream).
    ``max_path_length``: paths of 1..that many edges only (a curriculum stage)."""
    parts: list[TreeBatch] = []
    have = 0
    draw = 0
    while have < batch_size:
        extra = int(batch_size * (task.heldout_fraction * 1.5)) + 8
        batch = generate_trees(
            task.n_nodes,
            batch_size - have + extra,
            stream_seed(seed, step, draw),
            max_path_length=max_path_length,
            edge_order=task.edge_order,
            backward_fraction=task.backward_fraction,
            second_branch=task.second_branch,
        )
        kept = batch.select(~batch.heldout(task.heldout_fraction))
        parts.append(kept)
        have += len(kept)
        draw += 1
        if have == 0 and draw >= MAX_EMPTY_DRAWS:
            paths = f"paths of up to {max_path_length} edges" if max_path_length else "any path"
            trees = f"tree of {task.n_nodes} nodes with {paths}"
            raise _empty_split(trees, draw, task.heldout_fraction, "training")
    batch = parts[0] if len(parts) == 1 else TreeBatch.cat(parts)
    return batch.select(torch.arange(batch_size))


EVAL_STREAM = 0xE7A1


def heldout_trees(
    task: TreeTaskConfig,
    per_length: int,
    seed: int = 0,
    path_lengths: Sequence[int] | None = None,
    edge_order: EdgeOrder | None = None,
) -> TreeBatch:
    """The evaluation set: ``per_length`` held-out trees for every path length (default
    1..n-1), drawn from a stream separate from training and kept only if their identity falls
    in the held-out split."""
    n = task.n_nodes
    lengths = list(path_lengths) if path_lengths is not None else list(range(1, n))
    out: list[TreeBatch] = []
    for length in lengths:
        parts: list[TreeBatch] = []
        have = 0
        draw = 0
        while have < per_length:
            want = int((per_length - have) / task.heldout_fraction * 1.3) + 64
            batch = generate_trees(
                n,
                want,
                stream_seed(seed, EVAL_STREAM, length, draw),
                path_lengths=length,
                edge_order=edge_order or task.edge_order,
                backward_fraction=task.backward_fraction,
                second_branch=task.second_branch,
            )
            kept = batch.select(batch.heldout(task.heldout_fraction))
            parts.append(kept)
            have += len(kept)
            draw += 1
            if have == 0 and draw >= MAX_EMPTY_DRAWS:
                trees = f"tree of {n} nodes with a path of {length} edges"
                raise _empty_split(trees, draw, task.heldout_fraction, "held-out")
        merged = TreeBatch.cat(parts)
        out.append(merged.select(torch.arange(per_length)))
    return TreeBatch.cat(out)


# ---- validity checks (used by the tests and by ``parse``) ------------------------------------


def children_of(edges: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    result: dict[int, list[int]] = {}
    for source, target in edges:
        result.setdefault(source, []).append(target)
    return result


def is_binary(edges: Sequence[tuple[int, int]]) -> bool:
    """Every node has at most two children and at most one parent."""
    targets = [t for _, t in edges]
    if len(set(targets)) != len(targets):
        return False
    return all(len(kids) <= 2 for kids in children_of(edges).values())


def tree_root(n: int, edges: Sequence[tuple[int, int]]) -> int | None:
    """The unique node without a parent, or None if there is not exactly one."""
    targets = {t for _, t in edges}
    roots = [v for v in range(n) if v not in targets]
    return roots[0] if len(roots) == 1 else None


def is_connected_tree(n: int, edges: Sequence[tuple[int, int]]) -> bool:
    """``edges`` form one tree over exactly the nodes ``0..n-1`` (n-1 edges, every node
    reachable from a single root, no node entered twice)."""
    if len(edges) != n - 1:
        return False
    if any(not (0 <= v < n) for e in edges for v in e):
        return False
    root = tree_root(n, edges)
    if root is None or not is_binary_parents(edges):
        return False
    kids = children_of(edges)
    seen = {root}
    frontier = [root]
    while frontier:
        node = frontier.pop()
        for child in kids.get(node, []):
            if child in seen:
                return False
            seen.add(child)
            frontier.append(child)
    return len(seen) == n


def is_binary_parents(edges: Sequence[tuple[int, int]]) -> bool:
    targets = [t for _, t in edges]
    return len(set(targets)) == len(targets)


def goal_is_leaf(edges: Sequence[tuple[int, int]], goal: int) -> bool:
    return all(source != goal for source, _ in edges) and any(t == goal for _, t in edges)


def root_to_goal_path(n: int, edges: Sequence[tuple[int, int]], goal: int) -> list[int] | None:
    """The unique path from the root to ``goal`` (following parent links up), or None."""
    parent = {t: s for s, t in edges}
    path = [goal]
    while path[-1] in parent:
        path.append(parent[path[-1]])
        if len(path) > n:
            return None  # a cycle
    path.reverse()
    return path if path[0] == tree_root(n, edges) else None


def is_unique_root_path(example: TreeExample) -> bool:
    """``example.path`` is the one path from the tree's root to its goal."""
    return list(example.path) == root_to_goal_path(example.n, example.edges, example.goal)


def check_example(example: TreeExample) -> list[str]:
    """Every way ``example`` violates the task's definition (empty when valid)."""
    problems = []
    if not is_connected_tree(example.n, example.edges):
        problems.append(f"the edges do not form one tree over the nodes 0..{example.n - 1}")
    if not is_binary(example.edges):
        problems.append("a node has more than two children or more than one parent")
    if not goal_is_leaf(example.edges, example.goal):
        problems.append(f"the goal {example.goal} is not a leaf of the tree")
    if len(example.path) < 2:
        problems.append("the path must contain the root and at least one more node")
    elif not is_unique_root_path(example):
        problems.append("the path is not the root-to-goal path of the tree")
    return problems


def validate_example(example: TreeExample) -> TreeExample:
    problems = check_example(example)
    if problems:
        raise DataError("invalid tree example: " + "; ".join(problems))
    return example
