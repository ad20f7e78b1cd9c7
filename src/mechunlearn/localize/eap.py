"""Edge attribution patching (EAP; Syed, Rager & Conmy 2023, "Attribution Patching Outperforms
Automated Circuit Discovery"; semantics of hannamw/EAP-IG, Hanna et al. 2024).

The residual stream is a sum of upstream outputs, so each downstream node ``v`` reads
``x_v = sum_u a_u`` (plus biases, which do not change between runs). An edge ``u -> v`` is
``u``'s term in ``v``'s input; patching only that term to its corrupted value changes the metric
by, to first order,

    score(u -> v) = sum_pos (a_u(corrupt) - a_u(clean)) . dM/dx_v(clean)

where ``dM/dx_v`` is the gradient with respect to the residual *as read by v only*, not the
total gradient of the residual stream (which also flows through the skip connection to every
later reader). We obtain it with a forward pre-hook on ``v``'s input norm that hands the norm a
fresh copy ``x_v' = x.clone()`` of the residual: the copy has a single reader, so its gradient
is v's alone. ``M`` is the readout (``metric`` option, ``logit_diff`` by default) averaged over
facts; corrupted inputs are the
``pair_corruptions`` partners. Cost per batch of facts: one corrupted forward (no grad), one
clean forward and one backward, for every edge at once.

Nodes:

- upstream: ``embed`` (the residual entering block 0: token embeddings, Gemma's scale, GPT-2's
  position embeddings), every head ``blocks.L.attn.head{H}`` (its residual contribution,
  ``head_contributions``: Gemma's post-attention norm linearised at each run's own scale, so the
  heads still sum exactly to ``attn_out``), every MLP ``blocks.L.mlp`` (``mlp_out``);
- downstream: every attention layer's input ``blocks.L.attn``, every MLP's input
  ``blocks.L.mlp`` and the logits' input ``logits`` (the final norm's input).

Downstream attention nodes are whole layers, not heads: Hugging Face attention modules read
one normalised residual for all heads' queries, keys and values, so per-head inputs (EAP-IG's
q/k/v nodes) would need a rewritten attention; we do not rewrite model code.

Edges go from earlier to later layers; within a layer, heads feed the MLP in sequential blocks
but not in parallel ones (GPT-NeoX/Pythia with ``use_parallel_residual``). Completeness: for
every downstream node, the scores of all its incoming edges sum exactly to
``dM/dx_v . (x_v(corrupt) - x_v(clean))``.

Selection: the top-n edges by ``|score|`` (n = the ``top_edges`` option) form the circuit; they map to components (heads -> ``blocks.L.attn.head{H}``, upstream MLP and
downstream MLP -> ``blocks.L.mlp``, downstream attention -> ``blocks.L.attn``; ``embed`` and
``logits`` are not trainable components here). Component score = sum of ``|edge scores|`` over
*all* edges touching it (a full ranking for budgeted selection); the circuit's own component
scores (top-n edges only) are in ``evidence["circuit_component_scores"]``. Without a budget the
circuit's components are selected; with one, the best components by score that fit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from pydantic import Field

from mechunlearn.errors import SiteError
from mechunlearn.localize.common import (
    fact_batches,
    facts_with_partners,
    final_logits,
    heads_have_parameters,
)
from mechunlearn.localize.options import LocalizeOptions, ReadoutOptions
from mechunlearn.localize.prompts import FactPrompts, check_same_layout
from mechunlearn.localize.protocol import Scores
from mechunlearn.localize.readouts import LOGIT_DIFF, READOUTS, Readout
from mechunlearn.localize.registry import LOCALIZERS
from mechunlearn.models.adapters import head_contributions
from mechunlearn.models.handle import HookedModel
from mechunlearn.progress import progress_bar
from mechunlearn.tasks.records import FactRecord

DEFAULT_TOP_EDGES = 50

SIGN_CONVENTION = (
    "score(u -> v) = sum_pos (a_u(corrupt) - a_u(clean)) . dM/dx_v(clean): the first-order change "
    "of the mean readout M (evidence['metric']) when only u's term of v's input is patched to its corrupted value"
)


# ---- the graph ------------------------------------------------------------------------------
@dataclass
class EdgeGraph:
    """Upstream and downstream node names and which edges exist (``allowed[u, v]``)."""

    upstream: list[str]
    downstream: list[str]
    allowed: torch.Tensor  # bool [n_up, n_down]

    def edge_names(self) -> list[tuple[str, str]]:
        return [(self.upstream[u], self.downstream[v]) for u, v in self.allowed.nonzero().tolist()]


def edge_graph(hm: HookedModel) -> EdgeGraph:
    """All upstream -> downstream edges of the model (see the module docstring for the rules)."""
    adapter = hm.require_adapter()
    n_layers, n_heads = hm.dims.n_layers, hm.dims.n_heads
    upstream: list[tuple[str, int, str]] = [("embed", -1, "embed")]  # (name, layer, kind)
    for layer in range(n_layers):
        upstream += [(f"blocks.{layer}.attn.head{h}", layer, "head") for h in range(n_heads)]
        upstream.append((f"blocks.{layer}.mlp", layer, "mlp"))
    downstream: list[tuple[str, int, str]] = []
    for layer in range(n_layers):
        downstream += [
            (f"blocks.{layer}.attn", layer, "attn"),
            (f"blocks.{layer}.mlp", layer, "mlp"),
        ]
    downstream.append(("logits", n_layers, "logits"))

    def reads(up_layer: int, up_kind: str, down_layer: int, down_kind: str) -> bool:
        if down_layer > up_layer:
            return True
        return (
            down_layer == up_layer
            and up_kind == "head"
            and down_kind == "mlp"
            and not adapter.parallel_residual
        )

    allowed = torch.tensor(
        [[reads(ul, uk, dl, dk) for _, dl, dk in downstream] for _, ul, uk in upstream],
        dtype=torch.bool,
    )
    return EdgeGraph([u[0] for u in upstream], [d[0] for d in downstream], allowed)


def input_norm_paths(hm: HookedModel) -> list[str]:
    """Module paths of the downstream nodes' input norms, in ``edge_graph`` downstream order:
    per block the norms its attention and MLP read the residual through (the adapter's), then
    the final norm the logits read through."""
    adapter = hm.require_adapter()
    paths = []
    for layer in range(hm.dims.n_layers):
        paths += [
            adapter.layer_path(layer, adapter.attn_input_norm),
            adapter.layer_path(layer, adapter.mlp_input_norm),
        ]
    paths.append(adapter.final_norm)
    return paths


def _replace_input_hook(store: list[torch.Tensor]):
    """Forward pre-hook giving a norm a fresh copy of its residual input (v's own read)."""

    def hook(module, args, kwargs):
        if args:
            fresh = args[0].clone()
            store.append(fresh)
            return (fresh, *args[1:]), kwargs
        key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
        fresh = kwargs[key].clone()
        store.append(fresh)
        return args, {**kwargs, key: fresh}

    return hook


# ---- one batch ------------------------------------------------------------------------------
@dataclass
class EdgeScores:
    """Edge scores of one batch, summed over its facts (metric = sum of the rows' readouts).

    ``scores[u, v]`` is zero where ``graph.allowed`` is false. ``input_grads`` (only when asked
    for) maps each downstream node to ``dM/dx_v`` ``[batch, seq, d_model]``.
    """

    graph: EdgeGraph
    scores: torch.Tensor  # float64 [n_up, n_down]
    metric_clean: torch.Tensor  # [batch]
    metric_corrupt: torch.Tensor  # [batch]
    input_grads: dict[str, torch.Tensor] | None = None


def _upstream_outputs(hm: HookedModel, cache) -> Iterator[torch.Tensor]:
    """Upstream outputs group by group, in ``edge_graph`` order: the embedding ``[1, b, s, d]``,
    then per layer its heads and MLP ``[H + 1, b, s, d]`` (lazily, to bound memory)."""
    model, adapter = hm.model, hm.require_adapter()
    yield cache["blocks.0.resid_pre"].float()[None]
    for layer in range(hm.dims.n_layers):
        heads = head_contributions(model, adapter, layer, cache[f"blocks.{layer}.head"])
        mlp = cache[f"blocks.{layer}.mlp_out"]
        yield torch.cat([heads.float().permute(2, 0, 1, 3), mlp.float()[None]])


def edge_attribution_batch(
    hm: HookedModel,
    clean: FactPrompts,
    corrupt: FactPrompts,
    keep_grads: bool = False,
    readout: Readout = LOGIT_DIFF,
) -> EdgeScores:
    """Scores of every edge for one batch: corrupted forward, clean forward + one backward."""
    check_same_layout(clean, corrupt)
    graph = edge_graph(hm)
    norm_paths = input_norm_paths(hm)
    n_layers = hm.dims.n_layers
    sites = ["blocks.0.resid_pre"] + [
        f"blocks.{layer}.{kind}" for layer in range(n_layers) for kind in ("head", "mlp_out")
    ]

    with torch.no_grad(), hm.hooks(cache=sites) as corrupt_cache:
        metric_corrupt = readout(final_logits(hm, corrupt), clean)

    reads: list[torch.Tensor] = []
    handles = []

    def leaf(activation: torch.Tensor) -> torch.Tensor:
        # gradients must flow even if the model's parameters are frozen; none go to the weights
        return activation.detach().requires_grad_(True)

    try:
        for path in norm_paths:
            module = hm.model.get_submodule(path)
            handles.append(
                module.register_forward_pre_hook(_replace_input_hook(reads), with_kwargs=True)
            )
        with torch.enable_grad(), hm.hooks(cache=sites, handlers=[("embed", leaf)]) as clean_cache:
            metric = readout(final_logits(hm, clean), clean)
            if len(reads) != len(norm_paths):
                raise SiteError(
                    f"expected {len(norm_paths)} residual reads through the input norms, saw "
                    f"{len(reads)}: this model's blocks do not read through the {hm.adapter.family} "
                    "adapter's input norms"
                )
            grads = torch.autograd.grad(metric.sum(), reads)
    finally:
        for handle in handles:
            handle.remove()

    with torch.no_grad():
        g = torch.stack([grad.float() for grad in grads]).flatten(1)  # [n_down, b*s*d]
        rows = []
        for corr, cln in zip(
            _upstream_outputs(hm, corrupt_cache), _upstream_outputs(hm, clean_cache), strict=True
        ):
            rows.append((corr - cln).flatten(1) @ g.T)
        scores = torch.cat(rows).double().cpu() * graph.allowed
    input_grads = None
    if keep_grads:
        input_grads = {
            name: grad.detach() for name, grad in zip(graph.downstream, grads, strict=True)
        }
    return EdgeScores(
        graph, scores, metric.detach().float().cpu(), metric_corrupt.cpu(), input_grads
    )


# ---- from edges to components ---------------------------------------------------------------
def _edge_components(up: str, down: str) -> list[str]:
    """The trainable components an edge touches (``embed``/``logits`` are not components)."""
    return [name for name in (up, down) if name not in ("embed", "logits")]


def component_scores(
    graph: EdgeGraph, scores: torch.Tensor, edges: Sequence[tuple[int, int]] | None = None
) -> dict[str, float]:
    """Sum of ``|edge score|`` per component, over ``edges`` (index pairs) or all edges."""
    if edges is None:
        edges = graph.allowed.nonzero().tolist()
    totals: dict[str, float] = {}
    for u, v in edges:
        for component in _edge_components(graph.upstream[u], graph.downstream[v]):
            totals[component] = totals.get(component, 0.0) + abs(float(scores[u, v]))
    return totals


def top_edges(graph: EdgeGraph, scores: torch.Tensor, n: int) -> list[tuple[int, int]]:
    """Index pairs of the ``n`` existing edges with the largest ``|score|`` (ties: graph order)."""
    candidates = graph.allowed.nonzero()
    magnitudes = scores[candidates[:, 0], candidates[:, 1]].abs()
    order = torch.sort(magnitudes, descending=True, stable=True).indices[:n]
    return [tuple(candidates[i].tolist()) for i in order]


def _selectable(hm: HookedModel, scores: dict[str, float]) -> dict[str, float]:
    """Components selection may choose from: heads fold into their attention layer (scores
    summed) where heads have no parameters of their own (fused-qkv families)."""
    per_head = heads_have_parameters(hm)
    folded: dict[str, float] = {}
    for component, value in scores.items():
        name = component if per_head or ".head" not in component else component.split(".head")[0]
        folded[name] = folded.get(name, 0.0) + value
    return folded


class EdgeAttributionOptions(ReadoutOptions):
    """EAP's own options: the readout and how many edges form the circuit."""

    top_edges: int = Field(
        default=DEFAULT_TOP_EDGES, ge=1, description="edges (by |score|) that form the circuit"
    )


@LOCALIZERS.method("edge_attribution_patching", options=EdgeAttributionOptions, needs_pairs=True)
def edge_attribution_patching(
    hm: HookedModel,
    records: Sequence[FactRecord],
    options: LocalizeOptions,
    method_options: EdgeAttributionOptions,
) -> Scores:
    """Score every residual edge by EAP; the circuit's components are the selection without a
    budget or ``top_k``, the best components by edge scores otherwise.

    Facts without a same-layout partner are skipped (``evidence["skipped_without_partner"]``).
    """
    readout = READOUTS.get(method_options.metric)
    records, unpaired = facts_with_partners(hm, records)
    batches, partners = fact_batches(hm, records, options)
    n_facts = len(records)
    graph = edge_graph(hm)
    total = torch.zeros(graph.allowed.shape, dtype=torch.float64)
    metric_clean = metric_corrupt = 0.0
    with progress_bar(n_facts, "edge attribution patching", enabled=options.progress) as advance:
        for clean, corrupt in batches:
            batch = edge_attribution_batch(hm, clean, corrupt, readout=readout)
            total += batch.scores
            metric_clean += float(batch.metric_clean.sum())
            metric_corrupt += float(batch.metric_corrupt.sum())
            advance(len(clean.records))
    edge_scores = total / n_facts

    n_top = method_options.top_edges
    circuit = top_edges(graph, edge_scores, n_top)
    scores = component_scores(graph, edge_scores)
    circuit_scores = _selectable(hm, component_scores(graph, edge_scores, circuit))
    evidence = {
        "sign_convention": SIGN_CONVENTION,
        "metric": f"{readout.name} (mean over facts): {readout.description}",
        "top_edges": [
            {
                "upstream": graph.upstream[u],
                "downstream": graph.downstream[v],
                "score": float(edge_scores[u, v]),
            }
            for u, v in circuit
        ],
        "n_edges": int(graph.allowed.sum()),
        "n_top_edges": n_top,
        "circuit_component_scores": component_scores(graph, edge_scores, circuit),
        "downstream_totals": {
            name: float(edge_scores[:, v].sum()) for v, name in enumerate(graph.downstream)
        },
        "metric_clean": metric_clean / n_facts,
        "metric_corrupt": metric_corrupt / n_facts,
        "corruption": f"pair_corruptions(seed={options.seed})",
        "partners": partners,
        "skipped_without_partner": unpaired,
        "input_norms": dict(zip(graph.downstream, input_norm_paths(hm), strict=True)),
    }
    return Scores(
        scores,
        candidates=_selectable(hm, scores),
        selected=sorted(circuit_scores, key=lambda c: circuit_scores[c], reverse=True),
        evidence=evidence,
        n_facts=n_facts,
    )
