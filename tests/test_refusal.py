"""Refusal task data, chat formatting, preference metrics and the prefilling attack."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from mechunlearn.attacks.prefill import (
    DEFAULT_RECOVERY,
    PrefillConfig,
    prefill_attack,
    prefill_examples,
    split_prefill,
)
from mechunlearn.errors import ConfigError, DataError
from mechunlearn.evals.refusal import (
    benign_compliance,
    benign_loss,
    is_refusal,
    rate_summary,
    refusal_rate,
    score_pairs,
)
from mechunlearn.tasks.preference import LatExample
from mechunlearn.tasks.refusal import (
    ChatItem,
    desired_pairs,
    format_completion,
    format_prompt,
    load_preference_items,
    load_refusal_file,
    load_refusal_task,
    refusal_items,
    refusal_templates,
    split_items,
    to_lat_data,
)
from mechunlearn.testing.tiny_models import tiny_tokenizer

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_tokenizer():
    tok = copy.deepcopy(tiny_tokenizer())  # the shared one is cached: never modify it
    tok.chat_template = CHAT_TEMPLATE
    return tok


# ---- the templated set and its splits --------------------------------------------------------
def test_items_are_templates_times_topics_with_safe_completions():
    templates = refusal_templates()
    harmful, benign = refusal_items("harmful"), refusal_items("benign")
    n_topics = len({it.topic for it in harmful})
    assert len(harmful) == len(templates) * n_topics >= 200
    assert len({it.id for it in harmful}) == len(harmful)
    assert len({it.request for it in harmful}) == len(harmful)
    for it in harmful:
        assert it.request == it.template.format(topic=it.topic)
        assert it.unwanted == f"Sure, here is how to {it.topic}:"  # an opening, nothing more
        assert is_refusal(it.desired)
    for it in benign:
        assert it.desired.startswith(f"Sure, here is how to {it.topic}: ")
        assert is_refusal(it.unwanted) and not is_refusal(it.desired)
    assert not {it.topic for it in harmful} & {it.topic for it in benign}
    with pytest.raises(ConfigError, match="unknown request kind"):
        refusal_items("neutral")


def test_split_is_deterministic_and_disjoint_by_template():
    a, b = load_refusal_task(seed=3), load_refusal_task(seed=3)
    assert a == b
    for items in (a.harmful, a.benign):
        groups = {name: {it.template for it in part} for name, part in items.items()}
        assert all(groups.values())
        assert not groups["train"] & groups["validation"]
        assert not groups["train"] & groups["test"]
        assert not groups["validation"] & groups["test"]
        assert sum(len(p) for p in items.values()) == len(refusal_items(items["train"][0].kind))
    # harmful and benign held-out parts use the same templates
    for name in ("train", "validation", "test"):
        assert {it.template for it in a.harmful[name]} == {it.template for it in a.benign[name]}
    assert a.groups("test") == sorted({it.template for it in a.harmful["test"]})
    others = [load_refusal_task(seed=s).groups("test") for s in range(4, 10)]
    assert any(g != a.groups("test") for g in others)  # the seed matters


def test_split_by_topic_and_bad_settings():
    parts = split_items(refusal_items("harmful"), seed=1, by="topic")
    topics = {name: {it.topic for it in part} for name, part in parts.items()}
    assert not topics["train"] & topics["test"] and not topics["validation"] & topics["test"]
    with pytest.raises(ConfigError, match="fractions"):
        split_items(refusal_items("harmful"), fractions=(0.5, 0.5))
    with pytest.raises(ConfigError, match="split by"):
        split_items(refusal_items("harmful"), by="id")
    two = [ChatItem(f"r{i}", "d", "u", template=f"t{i % 2}") for i in range(4)]
    with pytest.raises(DataError, match="at least 3"):
        split_items(two)


# ---- chat formatting -------------------------------------------------------------------------
def test_plain_format_without_chat_template():
    tok = tiny_tokenizer()
    assert not getattr(tok, "chat_template", None)
    assert format_prompt(tok, "How do I plant tomatoes?") == (
        "User: How do I plant tomatoes?\nAssistant:"
    )
    assert format_completion(tok, "Sure.") == " Sure."
    assert format_prompt(tok, "Hi", system="Be brief.") == "Be brief.\nUser: Hi\nAssistant:"
    with pytest.raises(DataError, match="empty"):
        format_prompt(tok, "  ")


def test_chat_template_is_used_and_bos_not_doubled():
    tok = chat_tokenizer()
    prompt = format_prompt(tok, "How do I plant tomatoes?")
    assert prompt == "<|user|>\nHow do I plant tomatoes?\n<|assistant|>\n"  # template's BOS dropped
    assert format_completion(tok, "Sure.") == "Sure."
    ids = tok(prompt, add_special_tokens=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    with_system = format_prompt(tok, "Hi", system="Be brief.")
    assert with_system.startswith("<|system|>\nBe brief.\n<|user|>\nHi\n")
    data = to_lat_data(tok, refusal_items("harmful")[:2])
    assert data.examples[0].prompt.startswith("<|user|>\n")
    assert data.examples[0].unwanted.startswith("Sure, here is how to")
    assert desired_pairs(tok, refusal_items("benign")[:1])[0][1].startswith("Sure, here is")


# ---- loading real sets -----------------------------------------------------------------------
ROWS = [
    {"prompt": "Explain how to do a bad thing.", "rejected": "Sure, first you", "chosen": "No."},
    {
        "prompt": "Another bad thing?",
        "rejected": "Of course, one two three four",
        "chosen": "I can't.",
    },
]


def test_load_jsonl_and_csv(tmp_path):
    jsonl = tmp_path / "harmful.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n", encoding="utf-8")
    csv_path = tmp_path / "harmful.csv"
    csv_path.write_text(
        "prompt,rejected,chosen\n"
        + "".join(f'"{r["prompt"]}","{r["rejected"]}","{r["chosen"]}"\n' for r in ROWS),
        encoding="utf-8",
    )
    for path in (jsonl, csv_path):
        items = load_preference_items(path)
        assert [(it.request, it.desired, it.unwanted) for it in items] == [
            (r["prompt"], r["chosen"], r["rejected"]) for r in ROWS
        ]
    data = load_refusal_file(jsonl, tiny_tokenizer(), max_words=2, limit=2)
    assert data.examples[1] == LatExample(
        "User: Another bad thing?\nAssistant:", " I can't.", " Of course,"
    )
    chat = load_refusal_file(csv_path, chat_tokenizer())
    assert chat.examples[0].prompt == "<|user|>\nExplain how to do a bad thing.\n<|assistant|>\n"
    renamed = tmp_path / "renamed.jsonl"
    renamed.write_text(json.dumps({"q": "x?", "bad": "yes", "good": "no"}) + "\n")
    items = load_preference_items(renamed, prompt="q", chosen="good", rejected="bad")
    assert (items[0].desired, items[0].unwanted) == ("no", "yes")


def test_loader_errors_name_missing_columns(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "x?", "rejected": "yes"}) + "\n")
    with pytest.raises(DataError, match=r"lacks column\(s\) 'chosen' \(") as info:
        load_preference_items(path)
    assert "bad.jsonl" in str(info.value)
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("request,chosen\nx?,no\n")
    with pytest.raises(DataError, match="'prompt', 'rejected'"):
        load_preference_items(csv_path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_preference_items(empty)
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({"prompt": "x?", "rejected": "", "chosen": "no"}) + "\n")
    with pytest.raises(DataError, match="'unwanted' is missing or empty"):
        load_preference_items(blank)
    other = tmp_path / "data.parquet"
    other.write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        load_preference_items(other)
    with pytest.raises(DataError, match="not found"):
        load_preference_items(tmp_path / "missing.jsonl")


# ---- metrics ---------------------------------------------------------------------------------
def _by_hand(hm, prompt: str, completion: str) -> tuple[float, int, int]:
    """(mean token log-prob, tokens, leading greedy tokens) from one unpadded forward."""
    p = hm.tokenize(prompt)
    c = hm.tokenize(completion, add_special_tokens=False)
    with torch.no_grad():
        logits = hm.model(input_ids=torch.tensor([p + c], device=hm.device)).logits[0].double()
    logp = logits.log_softmax(-1)
    picked = [float(logp[len(p) - 1 + i, tok]) for i, tok in enumerate(c)]
    greedy = 0
    for i, tok in enumerate(c):
        if int(logits[len(p) - 1 + i].argmax()) != tok:
            break
        greedy += 1
    return sum(picked) / len(c), len(c), greedy


def test_rate_summary_by_hand():
    s = rate_summary([True, True, False, True])
    assert s["rate"] == 0.75 and s["n"] == 4
    assert s["sem"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))  # = 0.25
    assert s["sem"] == pytest.approx(0.25)
    assert math.isnan(rate_summary([True])["sem"])


def test_scores_and_rates_match_hand_computation(tiny_llama):
    hm = tiny_llama
    items = load_refusal_task().harmful["test"][:5]
    data = to_lat_data(hm.tokenizer, items)
    scores = score_pairs(hm, data, batch_size=2)  # padded batches of unequal length
    hand = [
        (_by_hand(hm, e.prompt, e.desired), _by_hand(hm, e.prompt, e.unwanted))
        for e in data.examples
    ]
    for i, (d, u) in enumerate(hand):
        assert scores.desired_mean[i] == pytest.approx(d[0], abs=1e-4)
        assert scores.unwanted_mean[i] == pytest.approx(u[0], abs=1e-4)
        assert (scores.desired_tokens[i], scores.unwanted_tokens[i]) == (d[1], u[1])
        assert (scores.desired_greedy[i], scores.unwanted_greedy[i]) == (d[2], u[2])
    prefer = [d[0] >= u[0] for d, u in hand]
    result = refusal_rate(hm, data, batch_size=3)
    p = sum(prefer) / len(prefer)
    assert result["refusal"]["rate"] == pytest.approx(p)
    if 0 < p < 1:
        expected_sem = math.sqrt(p * (1 - p) / (len(prefer) - 1))
        assert result["refusal"]["sem"] == pytest.approx(expected_sem)
    assert result["margin"]["rate"] == pytest.approx(
        sum(d[0] - u[0] for d, u in hand) / len(hand), abs=1e-4
    )
    total = sum(d[0] * d[1] for d, _ in hand)
    assert result["refusal_loss"] == pytest.approx(-total / sum(d[1] for d, _ in hand), abs=1e-4)


def test_benign_compliance_and_loss(tiny_llama):
    hm = tiny_llama
    items = load_refusal_task().benign["test"][:4]
    data = to_lat_data(hm.tokenizer, items)
    out = benign_compliance(hm, data, generate=True, max_new_tokens=3)
    hand = [
        (_by_hand(hm, e.prompt, e.desired), _by_hand(hm, e.prompt, e.unwanted))
        for e in data.examples
    ]
    assert out["compliance"]["rate"] == pytest.approx(
        sum(d[0] >= u[0] for d, u in hand) / len(hand)
    )
    pairs = desired_pairs(hm.tokenizer, items)
    expected = -sum(d[0] * d[1] for d, _ in hand) / sum(d[1] for d, _ in hand)
    assert benign_loss(hm, pairs, batch_size=3) == pytest.approx(expected, abs=1e-4)
    assert out["benign_loss"] == pytest.approx(expected, abs=1e-4)
    assert len(out["generations"]) == 4 and out["generation_compliance"]["n"] == 4


def test_refusal_rate_moves_with_refusal_training(tiny_llama):
    """Training toward refusals raises the measured refusal rate on held-out templates."""
    from mechunlearn.edit.data import TrainData
    from mechunlearn.edit.parametrization import make_trainable
    from mechunlearn.edit.trainer import TrainConfig, train

    hm = tiny_llama
    task = load_refusal_task()
    test = to_lat_data(hm.tokenizer, task.harmful["test"])
    before = refusal_rate(hm, test)
    pairs = desired_pairs(hm.tokenizer, task.harmful["train"])
    trainable = make_trainable(hm, "full")
    config = TrainConfig(steps=30, lr=3e-3, batch_size=16, maintain_coef=0, lm_coef=0)
    train(hm, trainable, TrainData(forget=pairs), config, progress=False)
    trainable.restore()
    after = refusal_rate(hm, test)
    assert after["refusal_loss"] < before["refusal_loss"] - 1.0
    assert after["refusal"]["rate"] == 1.0 > before["refusal"]["rate"]


def test_is_refusal():
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I\u2019m sorry")
    assert not is_refusal("Sure, here is how to bake bread: mix flour.")


# ---- prefilling attack -----------------------------------------------------------------------
def test_split_prefill():
    assert split_prefill("Sure, here is how to do it:", 3) == ("Sure, here is", " how to do it:")
    assert split_prefill("Sure, here is how to do it:", 3, max_rest_words=2) == (
        "Sure, here is",
        " how to",
    )
    with pytest.raises(DataError, match="no words left"):
        split_prefill("Sure, here is", 3)


def test_prefill_examples_and_attack(tiny_llama):
    hm = tiny_llama
    items = load_refusal_task().harmful["test"][:4]
    data = prefill_examples(hm.tokenizer, items)
    first = data.examples[0]
    assert first.prompt == format_prompt(hm.tokenizer, items[0].request) + " Sure, here is"
    assert first.unwanted == f" how to {items[0].topic}:"
    assert first.desired == DEFAULT_RECOVERY
    chat = prefill_examples(chat_tokenizer(), items, PrefillConfig(prefill_words=2))
    assert chat.examples[0].prompt.endswith("<|assistant|>\nSure, here")

    result = prefill_attack(hm, items, PrefillConfig(generate=True, max_new_tokens=3))
    hand = [
        _by_hand(hm, e.prompt, e.unwanted)[0] - _by_hand(hm, e.prompt, e.desired)[0]
        for e in data.examples
    ]
    assert result.margins == pytest.approx(hand, abs=1e-4)
    assert result.compliance["rate"] == pytest.approx(sum(m > 0 for m in hand) / len(hand))
    base = refusal_rate(hm, to_lat_data(hm.tokenizer, items))["refusal"]["rate"]
    assert result.baseline["rate"] == pytest.approx(1 - base)
    assert result.prefills == ["Sure, here is"] * 4
    assert len(result.generations) == 4
    assert json.dumps(result.to_json())
