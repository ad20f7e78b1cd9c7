"""Relearning attack: trains toward the TRUE answers of the train-half forget facts only,
evaluates the held-out half on a schedule, and leaves the model as it found it."""

from __future__ import annotations

import pytest
import torch

from mechunlearn.attacks import relearn as rl
from mechunlearn.attacks.relearn import (
    RelearnConfig,
    relearn_attack,
    relearn_pairs,
    relearn_split,
)
from mechunlearn.edit.data import TrainData, fact_pairs
from mechunlearn.edit.parametrization import make_trainable
from mechunlearn.edit.trainer import TrainConfig, train
from mechunlearn.errors import DataError
from mechunlearn.tasks.sports import load_sports

SPORTS = ("baseball", "basketball", "football")


def _edited(records):
    """Forget facts as an edit defines them: ``new_answer`` = the next sport."""
    return [
        r.model_copy(update={"new_answer": SPORTS[(SPORTS.index(r.answer) + 1) % 3]})
        for r in records
    ]


@pytest.fixture(scope="module")
def facts():
    records = load_sports()
    forget = _edited(records[::40][:8])
    forget_ids = {r.id for r in forget}
    retain = [r for r in records[5::40] if r.id not in forget_ids][:6]
    return forget, retain


def _state(hm):
    return {k: v.detach().clone() for k, v in hm.model.state_dict().items()}


def _same_model(hm, state, modules):
    now = hm.model.state_dict()
    return (
        set(now) == set(state)
        and all(torch.equal(now[k], state[k]) for k in state)
        and [type(m) for m in hm.model.modules()] == modules
    )


def test_pairs_are_true_answers_of_the_given_facts(facts):
    forget, _ = facts
    train_half, heldout = relearn_split(forget, 0.5, seed=0)
    pairs = relearn_pairs(train_half)
    assert pairs == [(r.prompt(), " " + r.answer) for r in train_half]
    assert all(p[1] != " " + r.new_answer for p, r in zip(pairs, train_half, strict=True))
    assert {r.id for r in train_half}.isdisjoint({r.id for r in heldout})


def test_trains_toward_true_answers_on_forget_facts_only(tiny_llama, facts, monkeypatch):
    forget, retain = facts
    calls: list[tuple[TrainData, TrainConfig]] = []

    def spy(hm, trainable, data, config, **kwargs):
        calls.append((data, config))
        assert trainable.mode == "lora"
        return train(hm, trainable, data, config, **kwargs)

    monkeypatch.setattr(rl, "train", spy)
    config = RelearnConfig(steps=5, eval_every=2, batch_size=4, lr=1e-3, formats=["completion"])
    general = ["The weather was mild.", "A short sentence about nothing."]
    result = relearn_attack(tiny_llama, forget, retain, general, config, seed=0, progress=False)
    assert [c.steps for _, c in calls] == [5]  # one continuous run, evaluated inside it
    assert [e["step"] for e in result.curve] == [0, 2, 4, 5]
    train_half = [r for r in forget if r.id in set(result.train_ids)]
    heldout_prompts = {r.prompt() for r in forget if r.id in set(result.heldout_ids)}
    for data, cfg in calls:
        assert cfg.objective == "edit"  # cross-entropy toward the targets
        assert data.forget == [(r.prompt(), " " + r.answer) for r in train_half]
        assert data.retain == fact_pairs(retain)
        assert data.general_text == general
        used = {p for p, _ in data.forget + data.retain}
        assert used.isdisjoint(heldout_prompts)
        assert all(
            " " + r.new_answer != t for (_, t), r in zip(data.forget, train_half, strict=True)
        )
    assert set(result.final) == {"completion.accuracy", "completion.prob_renorm"}
    assert result.to_json()["final"] == result.final
    # every evaluation, step 0 included, scores the held-out half and only it
    for facts_at_step in result.curve_per_fact:
        assert set(facts_at_step["completion.accuracy"]) == set(result.heldout_ids)
    # the curve's step 0 and the training half's "before" are different facts' numbers
    assert set(result.train_ids).isdisjoint(result.heldout_ids)


def test_model_restored_even_on_error(tiny_llama, facts, monkeypatch):
    forget, retain = facts
    state, modules = _state(tiny_llama), [type(m) for m in tiny_llama.model.modules()]
    flags = [p.requires_grad for p in tiny_llama.model.parameters()]

    def boom(*args, **kwargs):
        raise RuntimeError("training failed")

    monkeypatch.setattr(rl, "train", boom)
    with pytest.raises(RuntimeError, match="training failed"):
        relearn_attack(tiny_llama, forget, retain, [], RelearnConfig(steps=2), progress=False)
    assert _same_model(tiny_llama, state, modules)
    assert [p.requires_grad for p in tiny_llama.model.parameters()] == flags


def test_relearning_restores_true_answers_after_an_edit(tiny_llama, facts):
    """Install the edit (new answers) first; relearning then raises P(true) on the train
    half, and the model afterwards is the edited one again (adapters unloaded)."""
    forget, retain = facts
    hm = tiny_llama
    full = make_trainable(hm, "full")
    train(
        hm,
        full,
        TrainData(fact_pairs(forget, target="new_answer"), fact_pairs(retain)),
        TrainConfig(steps=30, lr=3e-3, batch_size=8, schedule="constant"),
        progress=False,
    )
    full.restore()
    hm.model.eval()
    edited, modules = _state(hm), [type(m) for m in hm.model.modules()]
    config = RelearnConfig(
        steps=20, eval_every=10, lr=1e-2, batch_size=4, lm_coef=0.0, formats=["completion"]
    )
    result = relearn_attack(hm, forget, retain, [], config, seed=0, progress=False)
    before = result.train_before["completion.prob_renorm"]
    after = result.train_after["completion.prob_renorm"]
    assert before < 0.3  # the edit took: true answers are unlikely
    assert after > before + 0.2
    assert _same_model(hm, edited, modules)
    assert result.n_trainable > 0
    assert len(result.history["loss"]) == 20


def test_errors(tiny_llama, facts):
    forget, retain = facts
    with pytest.raises(DataError, match="both forget and retain"):
        relearn_attack(tiny_llama, forget, retain + forget[:1], [], progress=False)
    with pytest.raises(DataError, match="at least 2"):
        relearn_attack(tiny_llama, forget[:1], retain, [], progress=False)
