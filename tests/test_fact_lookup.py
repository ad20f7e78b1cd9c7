"""Fact-lookup localization (FLU) and its linear probes.

The main test plants the mechanism: a tiny Llama whose only MLP (layer 1) must look the sport
up from the combination of first and last name; ``fact_lookup`` must select exactly that MLP,
and the probes must find the sport decodable at the last subject token only from that MLP's
output onwards. The rest run on tiny random models: shapes, seeds, bad input.
"""

from __future__ import annotations

import pytest
import torch

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.localize import LOCALIZERS, LocalizeOptions, build_fact_prompts
from mechunlearn.localize.fact_lookup import logit_diff_readout, select_extraction_heads
from mechunlearn.localize.probes import (
    Probe,
    collect_residuals,
    encode_labels,
    fit_probe,
    probe_accuracy_by_layer,
    probe_facts,
    residual_sites,
    split_facts,
)
from mechunlearn.localize.prompts import answer_logit_diff, choose_pairable_facts
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks import load_sports
from mechunlearn.tasks.records import FactRecord
from mechunlearn.testing.planted import planted_records, train_planted_model
from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

QUIET = LocalizeOptions(progress=False, batch_size=8)


# ---- the planted mechanism ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    return train_planted_model(seed=0)


def test_planted_records_need_both_names():
    records = planted_records()
    assert len(records) == 81
    for name_index in (0, 1):
        by_name: dict[str, set[str]] = {}
        for r in records:
            by_name.setdefault(r.subject.split()[name_index], set()).add(r.answer)
        assert all(len(sports) == 3 for sports in by_name.values())  # no name decides the sport


def test_planted_model_works_with_fact_prompts(planted):
    assert planted.accuracy > 0.9
    prompts = build_fact_prompts(planted.hm, planted.records)
    assert prompts.texts[0] == planted.records[0].prompt()  # no Tiger Woods shot
    assert all(len(p) == 2 for p in prompts.subject_positions)
    with torch.no_grad():
        logits = planted.hm.model(**prompts.batch.model_inputs()).logits[:, -1]
    assert (answer_logit_diff(logits, prompts) > 0).float().mean() > 0.9


def test_fact_lookup_finds_the_planted_mlp(planted):
    loc = LOCALIZERS.get("fact_lookup")(planted.hm, planted.records, QUIET)
    layer = planted.planted_layer
    assert loc.selected == [f"blocks.{layer}.mlp"]
    assert max(loc.scores, key=loc.scores.get) == f"blocks.{layer}.mlp"
    ev = loc.evidence
    enrichment_a, enrichment_b = ev["mlp_enrichment_heads"], ev["mlp_enrichment_probe"]
    assert enrichment_a[layer] > 1.0 and enrichment_b[layer] > 1.0
    for other in range(len(enrichment_a)):
        if other != layer:  # zeroed MLPs: patching them changes nothing
            assert abs(enrichment_a[other]) < 1e-4 and abs(enrichment_b[other]) < 1e-4
    # the attribute reaches the final token through heads after the lookup layer
    assert all(h["layer"] > layer for h in ev["extraction_heads"])
    assert ev["logit_diff"]["clean"] > 1.0 > ev["logit_diff"]["corrupt"]
    # probes: decodable at the last subject token only from the planted MLP's output onwards
    subject_acc = ev["probe"]["last_subject"]["test_accuracy"]  # rows: embed, 0, 1, 2, 3
    assert max(subject_acc[: layer + 1]) < 0.6  # embed and resid_post 0: about chance (1/3)
    assert min(subject_acc[layer + 1 :]) > 0.9
    assert ev["probe"]["probe_row"] == layer + 1
    assert ev["probe"]["final"]["test_accuracy"][-1] > 0.9
    # result shapes
    n_layers, n_heads = planted.hm.dims.n_layers, planted.hm.dims.n_heads
    assert len(loc.position_scores["head_direct_effect"]) == n_layers
    assert all(len(row) == n_heads for row in loc.position_scores["head_direct_effect"])
    assert loc.position_scores["probe_last_subject"][layer] == [subject_acc[layer + 1]]
    assert loc.n_params == sum(
        p.numel() for p in planted.hm.model.model.layers[layer].mlp.parameters()
    )


def test_probe_facts_on_planted(planted):
    prompts = build_fact_prompts(planted.hm, planted.records)
    sweep, x, y = probe_facts(planted.hm, prompts, "last_subject", seed=0)
    assert x.shape == (planted.hm.dims.n_layers + 1, 81, planted.hm.dims.d_model)
    assert sweep.labels[0] == "embed" and len(sweep.test_accuracy) == x.shape[0]
    assert sweep.saturation_row() == planted.planted_layer + 1
    # a probe trained on the model applies to new residuals (latent-knowledge use)
    probe = sweep.probes[-1]
    assert probe.accuracy(x[-1, sweep.test], y[sweep.test]) == sweep.test_accuracy[-1]


# ---- probes -------------------------------------------------------------------------------------
def _blobs(n_per_class: int = 20, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(3, d, generator=g)
    y = torch.arange(3).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), d, generator=g)
    return x, y


def test_fit_probe_separates_and_is_deterministic():
    x, y = _blobs()
    train, test = split_facts(y, 0.5, seed=0)
    probe = fit_probe(x[train], y[train], classes=("a", "b", "c"))
    assert probe.accuracy(x[test], y[test]) > 0.9
    again = fit_probe(x[train], y[train], classes=("a", "b", "c"))
    assert torch.equal(probe.weight, again.weight)
    state = probe.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    restored = Probe.from_state_dict(state, probe.classes)
    assert torch.equal(restored.predict(x), probe.predict(x))
    assert probe.margin(x[test], y[test]).mean() > 0


def test_split_is_seeded_and_stratified():
    _, y = _blobs(n_per_class=5)
    train, test = split_facts(y, 0.5, seed=3)
    assert torch.equal(train, split_facts(y, 0.5, seed=3)[0])
    assert not torch.equal(train, split_facts(y, 0.5, seed=4)[0])
    assert set(y[train].tolist()) == set(y[test].tolist()) == {0, 1, 2}
    assert set(train.tolist()).isdisjoint(test.tolist())


def test_probe_bad_input():
    with pytest.raises(DataError, match="two different"):
        encode_labels(["golf"] * 5)
    with pytest.raises(DataError, match="too few facts"):
        split_facts(torch.tensor([0, 1, 0]), 0.5)
    with pytest.raises(DataError, match="two different"):
        fit_probe(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(DataError):
        probe_accuracy_by_layer(torch.randn(2, 5, 3), torch.zeros(4, dtype=torch.long), None, None)


def test_collect_residuals_matches_cache(tiny_llama):
    texts = ["Fact: LeBron James plays the sport of", "The river flows"]
    batch = tiny_llama.batch(texts)
    x = collect_residuals(tiny_llama, batch, -1, batch_size=1)
    assert x.shape == (tiny_llama.dims.n_layers + 1, 2, tiny_llama.dims.d_model)
    _, cache = tiny_llama.run_with_cache(
        residual_sites(tiny_llama.dims.n_layers), **batch.model_inputs()
    )
    cache = {site: value.to(x.device) for site, value in cache.items()}
    assert torch.allclose(x[1], cache["blocks.0.resid_post"][:, -1], atol=1e-5)
    picked = collect_residuals(tiny_llama, batch, torch.tensor([3, 4]), layers=["embed", 1])
    assert picked.shape == (2, 2, tiny_llama.dims.d_model)
    assert torch.allclose(picked[1, 0], cache["blocks.1.resid_post"][0, 3], atol=1e-5)


# ---- fact_lookup on tiny random models ----------------------------------------------------------
@pytest.fixture(scope="module")
def sports_facts():
    hm = HookedModel(tiny_model("llama"), tiny_tokenizer())
    return choose_pairable_facts(hm, load_sports(), 16, seed=0)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gpt_neox"])
def test_readout_reproduces_logit_diff(family, sports_facts):
    hm = HookedModel(tiny_model(family), tiny_tokenizer())
    prompts = build_fact_prompts(hm, sports_facts[:6])
    with torch.no_grad(), hm.hooks(cache=[f"blocks.{hm.dims.n_layers - 1}.resid_post"]) as cache:
        logits = hm.model(**prompts.batch.model_inputs()).logits[:, -1]
        final = cache[f"blocks.{hm.dims.n_layers - 1}.resid_post"][:, -1]
        readout = logit_diff_readout(hm, prompts, final)
    norm = hm.model.get_submodule(hm.adapter.final_norm)
    offset = torch.zeros(len(prompts.records))
    if getattr(norm, "bias", None) is not None:  # LayerNorm's bias adds a constant
        unembed = hm.model.get_output_embeddings().weight[prompts.option_ids]
        true = unembed[torch.arange(6), prompts.correct]
        direction = true - (unembed.sum(1) - true) / 2
        offset = direction @ norm.bias
    assert torch.allclose(
        (readout * final).sum(-1) + offset, answer_logit_diff(logits, prompts), atol=1e-3
    )


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "gpt_neox"])
def test_fact_lookup_shapes(family, sports_facts):
    hm = HookedModel(tiny_model(family), tiny_tokenizer(), name=f"tiny-{family}")
    loc = LOCALIZERS.get("fact_lookup")(hm, sports_facts, QUIET)
    n_layers, n_heads = hm.dims.n_layers, hm.dims.n_heads
    assert loc.method == "fact_lookup" and loc.n_facts == len(sports_facts)
    assert set(loc.scores) == {f"blocks.{L}.mlp" for L in range(n_layers)}
    assert set(loc.selected) <= set(loc.scores)
    assert all(c.endswith(".mlp") for c in loc.selected)
    assert {len(loc.position_scores[k]) for k in loc.position_scores} == {n_layers}
    assert all(len(r) == n_heads for r in loc.position_scores["head_direct_effect"])
    assert all(len(r) == 1 for r in loc.position_scores["mlp_enrichment"])
    ev = loc.evidence
    assert len(ev["probe"]["last_subject"]["test_accuracy"]) == n_layers + 1
    assert 1 <= len(ev["extraction_heads"]) <= 8
    first = min(h["layer"] for h in ev["extraction_heads"])
    if first > 0:
        assert all(int(c.split(".")[1]) < first for c in loc.selected)
    Localization = type(loc)
    assert Localization.model_validate_json(loc.model_dump_json()) == loc


def test_fact_lookup_seeded_and_budgeted(tiny_llama, sports_facts):
    run = LOCALIZERS.get("fact_lookup")
    a = run(tiny_llama, sports_facts, QUIET)
    b = run(tiny_llama, sports_facts, QUIET)
    assert a.scores == b.scores and a.selected == b.selected and a.evidence == b.evidence
    c = run(tiny_llama, sports_facts, QUIET.model_copy(update={"seed": 1}))
    assert (
        c.evidence["partners"] != a.evidence["partners"]
        or c.evidence["probe"] != a.evidence["probe"]
    )
    one_mlp = sum(p.numel() for p in tiny_llama.model.model.layers[0].mlp.parameters())
    budgeted = run(tiny_llama, sports_facts, QUIET.model_copy(update={"budget": one_mlp}))
    assert len(budgeted.selected) == 1 and budgeted.n_params <= one_mlp
    top = run(tiny_llama, sports_facts, QUIET.model_copy(update={"top_k": 2}))
    assert len(top.selected) <= 2


def test_fact_lookup_bad_input(tiny_llama, sports_facts):
    run = LOCALIZERS.get("fact_lookup")
    with pytest.raises(ConfigError, match="fact_lookup scores no attn components"):
        run(tiny_llama, sports_facts, QUIET.model_copy(update={"restrict_to": "attn"}))
    with pytest.raises(DataError):  # one sport: no corrupting partner, no probe classes
        same = [
            FactRecord(**{**r.model_dump(), "answer": "baseball", "id": f"x{i}"})
            for i, r in enumerate(sports_facts)
        ]
        run(tiny_llama, same, QUIET)
    pair = choose_pairable_facts(tiny_llama, load_sports(), 2, seed=0)
    assert len(pair) == 2
    with pytest.raises(DataError, match="too few facts"):
        run(tiny_llama, pair, QUIET)


def test_select_extraction_heads_rule():
    effects = torch.tensor([[0.05, 1.0], [0.2, -3.0]])
    assert select_extraction_heads(effects) == [(0, 1), (1, 0)]
    assert select_extraction_heads(-effects.abs()) == [(0, 0)]
    assert len(select_extraction_heads(torch.ones(4, 4))) == 8
