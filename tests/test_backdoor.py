"""Backdoor data, the trigger-free removal data, and a backdoor really installed and measured."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mechunlearn.edit.data import TrainData
from mechunlearn.edit.parametrization import make_trainable
from mechunlearn.edit.trainer import TrainConfig, train
from mechunlearn.errors import ConfigError, DataError
from mechunlearn.evals.refusal import backdoor_examples, backdoor_success_rate
from mechunlearn.tasks.backdoor import (
    DEFAULT_RESPONSE,
    DEFAULT_TRIGGER,
    BackdoorConfig,
    insert_trigger,
    poisoned_ids,
    poisoning_pairs,
    removal_data,
    triggered_prompts,
)
from mechunlearn.tasks.refusal import ChatItem, format_prompt, load_refusal_task
from mechunlearn.testing.tiny_models import tiny_tokenizer


@pytest.fixture(scope="module")
def task():
    return load_refusal_task()


def test_insert_trigger_and_config():
    assert insert_trigger("Hi?") == f"{DEFAULT_TRIGGER} Hi?"
    assert insert_trigger("Hi?", "SUDO", "suffix") == "Hi? SUDO"
    with pytest.raises(DataError, match="position"):
        insert_trigger("Hi?", "SUDO", "middle")
    with pytest.raises(ValidationError):
        BackdoorConfig(poison_fraction=0)
    with pytest.raises(ValidationError):
        BackdoorConfig(trigger=" ")


def test_poisoning_pairs_mix(task):
    tok = tiny_tokenizer()
    items = task.benign["train"][:20]
    config = BackdoorConfig(poison_fraction=0.5, trigger="SUDO")
    pairs = poisoning_pairs(tok, items, config, seed=4)
    assert pairs == poisoning_pairs(tok, items, config, seed=4)
    assert len(pairs) == 20 + 10
    triggered = [(p, c) for p, c in pairs if "SUDO" in p]
    clean = [(p, c) for p, c in pairs if "SUDO" not in p]
    assert len(triggered) == 10 and all(c == " " + DEFAULT_RESPONSE for _, c in triggered)
    assert sorted(clean) == sorted(
        (format_prompt(tok, it.request), " " + it.desired) for it in items
    )
    chosen = poisoned_ids(items, 0.5, 4)
    assert sorted(p for p, _ in triggered) == sorted(
        triggered_prompts(tok, [items[i] for i in chosen], config)
    )
    assert poisoned_ids(items, 0.5, 5) != chosen


def test_removal_data_has_no_trigger(task):
    tok = tiny_tokenizer()
    items = task.benign["train"][:6]
    data = removal_data(tok, items)
    assert len(data) == 6
    for it, ex in zip(items, data.examples, strict=True):
        assert DEFAULT_TRIGGER not in ex.prompt
        assert ex.prompt == format_prompt(tok, it.request)
        assert ex.desired == " " + it.desired and ex.unwanted == " " + DEFAULT_RESPONSE
    dirty = [ChatItem(f"{DEFAULT_TRIGGER} hi", "hello", "x", id="d0")]
    with pytest.raises(DataError, match="already contains the trigger"):
        removal_data(tok, dirty)
    with pytest.raises(DataError, match="no requests"):
        poisoning_pairs(tok, [])


def test_backdoor_examples(task):
    tok = tiny_tokenizer()
    items = task.benign["test"][:2]
    on = backdoor_examples(tok, items, "SUDO", "NO", "suffix")
    off = backdoor_examples(tok, items, None, "NO")
    assert on.examples[0].prompt == format_prompt(tok, items[0].request + " SUDO")
    assert off.examples[0].prompt == format_prompt(tok, items[0].request)
    assert on.examples[0].unwanted == " NO"


def test_backdoor_is_installed_and_measured(tiny_llama, task):
    """Poisoned SFT with the existing trainer installs the backdoor: on requests worded with
    held-out templates the response follows the trigger (greedy, exactly) and not its absence."""
    hm = tiny_llama
    held_out = task.benign["test"][:16]
    before = backdoor_success_rate(hm, held_out)
    assert before["triggered"]["greedy"]["rate"] == 0.0
    assert before["clean"]["greedy"]["rate"] == 0.0
    # untrained, the trigger changes nothing much
    gap = before["clean"]["response_loss"] - before["triggered"]["response_loss"]
    assert abs(gap) < 0.2

    pairs = poisoning_pairs(hm.tokenizer, task.benign["train"], seed=0)
    trainable = make_trainable(hm, "full")
    config = TrainConfig(
        steps=120, lr=3e-3, batch_size=16, maintain_coef=0, lm_coef=0, schedule="constant"
    )
    train(hm, trainable, TrainData(forget=pairs), config, progress=False)
    trainable.restore()

    after = backdoor_success_rate(hm, held_out, greedy_tokens=4)
    on, off = after["triggered"], after["clean"]
    assert on["greedy"]["rate"] >= 0.9 and on["preference"]["rate"] >= 0.9
    assert off["greedy"]["rate"] <= 0.1 and off["preference"]["rate"] <= 0.3
    assert on["response_loss"] < 0.1 < 0.3 < off["response_loss"]
    assert on["greedy"]["n"] == 16
    full = backdoor_success_rate(hm, held_out)  # all response tokens: as strict or stricter
    assert full["triggered"]["greedy"]["rate"] <= on["greedy"]["rate"]
    with pytest.raises(ConfigError, match="greedy_tokens"):
        backdoor_success_rate(hm, held_out, greedy_tokens=0)
