"""Soft-prompt attack: placement of the vectors, the L2 bound, training, and a frozen model."""

from __future__ import annotations

import pytest
import torch

from mechunlearn.attacks.soft_prompt import (
    SoftPrompt,
    SoftPromptConfig,
    _items,
    _soft_scores,
    insert_placeholders,
    soft_prompt_attack,
)
from mechunlearn.attacks.split import split_records
from mechunlearn.edit.objectives import sequence_logprobs
from mechunlearn.errors import ConfigError, DataError
from mechunlearn.evals.harness import evaluate
from mechunlearn.models.batches import TargetBatch
from mechunlearn.tasks.sports import load_sports


@pytest.fixture(scope="module")
def facts():
    return load_sports()[::35]  # 12 facts, all three sports


def test_split_is_disjoint_seeded_and_complete(facts):
    train, heldout = split_records(facts, 0.5, seed=3)
    assert {r.id for r in train}.isdisjoint({r.id for r in heldout})
    assert sorted(r.id for r in train + heldout) == sorted(r.id for r in facts)
    assert len(train) == 6
    assert split_records(facts, 0.5, seed=3) == (train, heldout)
    assert split_records(facts, 0.5, seed=4) != (train, heldout)
    with pytest.raises(DataError, match="at least 2"):
        split_records(facts[:1])
    with pytest.raises(ConfigError):
        split_records(facts, 1.0)


def test_placeholders_go_after_bos(tiny_llama):
    tokens = tiny_llama.tokenize("Fact: Tom plays")
    assert tokens[0] == tiny_llama.tokenizer.bos_token_id
    new, start = insert_placeholders(tiny_llama, tokens, 3)
    assert start == 1
    assert new == tokens[:1] + [tiny_llama.pad_id] * 3 + tokens[1:]


def test_projection_bounds_every_vector():
    soft = SoftPrompt(torch.tensor([[3.0, 4.0], [0.3, 0.4], [-6.0, 8.0]]), unit=0.5, bound=1.0)
    norms = soft.vectors.norm(dim=-1)
    assert torch.allclose(norms, torch.tensor([1.0, 0.5, 1.0]))
    # direction kept
    assert torch.allclose(soft.vectors[2], torch.tensor([-0.6, 0.8]))


def test_soft_scores_equal_real_tokens_in_the_slots(tiny, facts):
    """Vectors equal to real tokens' embeddings must score exactly like those tokens inserted,
    which checks the slots' positions (left padding, BOS, absolute positions, Gemma scale)."""
    hm = tiny
    ids = torch.tensor(hm.tokenize(" golf tennis", add_special_tokens=False)[:2])
    with hm.hooks(cache=["embed"]) as cache:
        hm.model(input_ids=ids[None].to(hm.device))
    soft = SoftPrompt(cache["embed"][0].float(), unit=1.0, bound=1e9)
    items = _items(facts[:3])
    scores = _soft_scores(hm, soft, items, batch_size=4)
    for item, score in zip(items, scores, strict=True):
        prompt = hm.tokenize(item.prompt)
        prompt = prompt[:1] + ids.tolist() + prompt[1:]
        pairs = [(prompt, hm.tokenize(c, add_special_tokens=False)) for c in item.continuations]
        batch = TargetBatch.from_tokens([p for p, _ in pairs], [c for _, c in pairs], hm.pad_id)
        with torch.no_grad():
            expected = sequence_logprobs(hm, batch).tolist()
        assert score.logprobs == pytest.approx(expected, abs=1e-4)


def test_attack_bounded_trains_and_leaves_the_model_alone(tiny_llama, facts):
    hm = tiny_llama
    hm.model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # restored exactly
    flags = [p.requires_grad for p in hm.model.parameters()]
    before = {k: v.clone() for k, v in hm.model.state_dict().items()}
    config = SoftPromptConfig(n_tokens=3, steps=15, lr=0.3, max_norm=0.5, batch_size=4)
    result = soft_prompt_attack(hm, facts, config, seed=1, progress=False)
    # halves disjoint and complete
    assert set(result.train_ids).isdisjoint(result.heldout_ids)
    assert sorted(result.train_ids + result.heldout_ids) == sorted(r.id for r in facts)
    # every vector within the bound, and the bound is active (lr is large)
    assert result.bound == pytest.approx(0.5 * result.median_norm)
    assert all(n <= result.bound * (1 + 1e-5) for n in result.vector_norms)
    assert max(result.vector_norms) == pytest.approx(result.bound, rel=1e-4)
    assert result.vectors.shape == (3, hm.dims.d_model)
    # the attack lowers the training loss toward the TRUE answers
    assert result.train_loss_final < result.train_loss_initial - 0.05
    assert len(result.losses) == 15
    # model untouched
    after = hm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in hm.model.parameters()] == flags
    assert not hm.model.training
    # 'before' is the plain model on the held-out half
    heldout = [r for r in facts if r.id in set(result.heldout_ids)]
    plain = evaluate(hm, heldout, ["completion"], known_threshold=None, progress=False)
    assert result.before["accuracy"]["mean"] == pytest.approx(
        plain.formats["completion"].metrics["accuracy"]["mean"]
    )
    data = result.to_json()
    assert set(data) >= {"before", "initial", "after", "bound", "heldout_ids"}
    assert "vectors" not in data
    assert data["accuracy_before"] == result.before["accuracy"]["mean"]
    assert data["p_true_after"] == result.after["prob_renorm"]["mean"]


def test_unbounded_would_exceed_the_bound(tiny_llama, facts):
    """The bound test above can fail: without a tight bound the same run leaves the ball."""
    tight = SoftPromptConfig(n_tokens=2, steps=5, lr=0.3, max_norm=0.5, batch_size=4)
    loose = tight.model_copy(update={"max_norm": 1e6})
    a = soft_prompt_attack(tiny_llama, facts, tight, progress=False)
    b = soft_prompt_attack(tiny_llama, facts, loose, progress=False)
    assert max(b.vector_norms) > a.bound
