"""The localization protocol: methods only score; the framework validates each method's own
options, restricts, budgets and packages the same way for every method; readouts are a
parameter; family facts come from the adapters."""

from __future__ import annotations

import pytest
import torch

from mechunlearn.errors import ConfigError
from mechunlearn.experiments.localizations import reselect, takes_budget
from mechunlearn.localize import LOCALIZERS, READOUTS, LocalizeOptions, MethodOptions, Scores
from mechunlearn.localize.common import heads_have_parameters
from mechunlearn.localize.eap import input_norm_paths
from mechunlearn.localize.prompts import answer_logit_diff, build_fact_prompts
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks import load_sports
from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

QUIET = LocalizeOptions(progress=False)


class DepthOptions(MethodOptions):
    power: float = 1.0


@pytest.fixture
def depth_method(monkeypatch):
    """A method added as a user would add one (one decorated scorer + its options), removed
    from the registry after the test."""
    monkeypatch.setattr(LOCALIZERS, "_entries", dict(LOCALIZERS._entries))

    @LOCALIZERS.method("depth", options=DepthOptions)
    def depth(hm, records, options, own: DepthOptions) -> Scores:
        """Later MLPs score higher (a stand-in scorer)."""
        n = hm.dims.n_layers
        scores = {f"blocks.{i}.mlp": float(i + 1) ** own.power for i in range(n)}
        scores |= {f"blocks.{i}.attn": 0.5 for i in range(n)}
        return Scores(scores, evidence={"power": own.power})

    return depth


def test_a_new_method_gets_restriction_budget_and_packaging(tiny_llama, depth_method):
    assert LOCALIZERS.get("depth") is depth_method and "depth" in LOCALIZERS.names()
    everything = depth_method(tiny_llama, [], QUIET)
    assert set(everything.selected) == set(everything.scores)  # no budget: every positive score
    assert everything.evidence["method_options"] == {"power": 1.0}
    mlp = tiny_llama.parameters_of(["blocks.0.mlp"])
    budget = sum(p.numel for p in mlp) * 2
    two = depth_method(tiny_llama, [], QUIET.model_copy(update={"budget": budget}), {"power": 2})
    n = tiny_llama.dims.n_layers
    assert two.selected == [f"blocks.{n - 1}.mlp", f"blocks.{n - 2}.mlp"]
    assert two.n_params <= budget and two.budget == budget and two.evidence["power"] == 2
    attn = depth_method(
        tiny_llama, [], QUIET.model_copy(update={"restrict_to": "attn", "top_k": 1})
    )
    assert len(attn.selected) == 1 and attn.selected[0].endswith(".attn")
    with pytest.raises(ConfigError, match="depth options: colour"):
        depth_method(tiny_llama, [], QUIET, {"colour": "red"})
    assert takes_budget("depth")


def test_method_kinds_drive_budget_and_scope(tiny_llama):
    with pytest.raises(ConfigError, match="random needs a parameter budget"):
        LOCALIZERS.get("random")(tiny_llama, [], QUIET)
    budget = sum(p.numel for p in tiny_llama.parameters_of(["blocks.0.mlp"]))
    scoped = LOCALIZERS.get("all_mlps")(tiny_llama, [], QUIET.model_copy(update={"budget": budget}))
    assert len(scoped.selected) == tiny_llama.dims.n_layers and scoped.budget is None
    assert not takes_budget("fact_lookup") and not takes_budget("last_layer")
    assert takes_budget("causal_tracing") and takes_budget("random")
    with pytest.raises(ConfigError, match="takes none|its options: none"):
        LOCALIZERS.get("all_mlps")(tiny_llama, [], QUIET, {"power": 2})
    needs_pairs = {m for m in LOCALIZERS.names() if LOCALIZERS.get(m).needs_pairs}
    assert needs_pairs == {
        "fact_lookup", "activation_patching", "attribution_patching", "edge_attribution_patching",
    }  # fmt: skip


def test_reselect_chooses_among_the_methods_own_candidates(tiny_llama):
    """Attribution patching selects heads, not the attention layers they overlap; re-selecting
    its scores for another restriction must keep to the same candidates."""
    facts = load_sports()[::7][:30]
    loc = LOCALIZERS.get("attribution_patching")(tiny_llama, facts, QUIET)
    assert loc.selection_scores is not None and not any(
        c.endswith(".attn") for c in loc.selection_scores
    )
    attn = reselect(tiny_llama, loc, "attn", budget=None)
    assert attn.selected and all(".head" in c for c in attn.selected)


def test_readouts_agree_with_their_definitions(tiny_llama):
    prompts = build_fact_prompts(tiny_llama, load_sports()[:6])
    logits = torch.randn(6, tiny_llama.model.config.vocab_size)
    diff = READOUTS.get("logit_diff")(logits, prompts)
    torch.testing.assert_close(diff, answer_logit_diff(logits, prompts))
    prob = READOUTS.get("answer_prob")(logits, prompts)
    logp = READOUTS.get("answer_logprob")(logits, prompts)
    torch.testing.assert_close(prob, logits.softmax(-1)[torch.arange(6), prompts.answer_ids])
    torch.testing.assert_close(logp, prob.log())
    with pytest.raises(ConfigError, match="unknown readout metric 'accuracy'"):
        READOUTS.get("accuracy")


@pytest.mark.parametrize(
    ("family", "attn_norm", "mlp_norm", "per_head"),
    [
        ("llama", "input_layernorm", "post_attention_layernorm", True),
        ("gemma3", "input_layernorm", "pre_feedforward_layernorm", True),
        ("gpt2", "ln_1", "ln_2", False),
    ],
)
def test_family_facts_come_from_the_adapter(family, attn_norm, mlp_norm, per_head):
    hm = HookedModel(tiny_model(family), tiny_tokenizer())
    paths = input_norm_paths(hm)
    assert paths[0].endswith(attn_norm) and paths[1].endswith(mlp_norm)
    assert len(paths) == 2 * hm.dims.n_layers + 1
    for path in paths:
        hm.model.get_submodule(path)  # every path is a real module
    assert heads_have_parameters(hm) == per_head
