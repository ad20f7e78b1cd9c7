"""Causal tracing (ROME): cached/batched == naive reference, and exact sanity identities."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.localize.causal_tracing import (
    ROLES,
    SUBJECT_ROLES,
    TRACE_KINDS,
    CausalTracingOptions,
    causal_trace,
    causal_trace_naive,
    embedding_std,
    role_offsets,
    window_layers,
)
from mechunlearn.localize.prompts import build_fact_prompts
from mechunlearn.localize.registry import LOCALIZERS, LocalizeOptions
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.records import FactRecord
from mechunlearn.tasks.sports import load_sports
from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

FAMILIES = ["llama", "gemma3", "gpt2"]


def model(family: str) -> HookedModel:
    return HookedModel(tiny_model(family), tiny_tokenizer(), name=f"tiny-{family}")


def assert_close(actual, expected) -> None:
    """Within 1e-4 absolute and 0.1% of the largest value (random tiny models give small
    probabilities, so an absolute tolerance alone would be vacuous)."""
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    scale = np.abs(expected).max()
    assert scale > 1e-7, "comparison would be vacuous"
    np.testing.assert_allclose(actual, expected, rtol=0, atol=min(1e-4, 1e-3 * scale))


@pytest.fixture(scope="module")
def facts():
    """Four facts of different token lengths (the batch is left-padded)."""
    records = load_sports()
    return [records[0], records[1], records[5], records[9]]


def options(**kw) -> tuple[LocalizeOptions, CausalTracingOptions]:
    """The framework's options and causal tracing's own, from one set of keywords."""
    common = {k: v for k, v in kw.items() if k in LocalizeOptions.model_fields}
    own = {k: v for k, v in kw.items() if k not in common}
    return LocalizeOptions(progress=False, **common), CausalTracingOptions(**own)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_matches_naive(family, facts):
    hm = model(family)
    opts = options(n_noise_samples=2, window=3, batch_size=24)
    fast, slow = causal_trace(hm, facts, *opts), causal_trace_naive(hm, facts, *opts)
    assert len({len(p) for p in build_fact_prompts(hm, facts).subject_positions}) > 1
    assert fast.position_labels == slow.position_labels == list(ROLES)
    for kind in TRACE_KINDS:
        assert_close(fast.position_scores[kind], slow.position_scores[kind])
    assert fast.scores.keys() == slow.scores.keys()
    assert_close(list(fast.scores.values()), list(slow.scores.values()))
    assert_close(fast.evidence["metric_clean"], slow.evidence["metric_clean"])
    assert_close(fast.evidence["metric_corrupt"], slow.evidence["metric_corrupt"])
    assert fast.evidence["implementation"] == "cached"
    assert fast.evidence["n_forwards"] * 5 < slow.evidence["n_forwards"]


class NoBosModel(HookedModel):
    """Tokenizes without BOS (like GPT-2), so a prompt can start with its subject."""

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return super().tokenize(text, add_special_tokens=False)


def offset_facts() -> list[FactRecord]:
    """Facts whose subjects start at different offsets, one prompt past Gemma's tiny window."""
    templates = [
        "{subject} plays the sport of",
        "Fact: {subject} plays the sport of",
        "In a long and famous professional career, the athlete {subject} plays the sport of",
    ]
    return [
        FactRecord(
            id=f"offset-{i}",
            subject=record.subject,
            template=template,
            answer=record.answer,
            options=record.options,
        )
        for i, (template, record) in enumerate(zip(templates, load_sports()[:3], strict=True))
    ]


@pytest.mark.parametrize(("family", "bos"), [("llama", True), ("gemma3", True), ("gpt2", False)])
def test_subject_offsets_and_even_window_match_naive(family, bos):
    """Subjects at different offsets (at index 0 without BOS: no shared prefix), an even window
    and forwards that split one position's cells across noise draws."""
    hm = (HookedModel if bos else NoBosModel)(tiny_model(family), tiny_tokenizer(), name=family)
    facts = offset_facts()
    prompts = build_fact_prompts(hm, facts)
    starts = [layout[1] for layout in prompts.relative_layout()]
    assert len(set(starts)) == 3 and (min(starts) == 0) == (not bos)
    assert max(prompts.batch.lengths) > 2 * (getattr(hm.model.config, "sliding_window", 0) or 0)
    opts = options(n_noise_samples=2, window=2, batch_size=5)
    fast, slow = causal_trace(hm, facts, *opts), causal_trace_naive(hm, facts, *opts)
    for kind in TRACE_KINDS:
        assert_close(fast.position_scores[kind], slow.position_scores[kind])
    assert_close(fast.evidence["metric_corrupt"], slow.evidence["metric_corrupt"])


def test_tiny_noise_has_no_effect(facts):
    hm = model("llama")
    normal = causal_trace(hm, facts, *options())
    tiny = causal_trace(hm, facts, *options(noise_scale=1e-6))
    for kind in TRACE_KINDS:
        effect = np.abs(normal.position_scores[kind]).max()
        assert np.abs(tiny.position_scores[kind]).max() < 1e-3 * effect
    np.testing.assert_allclose(
        tiny.evidence["metric_corrupt"], tiny.evidence["metric_clean"], atol=1e-8
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_restoring_final_residual(family, facts):
    """The last layer's output at the last token fixes the logits (IE = P_clean - P_corr);
    at a subject token no state of the last layer can reach the final position (IE = 0, so the
    last MLP is not selected: each restored row is compared with P_corr of its own forward)."""
    hm = model(family)
    result = causal_trace(hm, facts, *options(n_noise_samples=2, batch_size=7))
    labels, last = result.position_labels, hm.dims.n_layers - 1
    expected = result.evidence["mean_metric_clean"] - result.evidence["mean_metric_corrupt"]
    assert abs(expected) > 1e-6
    resid = result.position_scores["resid"][last][labels.index("last token")]
    assert resid == pytest.approx(expected, abs=1e-8)
    for kind in TRACE_KINDS:
        for role in SUBJECT_ROLES:
            assert abs(result.position_scores[kind][last][labels.index(role)]) < 1e-9
    assert f"blocks.{last}.mlp" not in result.selected


def test_seed_reproducible(facts):
    hm = model("llama")
    a, b = causal_trace(hm, facts, *options(seed=3)), causal_trace(hm, facts, *options(seed=3))
    c = causal_trace(hm, facts, *options(seed=4))
    assert a.position_scores == b.position_scores and a.scores == b.scores
    assert a.position_scores["resid"] != c.position_scores["resid"]
    assert a.evidence["embedding_std"] == c.evidence["embedding_std"]


def test_embedding_std_is_subject_token_std(tiny_llama, facts):
    prompts = build_fact_prompts(tiny_llama, facts)
    ids = prompts.batch.input_ids[prompts.subject_mask()]
    expected = tiny_llama.model.get_input_embeddings().weight[ids].std()
    with torch.no_grad():
        assert embedding_std(tiny_llama, prompts) == pytest.approx(float(expected), rel=1e-5)


def test_window_restores_more_layers(facts):
    hm = model("llama")
    narrow, wide = causal_trace(hm, facts, *options()), causal_trace(hm, facts, *options(window=3))
    assert narrow.position_scores["resid"] == wide.position_scores["resid"]
    assert narrow.position_scores["mlp"] != wide.position_scores["mlp"]
    assert wide.evidence["window"] == 3


def test_role_offsets_and_windows():
    assert role_offsets(3, 7) == {
        "first subject": [0],
        "middle subject": [1],
        "last subject": [2],
        "first after": [3],
        "further tokens": [4, 5],
        "last token": [6],
    }
    one = role_offsets(1, 2)  # one-token subject followed directly by the last token
    assert one["first subject"] == one["last subject"] == [0]
    assert one["first after"] == one["last token"] == [1] and one["middle subject"] == []
    assert window_layers(5, 10, 48) == range(0, 10)
    assert window_layers(0, 10, 3) == range(0, 3)
    assert window_layers(2, 1, 3) == range(2, 3)
    assert window_layers(1, 2, 3) == range(0, 2)


def test_selection_respects_budget_and_restrict_to(facts):
    hm = model("llama")
    mlp = causal_trace(hm, facts, *options(restrict_to="mlp"))
    assert mlp.selected and all(c.endswith(".mlp") for c in mlp.selected)
    assert any(c.endswith(".attn") for c in mlp.scores)  # every score is still reported
    attn = causal_trace(hm, facts, *options(restrict_to="attn", top_k=2))
    assert len(attn.selected) == 2 and all(c.endswith(".attn") for c in attn.selected)
    best = max(attn.scores, key=lambda c: attn.scores[c] if c.endswith(".attn") else -1)
    assert attn.selected[0] == best
    size = hm.parameters_of(["blocks.0.mlp"])
    budget = 2 * sum(p.numel for p in size) + 10
    limited = causal_trace(hm, facts, *options(budget=budget))
    assert 0 < limited.n_params <= budget and limited.budget == budget


def test_readout_is_a_parameter(facts):
    """The default readout is ROME's answer probability; ``answer_logprob`` traces the same
    cells with the log-probability (clean value = log of the default's)."""
    hm = model("llama")
    prob = causal_trace(hm, facts, *options())
    logp = causal_trace(hm, facts, *options(metric="answer_logprob"))
    assert prob.evidence["metric"] == "answer_prob" and logp.evidence["metric"] == "answer_logprob"
    assert_close(np.log(prob.evidence["metric_clean"]), logp.evidence["metric_clean"])
    assert logp.position_scores["attn"] != prob.position_scores["attn"]
    assert logp.evidence["method_options"]["metric"] == "answer_logprob"
    with pytest.raises(ConfigError, match="readout metric"):
        causal_trace(hm, facts, options()[0], {"metric": "accuracy"})
    with pytest.raises(ConfigError, match="causal_tracing options: probe_split"):
        causal_trace(hm, facts, options()[0], {"probe_split": 0.5})


def test_registered_and_bad_input(tiny_llama):
    assert LOCALIZERS.get("causal_tracing") is causal_trace
    with pytest.raises(DataError):
        causal_trace(tiny_llama, [], *options())


def test_batch_size_does_not_change_results(facts):
    """Two rows per restoring forward (one corrupted, one restored) up to every cell of a
    position in one forward."""
    hm = model("llama")
    small = causal_trace(hm, facts, *options(batch_size=1))  # raised to the minimum of 2
    large = causal_trace(hm, facts, *options(batch_size=64))
    for kind in TRACE_KINDS:
        assert_close(small.position_scores[kind], large.position_scores[kind])
    assert small.evidence["n_rows"] < 2 * small.evidence["n_forwards"]  # one noise draw
    assert large.evidence["n_forwards"] < small.evidence["n_forwards"]


@pytest.mark.parametrize("family", FAMILIES)
def test_scored_cells_give_the_same_scores_from_fewer_rows(family, facts):
    """``trace_cells="scored"`` restores only what the component scores read: same scores and
    selection, the attention map and the MLP's subject columns unchanged, no layer-output map,
    and fewer rows (here about 64%; the rows after the subject are also the short ones)."""
    hm = model(family)
    opts = options(n_noise_samples=2, window=3, batch_size=24, top_k=3)
    full = causal_trace(hm, facts, *opts)
    scored = causal_trace(hm, facts, opts[0], opts[1].model_copy(update={"trace_cells": "scored"}))
    assert scored.scores.keys() == full.scores.keys()
    assert_close(list(scored.scores.values()), list(full.scores.values()))
    assert scored.selected == full.selected
    assert set(scored.position_scores) == {"mlp", "attn"}
    assert_close(scored.position_scores["attn"], full.position_scores["attn"])
    subject = [c for c, label in enumerate(full.position_labels) if label in SUBJECT_ROLES]
    want_mlp = np.asarray(full.position_scores["mlp"])[:, subject]
    assert_close(scored.position_scores["mlp"], want_mlp)
    assert scored.evidence["position_score_columns"]["mlp"] == [
        full.position_labels[c] for c in subject
    ]
    assert scored.evidence["trace_cells"] == "scored"
    assert scored.evidence["n_rows"] < 0.7 * full.evidence["n_rows"]
