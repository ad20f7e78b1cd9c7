"""Edge attribution patching: decomposition completeness, gradient isolation, graph rules."""

from __future__ import annotations

import pytest
import torch

from mechunlearn.localize.common import facts_with_partners, final_logits
from mechunlearn.localize.eap import (
    DEFAULT_TOP_EDGES,
    edge_attribution_batch,
    edge_attribution_patching,
    edge_graph,
    input_norm_paths,
)
from mechunlearn.localize.prompts import answer_logit_diff, build_fact_prompts, pair_corruptions
from mechunlearn.localize.registry import LOCALIZERS, LocalizeOptions
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.sports import load_sports
from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer


def sports_facts(hm: HookedModel, n: int = 30):
    return facts_with_partners(hm, load_sports()[::7][:n])[0]


def clean_and_corrupt(hm: HookedModel, n: int = 30):
    records = sports_facts(hm, n)
    return build_fact_prompts(hm, records), build_fact_prompts(hm, pair_corruptions(hm, records))


def norm_inputs(hm: HookedModel, prompts) -> list[torch.Tensor]:
    """What each downstream node's input norm receives (the residual as read by the node)."""
    seen: list[torch.Tensor] = []
    handles = [
        hm.model.get_submodule(path).register_forward_pre_hook(
            lambda module, args: seen.append(args[0].detach())
        )
        for path in input_norm_paths(hm)
    ]
    with torch.no_grad():
        final_logits(hm, prompts)
    for handle in handles:
        handle.remove()
    return seen


def test_incoming_edges_sum_to_the_node_input_estimate(tiny):
    """Completeness: embedding + heads + MLPs (biases and Gemma's norms accounted for) make up
    each node's input, so its incoming edge scores sum to grad(x_v) . (x_v^corr - x_v^clean)."""
    clean, corrupt = clean_and_corrupt(tiny)
    result = edge_attribution_batch(tiny, clean, corrupt, keep_grads=True)
    x_clean, x_corrupt = norm_inputs(tiny, clean), norm_inputs(tiny, corrupt)
    for v, name in enumerate(result.graph.downstream):
        grad = result.input_grads[name].float()
        node_estimate = float((grad * (x_corrupt[v] - x_clean[v]).float()).sum())
        incoming = float(result.scores[:, v].sum())
        scale = float(grad.abs().sum() * (x_corrupt[v] - x_clean[v]).abs().max())
        assert incoming == pytest.approx(node_estimate, abs=1e-5 * scale + 1e-7), name
    assert result.scores.abs().sum() > 0


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_gradient_is_the_node_s_own_read(family):
    """v's gradient is not the residual stream's total gradient: the total at the entry of
    block L is the sum of the isolated gradients of every node reading it from there on."""
    hm = HookedModel(tiny_model(family), tiny_tokenizer())
    clean, corrupt = clean_and_corrupt(hm, 20)
    grads = edge_attribution_batch(hm, clean, corrupt, keep_grads=True).input_grads
    layer = 1
    stash = {}

    def fresh(activation):
        stash["x"] = activation.clone()
        return stash["x"]

    def leaf(activation):
        return activation.detach().requires_grad_(True)

    handlers = [("embed", leaf), (f"blocks.{layer}.resid_pre", fresh)]
    with torch.enable_grad(), hm.hooks(handlers=handlers):
        metric = answer_logit_diff(final_logits(hm, clean), clean).sum()
        (total,) = torch.autograd.grad(metric, stash["x"])
    own = grads[f"blocks.{layer}.attn"]
    assert not torch.allclose(own, total, atol=1e-4)
    readers = [
        g for name, g in grads.items() if name == "logits" or int(name.split(".")[1]) >= layer
    ]
    assert torch.allclose(sum(readers), total, atol=1e-5)


@pytest.mark.parametrize(
    ("family", "same_layer_head_to_mlp"),
    [("llama", True), ("gpt_neox", False), ("gpt_neox_sequential", True)],
)
def test_graph_rules(family, same_layer_head_to_mlp):
    hm = HookedModel(tiny_model(family), tiny_tokenizer())
    graph = edge_graph(hm)
    n_layers, n_heads = hm.dims.n_layers, hm.dims.n_heads
    assert len(graph.upstream) == 1 + n_layers * (n_heads + 1)
    assert len(graph.downstream) == 2 * n_layers + 1
    edges = set(graph.edge_names())

    def layer_of(name, default):
        return int(name.split(".")[1]) if name.startswith("blocks.") else default

    for up, down in edges:  # earlier -> later only
        assert layer_of(up, -1) <= layer_of(down, n_layers)
    assert ("blocks.0.mlp", "blocks.0.mlp") not in edges
    assert ("blocks.0.attn.head0", "blocks.0.attn") not in edges
    assert (("blocks.0.attn.head0", "blocks.0.mlp") in edges) == same_layer_head_to_mlp
    assert all(("embed", d) in edges for d in graph.downstream)
    assert all((u, "logits") in edges for u in graph.upstream)


def test_localization_and_determinism(tiny_llama):
    facts = sports_facts(tiny_llama)
    options = LocalizeOptions(progress=False, batch_size=9)
    loc = edge_attribution_patching(tiny_llama, facts, options, {"top_edges": 8})
    again = edge_attribution_patching(tiny_llama, facts, options, {"top_edges": 8})
    assert loc.scores == again.scores and loc.evidence == again.evidence
    top = loc.evidence["top_edges"]
    assert len(top) == 8
    magnitudes = [abs(edge["score"]) for edge in top]
    assert magnitudes == sorted(magnitudes, reverse=True)
    circuit = set(loc.evidence["circuit_component_scores"])
    assert set(loc.selected) == circuit and circuit
    for edge in top:
        for node in (edge["upstream"], edge["downstream"]):
            assert node in ("embed", "logits") or node in circuit
    # score = sum of |edge| over all edges touching the component; circuit scores are a part
    assert all(
        loc.scores[c] >= loc.evidence["circuit_component_scores"][c] - 1e-12 for c in circuit
    )
    dims = tiny_llama.dims
    assert len(loc.scores) == dims.n_layers * (dims.n_heads + 2)


def test_batches_add_up(tiny_llama):
    facts = sports_facts(tiny_llama)
    one = edge_attribution_patching(
        tiny_llama, facts, LocalizeOptions(progress=False, batch_size=64)
    )
    many = edge_attribution_patching(
        tiny_llama, facts, LocalizeOptions(progress=False, batch_size=7)
    )
    for component, value in one.scores.items():
        assert many.scores[component] == pytest.approx(value, rel=1e-4, abs=1e-7)


def test_selection_options():
    hm = HookedModel(tiny_model("gpt2"), tiny_tokenizer())
    facts = sports_facts(hm)
    default = edge_attribution_patching(hm, facts, LocalizeOptions(progress=False))
    assert len(default.evidence["top_edges"]) == DEFAULT_TOP_EDGES
    assert not any(".head" in c for c in default.selected)  # GPT-2 heads fold into layers
    only_mlp = edge_attribution_patching(
        hm, facts, LocalizeOptions(progress=False, restrict_to="mlp")
    )
    assert only_mlp.selected and all(c.endswith(".mlp") for c in only_mlp.selected)
    budget = hm.parameters_of(["blocks.0.mlp"])[0].numel * 3
    budgeted = edge_attribution_patching(hm, facts, LocalizeOptions(progress=False, budget=budget))
    assert 0 < budgeted.n_params <= budget
    # top_k picks components (not edges) from the folded scores, best first
    top = edge_attribution_patching(hm, facts, LocalizeOptions(progress=False, top_k=3))
    folded = top.selection_scores
    assert top.selected == sorted(folded, key=lambda c: folded[c], reverse=True)[:3]


def test_registered():
    assert LOCALIZERS.get("edge_attribution_patching") is edge_attribution_patching
