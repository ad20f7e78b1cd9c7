"""Activation patching: batched == naive reference, exact sanity identities, errors, selection."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from mechunlearn.errors import DataError
from mechunlearn.localize.activation_patching import (
    activation_patching,
    activation_patching_naive,
)
from mechunlearn.localize.causal_tracing import ROLES
from mechunlearn.localize.common import heads_have_parameters
from mechunlearn.localize.prompts import build_fact_prompts
from mechunlearn.localize.registry import LOCALIZERS, LocalizeOptions
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.sports import load_sports
from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

FAMILIES = ["llama", "gemma3", "gpt2"]


def model(family: str) -> HookedModel:
    return HookedModel(tiny_model(family), tiny_tokenizer(), name=f"tiny-{family}")


@pytest.fixture(scope="module")
def facts():
    """Eight facts in two token layouts (so the batch is padded), two sports per layout, so
    every fact has a same-layout partner with another answer."""
    records = load_sports()
    prompts = build_fact_prompts(model("llama"), records)
    groups = defaultdict(list)
    for layout, record in zip(prompts.relative_layout(), records, strict=True):
        groups[layout[1:]].append(record)
    chosen = []
    for layout in sorted(groups, key=lambda k: -len(groups[k]))[:2]:
        for sport in ("baseball", "football"):
            chosen += [r for r in groups[layout] if r.answer == sport][:2]
    assert len(chosen) == 8
    return chosen


def options(**kw) -> LocalizeOptions:
    return LocalizeOptions(progress=False, **kw)


def patched_means(result) -> dict[str, float]:
    """Mean patched logit difference per component, back from the normalised recovery."""
    ev = result.evidence
    denominator = ev["mean_ld_clean"] - ev["mean_ld_corrupt"]
    return {c: r * denominator + ev["mean_ld_corrupt"] for c, r in ev["recovery"].items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_matches_naive(family, facts):
    hm = model(family)
    fast = activation_patching(hm, facts, options(batch_size=24))
    slow = activation_patching_naive(hm, facts, options())
    assert fast.evidence["pairs"] == slow.evidence["pairs"]
    assert fast.scores.keys() == slow.scores.keys()
    n_layers, n_heads = hm.dims.n_layers, hm.dims.n_heads
    assert len(fast.scores) == n_layers * (n_heads + 2)
    for key in ("ld_clean", "ld_corrupt"):
        np.testing.assert_allclose(fast.evidence[key], slow.evidence[key], atol=1e-5)
    a, b = patched_means(fast), patched_means(slow)
    np.testing.assert_allclose([a[c] for c in a], [b[c] for c in a], atol=1e-5)
    denominator = fast.evidence["mean_ld_clean"] - fast.evidence["mean_ld_corrupt"]
    np.testing.assert_allclose(
        np.array(fast.position_scores["mlp"]) * denominator,
        np.array(slow.position_scores["mlp"]) * denominator,
        atol=1e-5,
    )
    assert fast.position_labels == slow.position_labels == list(ROLES)
    assert fast.evidence["n_forwards"] * 5 < slow.evidence["n_forwards"]
    assert all(v >= 0 for v in fast.scores.values())
    assert fast.scores == {c: abs(r) for c, r in fast.evidence["recovery"].items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_last_layer_mlp_acts_only_at_last_position(family, facts):
    """The last MLP's output at earlier positions never reaches the final logits, so patching
    it everywhere equals patching it at the last token only."""
    hm = model(family)
    result = activation_patching(hm, facts, options())
    last = hm.dims.n_layers - 1
    ev = result.evidence
    denominator = ev["mean_ld_clean"] - ev["mean_ld_corrupt"]  # compare in logit units
    per_role = {
        role: value * denominator
        for role, value in zip(
            result.position_labels, result.position_scores["mlp"][last], strict=True
        )
    }
    for role, value in per_role.items():
        if role != "last token":
            assert abs(value) < 1e-6
    whole = ev["recovery"][f"blocks.{last}.mlp"] * denominator
    assert abs(whole) > 1e-4
    assert per_role["last token"] == pytest.approx(whole, abs=1e-6)


def test_mismatched_layout_raises(tiny_llama, facts):
    short, long = facts[0], facts[4]  # the two layouts differ in subject length
    with pytest.raises(DataError, match="layout"):
        activation_patching(tiny_llama, [short], options(), corrupted=[long])
    with pytest.raises(DataError, match="layout"):
        activation_patching_naive(tiny_llama, [short], options(), corrupted=[long])


def test_uninformative_corruption_raises(tiny_llama, facts):
    """Patching clean into clean leaves nothing to recover: the ratio is undefined."""
    with pytest.raises(DataError, match="normalised"):
        activation_patching(tiny_llama, facts[:2], options(), corrupted=facts[:2])


def test_seed_reproducible(tiny_llama, facts):
    a = activation_patching(tiny_llama, facts, options(seed=1))
    b = activation_patching(tiny_llama, facts, options(seed=1))
    assert a.scores == b.scores and a.evidence["pairs"] == b.evidence["pairs"]
    pairings = {
        tuple(map(tuple, activation_patching(tiny_llama, facts, options(seed=s)).evidence["pairs"]))
        for s in range(4)
    }
    assert len(pairings) > 1


def test_selection_respects_budget_and_restrict_to(facts):
    hm = model("llama")
    assert heads_have_parameters(hm)
    default = activation_patching(hm, facts, options(top_k=4))
    assert len(default.selected) == 4
    assert not any(c.endswith(".attn") for c in default.selected)  # heads, not whole layers
    attn = activation_patching(hm, facts, options(restrict_to="attn", top_k=3))
    assert all(".attn.head" in c for c in attn.selected)
    heads = {c: s for c, s in attn.scores.items() if ".head" in c}
    assert attn.selected == sorted(heads, key=heads.get, reverse=True)[:3]
    mlp = activation_patching(hm, facts, options(restrict_to="mlp"))
    assert mlp.selected and all(c.endswith(".mlp") for c in mlp.selected)
    budget = sum(p.numel for p in hm.parameters_of(["blocks.0.mlp"])) + 1
    limited = activation_patching(hm, facts, options(budget=budget))
    assert 0 < limited.n_params <= budget


def test_no_head_parameters_selects_layers(facts):
    hm = model("gpt2")
    assert not heads_have_parameters(hm)
    result = activation_patching(hm, facts, options(restrict_to="attn", top_k=2))
    assert len(result.selected) == 2 and all(c.endswith(".attn") for c in result.selected)


def test_registered():
    assert LOCALIZERS.get("activation_patching") is activation_patching


def test_batch_size_does_not_change_results(tiny_llama, facts):
    """Small batches split facts into groups and cells across forwards: same numbers."""
    small = activation_patching(tiny_llama, facts, options(batch_size=3))
    large = activation_patching(tiny_llama, facts, options(batch_size=64))
    a, b = patched_means(small), patched_means(large)
    np.testing.assert_allclose([a[c] for c in a], [b[c] for c in a], atol=1e-5)
    np.testing.assert_allclose(
        small.evidence["ld_corrupt"], large.evidence["ld_corrupt"], atol=1e-5
    )
    assert small.evidence["n_forwards"] > large.evidence["n_forwards"]
