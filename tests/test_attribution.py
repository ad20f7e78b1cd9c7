"""Attribution patching against real (naive, one forward per component) activation patching."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mechunlearn.errors import DataError
from mechunlearn.localize.attribution import (
    POSITION_ROLES,
    attribution_batch,
    attribution_patching,
    attribution_scores,
    component_estimates,
)
from mechunlearn.localize.common import facts_with_partners, final_logits
from mechunlearn.localize.prompts import (
    answer_logit_diff,
    build_fact_prompts,
    pair_corruptions,
)
from mechunlearn.localize.registry import LOCALIZERS, LocalizeOptions
from mechunlearn.models.batches import Batch
from mechunlearn.models.handle import HookedModel
from mechunlearn.models.hooks import Patch
from mechunlearn.tasks.sports import load_sports
from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

OPTIONS = LocalizeOptions(progress=False)


def sports_facts(hm: HookedModel, n: int = 40):
    """Facts of all three sports that have same-layout partners under the tiny tokenizer."""
    return facts_with_partners(hm, load_sports()[::7][:n])[0]


def clean_and_corrupt(hm: HookedModel, n: int = 40):
    records = sports_facts(hm, n)
    partners = pair_corruptions(hm, records)
    return build_fact_prompts(hm, records), build_fact_prompts(hm, partners)


def one_token_corruption(clean, corrupt):
    """A small corruption: only the last subject token is swapped for the partner's (the
    subject becomes another name of the same token length, e.g. 'LeBron James' -> 'LeBron X')."""
    ids = clean.batch.input_ids.clone()
    for row, positions in enumerate(clean.subject_positions):
        ids[row, positions[-1]] = corrupt.batch.input_ids[row, positions[-1]]
    b = clean.batch
    return dataclasses.replace(clean, batch=Batch(ids, b.attention_mask, b.position_ids, b.lengths))


def mean_metric(hm, clean, interventions=()) -> float:
    with torch.no_grad(), hm.hooks(interventions):
        return float(answer_logit_diff(final_logits(hm, clean), clean).mean())


def true_effects(hm: HookedModel, clean, corrupt) -> dict[str, float]:
    """Noising: patch one component's corrupted activation into the clean run, one forward per
    component; effect = M(clean) - M(patched), the quantity attribution patching linearises."""
    n_layers, n_heads = hm.dims.n_layers, hm.dims.n_heads
    sites = [
        f"blocks.{layer}.{k}" for layer in range(n_layers) for k in ("head", "attn_out", "mlp_out")
    ]
    with torch.no_grad(), hm.hooks(cache=sites) as cache:
        final_logits(hm, corrupt)
    base = mean_metric(hm, clean)
    b, s = clean.batch.input_ids.shape
    effects = {}
    for layer in range(n_layers):
        site = f"blocks.{layer}.attn_out"
        effects[f"blocks.{layer}.attn"] = base - mean_metric(hm, clean, [Patch(site, cache[site])])
        for head in range(n_heads):
            mask = torch.zeros(b, s, n_heads, dtype=torch.bool)
            mask[:, :, head] = True
            site = f"blocks.{layer}.head"
            effects[f"blocks.{layer}.attn.head{head}"] = base - mean_metric(
                hm, clean, [Patch(site, cache[site], mask)]
            )
        site = f"blocks.{layer}.mlp_out"
        effects[f"blocks.{layer}.mlp"] = base - mean_metric(hm, clean, [Patch(site, cache[site])])
    return effects


def pearson(a: dict[str, float], b: dict[str, float]) -> float:
    keys = sorted(a)
    assert keys == sorted(b)
    x = torch.tensor([[a[k] for k in keys], [b[k] for k in keys]], dtype=torch.float64)
    return float(torch.corrcoef(x)[0, 1])


@pytest.mark.parametrize(("family", "threshold"), [("llama", 0.95), ("gemma3", 0.9)])
def test_matches_activation_patching_small_corruption(family, threshold):
    hm = HookedModel(tiny_model(family), tiny_tokenizer())
    clean, corrupt = clean_and_corrupt(hm)
    small = one_token_corruption(clean, corrupt)
    r = pearson(attribution_scores(hm, clean, small), true_effects(hm, clean, small))
    print(f"{family} one-token corruption: pearson {r:.4f}")
    assert r > threshold


def test_matches_activation_patching_sports_pairs():
    """Whole-subject swaps (pair_corruptions) are a bigger step; still well correlated."""
    hm = HookedModel(tiny_model("llama"), tiny_tokenizer())
    clean, corrupt = clean_and_corrupt(hm)
    r = pearson(attribution_scores(hm, clean, corrupt), true_effects(hm, clean, corrupt))
    print(f"llama sports pairs: pearson {r:.4f}")
    assert r > 0.85


class FrozenFinalNorm:
    """Replace the final RMSNorm's 1/rms by the clean run's value (a constant), which makes the
    logits - and the logit diff - exactly linear in the final residual stream."""

    def __init__(self, hm: HookedModel, clean) -> None:
        self.norm = hm.model.get_submodule(hm.adapter.final_norm)
        self.gain = (1.0 + self.norm.weight) if hm.adapter.family == "gemma" else self.norm.weight
        seen = {}
        handle = self.norm.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
        mean_metric(hm, clean)
        handle.remove()
        x = seen["x"].float()
        eps = getattr(self.norm, "variance_epsilon", None) or self.norm.eps
        self.inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps).detach()

    def hook(self, module, args, output):
        return (args[0].float() * self.inv_rms * self.gain.float()).to(output.dtype)

    def __enter__(self):
        self.handle = self.norm.register_forward_hook(self.hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_exact_when_metric_is_linear_in_the_site(family):
    """The last MLP's output reaches the metric only through the final norm and the unembedding;
    with the norm's scale frozen the metric is linear in it, so the first-order estimate is the
    true patching effect (up to float rounding)."""
    hm = HookedModel(tiny_model(family), tiny_tokenizer())
    clean, corrupt = clean_and_corrupt(hm, 24)
    last = f"blocks.{hm.dims.n_layers - 1}"
    with FrozenFinalNorm(hm, clean):
        estimate = attribution_scores(hm, clean, corrupt)[f"{last}.mlp"]
        effect = true_effects(hm, clean, corrupt)[f"{last}.mlp"]
    assert abs(effect) > 1e-5
    assert estimate == pytest.approx(effect, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_heads_sum_to_attention_layer(family):
    """o_proj is linear (a bias does not change between runs), so A(layer) = sum_h A(head h)."""
    hm = HookedModel(tiny_model(family), tiny_tokenizer())
    clean, corrupt = clean_and_corrupt(hm, 24)
    scores = attribution_scores(hm, clean, corrupt)
    for layer in range(hm.dims.n_layers):
        heads = sum(scores[f"blocks.{layer}.attn.head{h}"] for h in range(hm.dims.n_heads))
        assert heads == pytest.approx(scores[f"blocks.{layer}.attn"], rel=1e-4, abs=1e-7)


def test_localization_on_every_family(tiny):
    loc = attribution_patching(tiny, sports_facts(tiny, 30), OPTIONS)
    n_layers, n_heads = tiny.dims.n_layers, tiny.dims.n_heads
    expected = {f"blocks.{layer}.{k}" for layer in range(n_layers) for k in ("attn", "mlp")}
    expected |= {
        f"blocks.{layer}.attn.head{h}" for layer in range(n_layers) for h in range(n_heads)
    }
    assert set(loc.scores) == expected
    signed = loc.evidence["signed_scores"]
    assert all(loc.scores[c] == abs(signed[c]) for c in expected)
    assert loc.position_labels == list(POSITION_ROLES)
    for kind in ("attn", "mlp"):
        grid = loc.position_scores[kind]
        assert len(grid) == n_layers and all(len(row) == len(POSITION_ROLES) for row in grid)
        # causality: tokens before the subject are identical in clean and corrupted prompts
        assert all(row[0] == 0.0 for row in grid)
        # roles partition the positions: per layer they sum to the component's estimate
        signed_grid = loc.evidence["position_scores_signed"][kind]
        for layer in range(n_layers):
            assert sum(signed_grid[layer]) == pytest.approx(
                signed[f"blocks.{layer}.{kind}"], abs=1e-6
            )
    # only the final position matters to the last MLP
    assert loc.evidence["position_scores_signed"]["mlp"][-1][:-1] == [0.0] * 5
    assert loc.evidence["metric_clean"] != loc.evidence["metric_corrupt"]


def test_selection_honours_options(tiny_llama):
    facts = sports_facts(tiny_llama, 30)
    only_mlp = attribution_patching(
        tiny_llama, facts, LocalizeOptions(progress=False, restrict_to="mlp", top_k=2)
    )
    assert len(only_mlp.selected) == 2 and all(c.endswith(".mlp") for c in only_mlp.selected)
    attn = attribution_patching(
        tiny_llama, facts, LocalizeOptions(progress=False, restrict_to="attn", top_k=3)
    )
    assert all(".head" in c for c in attn.selected)  # heads, not whole layers, on Llama
    ranked = sorted((c for c in attn.scores if ".head" in c), key=attn.scores.get, reverse=True)
    assert attn.selected == ranked[:3]
    budget = tiny_llama.parameters_of(["blocks.0.mlp"])[0].numel * 3 // 2
    budgeted = attribution_patching(
        tiny_llama, facts, LocalizeOptions(progress=False, budget=budget)
    )
    assert 0 < budgeted.n_params <= budget


def test_fused_qkv_family_selects_layers():
    hm = HookedModel(tiny_model("gpt2"), tiny_tokenizer())
    loc = attribution_patching(hm, sports_facts(hm, 30), LocalizeOptions(progress=False, top_k=4))
    assert loc.selected and not any(".head" in c for c in loc.selected)
    assert loc.evidence["selection_granularity"] == "attention layers"


def test_batches_add_up_and_are_deterministic(tiny_llama):
    facts = sports_facts(tiny_llama, 30)
    one = attribution_patching(tiny_llama, facts, LocalizeOptions(progress=False, batch_size=64))
    many = attribution_patching(tiny_llama, facts, LocalizeOptions(progress=False, batch_size=7))
    again = attribution_patching(tiny_llama, facts, LocalizeOptions(progress=False, batch_size=7))
    assert many.scores == again.scores
    for component, value in one.scores.items():
        assert many.scores[component] == pytest.approx(value, rel=1e-4, abs=1e-7)


def test_one_clean_backward_covers_every_component(tiny_llama):
    clean, corrupt = clean_and_corrupt(tiny_llama, 24)
    batch = attribution_batch(tiny_llama, clean, corrupt)
    n, width = clean.batch.input_ids.shape
    dims = tiny_llama.dims
    assert batch.head.shape == (dims.n_layers, n, width, dims.n_heads)
    assert batch.mlp.shape == batch.attn.shape == (dims.n_layers, n, width)
    assert len(component_estimates(batch)) == dims.n_layers * (dims.n_heads + 2)


def test_no_partners_is_a_data_error(tiny_llama):
    same_sport = [r for r in load_sports() if r.answer == "basketball"][:10]
    with pytest.raises(DataError, match="corrupting partner"):
        attribution_patching(tiny_llama, same_sport, OPTIONS)


def test_registered():
    assert LOCALIZERS.get("attribution_patching") is attribution_patching
