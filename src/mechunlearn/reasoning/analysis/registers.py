"""Register-token discovery (Brinkmann et al. 2024, arXiv:2402.11917, "parallel
backward chaining with register tokens"; the reference's ``attention_knockout_registers``,
``extract_subpaths`` and ``block_registers``).

Paths longer than the number of layers cannot be solved by the single backward chain at the
query position. The paper finds that the model also chains backward at prompt positions whose
own token is uninformative (commas, sources of late edges, the goal): each such *register*
climbs a subpath of the tree from some node, and late layers of the query position read the
registers and merge their subpaths into the main chain. Found automatically here, in three
steps:

1. *Knockout scan.* For every prompt position ``j`` (edges, ``|``, goal, ``:``), zero the
   attention weight from every query position to ``j`` in layers ``>= from_layer`` (default 1:
   layer 0's goal copying and edge reads are the known mechanisms) and measure the mean drop of
   the correct token's log-probability (and logit, and token accuracy) over all queries.
   The positions deduction heads read to follow an edge are expected to matter; which kind of
   edge token that is (the target token in the paper's model, the comma after the edge when
   layer 0 merges the edge there) is read off the model's own attention on the data: the edge
   token kind the query positions attend to most in layers ``>= from_layer``
   (``query_reads``). Every other position whose drop is at least ``min_effect`` nats is a
   register candidate.
2. *Tracing.* For each candidate, follow its own attention: in each layer, the edge token
   (source, target or comma of any edge before it) it attends most, if the weight is at least
   ``trace_min_attention``. In layer 0 a position holds only its own token, so a target or
   source read yields that node and a comma read nothing; from layer 1 on any of the three may
   hold the whole edge, so a read yields the edge. Consecutive reads that climb the tree (the
   next edge's target is the previous edge's source, or the same edge again) form the subpath
   the register holds: ``[t_1, s_1, s_2, ...]``. Reported: the share of trees where it holds a
   subpath of at least two edges, the mean number of edges, the share of subpaths lying on the
   root-goal path, the kinds of edge token its accepted reads landed on, and a linear probe, on
   held-out trees, for the subpath's top node from the register's final residual stream (vs the
   majority class).
3. *Blocking.* Knock out every candidate at once (queries -> candidates, layers
   ``>= from_layer``) and report whole-path accuracy by path length next to the clean model's:
   if the registers carry the long-path information, accuracy falls for long paths only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field

from mechunlearn.localize.probes import fit_probe
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

MIN_PROBE_SAMPLES = 20
EDGE_KINDS: tuple[str, ...] = ("source", "target", "comma")
"""The three tokens of an edge in the prompt, in order (``s t ,``)."""


class RegisterSettings(AnalysisSettings):
    from_layer: int = Field(default=1, ge=0, description="knock out layers >= this one")
    min_effect: float = Field(
        default=0.1, ge=0, description="mean log-prob drop (nats) that makes a candidate"
    )
    trace_min_attention: float = Field(default=0.2, ge=0, le=1)


@dataclass
class RegisterCandidate:
    position: int
    kind: str
    effect: float
    chain_fraction: float  # trees where it holds a subpath of >= 2 edges
    mean_edges: float
    on_path_fraction: float | None  # of traced subpaths (>= 1 edge), share on the root-goal path
    probe_accuracy: float | None  # held-out accuracy for the subpath's top node
    probe_chance: float | None
    example_subpaths: list[list[int]] = field(default_factory=list)
    read_kinds: dict[str, float] = field(default_factory=dict)  # share of accepted reads by kind

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class RegisterResult:
    positions: list[int]
    kinds: list[str]
    effect_logprob: list[float]
    effect_logit: list[float]
    effect_accuracy: list[float]
    candidates: list[RegisterCandidate]
    from_layer: int
    min_effect: float
    baseline_by_length: dict[int, float]
    blocked_by_length: dict[int, float] | None
    n_layers: int
    n_trees: int
    edge_order: str
    query_reads: dict[str, float] = field(default_factory=dict)  # attention by edge token kind
    edge_read_kind: str = "target"  # the kind deduction heads read (not a register candidate)

    def to_json(self) -> dict[str, Any]:
        return {
            "positions": self.positions,
            "kinds": self.kinds,
            "effect_logprob": self.effect_logprob,
            "effect_logit": self.effect_logit,
            "effect_accuracy": self.effect_accuracy,
            "candidates": [c.to_json() for c in self.candidates],
            "from_layer": self.from_layer,
            "min_effect": self.min_effect,
            "baseline_by_length": {str(k): v for k, v in self.baseline_by_length.items()},
            "blocked_by_length": None
            if self.blocked_by_length is None
            else {str(k): v for k, v in self.blocked_by_length.items()},
            "n_layers": self.n_layers,
            "n_trees": self.n_trees,
            "edge_order": self.edge_order,
            "query_reads": self.query_reads,
            "edge_read_kind": self.edge_read_kind,
        }


def position_kinds(data: TreeData) -> list[str]:
    """The token kind at every prompt position before the root."""
    layout = data.layout
    kinds = []
    for j in range(layout.root):
        if j < layout.bar:
            kinds.append(("source", "target", "comma")[j % 3])
        else:
            kinds.append({layout.bar: "bar", layout.goal: "goal", layout.colon: "colon"}[j])
    return kinds


def knockout_masks(data: TreeData, keys: list[int], layers: range) -> dict[int, torch.Tensor]:
    """Masks that cut every query position off the key positions ``keys`` in ``layers``."""
    T = data.layout.n_positions
    key = torch.zeros(T, dtype=torch.bool)
    key[keys] = True
    mask = data.query_mask[:, :, None] & key[None, None, :]
    return {layer: mask for layer in layers}


@torch.no_grad()
def _run(
    hm: HookedModel, data: TreeData, batch_size: int, keys: list[int] | None, layers: range
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position ``[B, T]``: log-prob and logit of the true next token, argmax correct."""
    logps, logit_true, correct = [], [], []
    for _, part in data.batches(batch_size):
        masks = knockout_masks(part, keys, layers) if keys else {}
        with attention_control(hm, knockout=masks):
            logits = hm.model(input_ids=part.inputs.to(hm.device)).logits.float().cpu()
        targets = part.tokens[:, 1:]
        logps.append(log_probs_of_targets(logits, part))
        logit_true.append(logits.gather(-1, targets[..., None]).squeeze(-1))
        correct.append(logits.argmax(-1) == targets)
    return torch.cat(logps), torch.cat(logit_true), torch.cat(correct)


def path_accuracy_by_length(correct: torch.Tensor, data: TreeData) -> dict[int, float]:
    """Whole-path accuracy by path length from per-position correctness ``[B, T]``."""
    whole = (correct | ~data.query_mask).all(1)
    lengths = data.trees.path_length
    return {
        int(length): float(whole[lengths == length].float().mean())
        for length in sorted(set(lengths.tolist()))
    }


def edge_positions(data: TreeData, before: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The edge-token positions before ``before``, and each one's edge index (``3e + k``:
    ``k`` indexes ``EDGE_KINDS``)."""
    positions = torch.tensor([p for p in range(min(before, 3 * (data.n - 1)))], dtype=torch.long)
    return positions, positions // 3


@dataclass
class _Reads:
    """Per layer, the edge token a position attends most and whether the weight clears the
    threshold: ``(layer, position index into the edge positions [B], accepted [B])``."""

    positions: torch.Tensor
    layers: list[tuple[int, torch.Tensor, torch.Tensor]]


def _reads(
    patterns: dict[int, torch.Tensor], data: TreeData, position: int, min_attention: float
) -> _Reads:
    positions, _ = edge_positions(data, position)
    layers = []
    for layer in sorted(patterns):
        if len(positions) == 0:
            break
        weight = patterns[layer][:, :, position, positions].float().cpu().amax(1)  # [B, P]
        best, index = weight.max(-1)
        layers.append((layer, index, best >= min_attention))
    return _Reads(positions, layers)


def trace_subpaths(
    patterns: dict[int, torch.Tensor], data: TreeData, position: int, min_attention: float
) -> list[list[int]]:
    """Per tree, the subpath register ``position`` climbs (module docstring, step 2)."""
    reads = _reads(patterns, data, position, min_attention)
    edges = data.trees.edges
    subpaths = []
    for b in range(len(data)):
        path: list[int] = []
        for layer, index, accepted in reads.layers:
            if not accepted[b]:
                continue
            p = int(reads.positions[index[b]])
            e, kind = p // 3, EDGE_KINDS[p % 3]
            source, target = int(edges[b, e, 0]), int(edges[b, e, 1])
            if layer == 0:  # a position holds only its own token in layer 0
                if path or kind == "comma":
                    continue
                path = [target if kind == "target" else source]
            elif not path:
                path = [target, source]
            elif target == path[-1]:
                path.append(source)  # one level up
            elif len(path) >= 2 and target == path[-2]:
                continue  # the same edge again
            elif len(path) == 1 and source == path[0]:
                continue  # the edge below a node read in layer 0 adds nothing above it
            else:
                break
        subpaths.append(path)
    return subpaths


def read_kinds(
    patterns: dict[int, torch.Tensor], data: TreeData, position: int, min_attention: float
) -> dict[str, int]:
    """How many accepted reads of ``position`` (layers >= 1) landed on each edge token kind."""
    reads = _reads(patterns, data, position, min_attention)
    counts = dict.fromkeys(EDGE_KINDS, 0)
    for layer, index, accepted in reads.layers:
        if layer == 0:
            continue
        for p in reads.positions[index[accepted]].tolist():
            counts[EDGE_KINDS[p % 3]] += 1
    return counts


def query_reads_by_kind(
    patterns: dict[int, torch.Tensor], data: TreeData, from_layer: int
) -> dict[str, float]:
    """Mean attention (max over heads, summed over an edge's tokens of one kind) from the query
    positions to each kind of edge token, in layers ``>= from_layer``: where the model's
    deduction heads read edges."""
    positions, _ = edge_positions(data, data.layout.bar)
    q = data.queries
    totals = dict.fromkeys(EDGE_KINDS, 0.0)
    layers = [layer for layer in sorted(patterns) if layer >= from_layer]
    for layer in layers:
        weight = patterns[layer].float().cpu().amax(1)[q.rows, q.positions][:, positions]  # [Q, P]
        for k, kind in enumerate(EDGE_KINDS):
            totals[kind] += float(weight[:, positions % 3 == k].sum(-1).mean())
    return {kind: value / max(1, len(layers)) for kind, value in totals.items()}


def _on_path(subpath: list[int], path: torch.Tensor, length: int) -> bool:
    nodes = set(path[: length + 1].tolist())
    return all(v in nodes for v in subpath)


def register_analysis(
    hm: HookedModel, task: TreeTaskConfig, settings: RegisterSettings | None = None
) -> RegisterResult:
    """Knockout scan, tracing and blocking (module docstring)."""
    settings = settings or RegisterSettings()
    check_tree_model(hm, task)
    data = analysis_trees(task, settings)
    n_layers = hm.dims.n_layers
    layers = range(min(settings.from_layer, n_layers), n_layers)
    q = data.queries
    base_logp, base_logit, base_correct = _run(hm, data, settings.batch_size, None, layers)
    kinds = position_kinds(data)
    effects, logit_effects, acc_effects = [], [], []
    for j in range(len(kinds)):
        logp, logit, correct = _run(hm, data, settings.batch_size, [j], layers)
        at = (q.rows, q.positions)
        effects.append(float((base_logp[at] - logp[at]).mean()))
        logit_effects.append(float((base_logit[at] - logit[at]).mean()))
        acc_effects.append(float((base_correct[at].float() - correct[at].float()).mean()))
    query_reads = _query_reads(hm, data, settings)
    edge_read_kind = max(query_reads, key=lambda kind: query_reads[kind])
    chosen = [
        j
        for j, (kind, effect) in enumerate(zip(kinds, effects, strict=True))
        if kind != edge_read_kind and effect >= settings.min_effect
    ]
    candidates = _describe(hm, data, chosen, kinds, effects, settings) if chosen else []
    blocked = None
    if chosen:
        _, _, blocked_correct = _run(hm, data, settings.batch_size, chosen, layers)
        blocked = path_accuracy_by_length(blocked_correct, data)
    return RegisterResult(
        positions=list(range(len(kinds))),
        kinds=kinds,
        effect_logprob=effects,
        effect_logit=logit_effects,
        effect_accuracy=acc_effects,
        candidates=candidates,
        from_layer=settings.from_layer,
        min_effect=settings.min_effect,
        baseline_by_length=path_accuracy_by_length(base_correct, data),
        blocked_by_length=blocked,
        n_layers=n_layers,
        n_trees=len(data),
        edge_order=settings.edge_order,
        query_reads=query_reads,
        edge_read_kind=edge_read_kind,
    )


@torch.no_grad()
def _query_reads(hm: HookedModel, data: TreeData, settings: RegisterSettings) -> dict[str, float]:
    """``query_reads_by_kind`` over all analysis trees (weighted by each batch's trees)."""
    totals = dict.fromkeys(EDGE_KINDS, 0.0)
    for _, part in data.batches(settings.batch_size):
        with attention_control(hm, record=range(hm.dims.n_layers)) as patterns:
            hm.model(input_ids=part.inputs.to(hm.device))
        for kind, value in query_reads_by_kind(patterns, part, settings.from_layer).items():
            totals[kind] += value * len(part) / len(data)
    return totals


@torch.no_grad()
def _describe(
    hm: HookedModel,
    data: TreeData,
    chosen: list[int],
    kinds: list[str],
    effects: list[float],
    settings: RegisterSettings,
) -> list[RegisterCandidate]:
    """Trace and probe the candidate registers (module docstring, step 2)."""
    n_layers = hm.dims.n_layers
    final = f"blocks.{n_layers - 1}.resid_post"
    subpaths: dict[int, list[list[int]]] = {j: [] for j in chosen}
    reads: dict[int, dict[str, int]] = {j: dict.fromkeys(EDGE_KINDS, 0) for j in chosen}
    features = torch.empty(len(chosen), len(data), hm.dims.d_model)
    for start, part in data.batches(settings.batch_size):
        with (
            attention_control(hm, record=range(n_layers)) as patterns,
            hm.hooks(cache=[final]) as cache,
        ):
            hm.model(input_ids=part.inputs.to(hm.device))
        for i, j in enumerate(chosen):
            subpaths[j] += trace_subpaths(patterns, part, j, settings.trace_min_attention)
            for kind, count in read_kinds(patterns, part, j, settings.trace_min_attention).items():
                reads[j][kind] += count
            features[i, start : start + len(part)] = cache[final][:, j].float().cpu()
    train = torch.zeros(len(data), dtype=torch.bool)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(settings.seed))
    train[order[: len(data) // 2]] = True
    out = []
    for i, j in enumerate(chosen):
        paths = subpaths[j]
        n_edges = torch.tensor([max(0, len(p) - 1) for p in paths], dtype=torch.float)
        traced = [b for b, p in enumerate(paths) if len(p) >= 2]
        on_path = [
            _on_path(paths[b], data.trees.path[b], int(data.trees.path_length[b])) for b in traced
        ]
        accuracy = chance = None
        if len(traced) >= MIN_PROBE_SAMPLES:
            rows = torch.tensor(traced)
            top = torch.tensor([paths[b][-1] for b in traced])
            is_train = train[rows]
            if len(set(top[is_train].tolist())) >= 2 and int((~is_train).sum()) > 0:
                probe = fit_probe(features[i, rows[is_train]], top[is_train], n_classes=data.n)
                accuracy = probe.accuracy(features[i, rows[~is_train]], top[~is_train])
                values, counts = torch.unique(top[is_train], return_counts=True)
                chance = float((top[~is_train] == values[counts.argmax()]).float().mean())
        out.append(
            RegisterCandidate(
                position=j,
                kind=kinds[j],
                effect=effects[j],
                chain_fraction=float((n_edges >= 2).float().mean()),
                mean_edges=float(n_edges.mean()),
                on_path_fraction=sum(on_path) / len(on_path) if on_path else None,
                probe_accuracy=accuracy,
                probe_chance=chance,
                example_subpaths=[paths[b] for b in traced[:3]],
                read_kinds={k: c / max(1, sum(reads[j].values())) for k, c in reads[j].items()},
            )
        )
    return out
