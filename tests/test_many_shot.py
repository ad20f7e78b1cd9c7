"""Many-shot jailbreaking: earlier compliant turns on OTHER requests in the same conversation,
scored by the preference test; multi-turn chat formatting; the LAT measurement by name."""

from __future__ import annotations

import json

import pytest

from mechunlearn.attacks.many_shot import ManyShotConfig, many_shot_attack, many_shot_examples
from mechunlearn.errors import DataError
from mechunlearn.evals.refusal import refusal_rate, score_pairs
from mechunlearn.experiments.lat_config import LatEvaluation
from mechunlearn.experiments.measurements import MEASUREMENTS, plan
from mechunlearn.tasks.refusal import format_prompt, load_refusal_task, to_lat_data
from tests.test_refusal import chat_tokenizer


@pytest.fixture(scope="module")
def items():
    return load_refusal_task().harmful["test"][:6]


def test_history_turns_precede_the_request_in_both_formats(tiny_llama, items):
    plain = format_prompt(tiny_llama.tokenizer, "Q?", history=[("A?", "yes"), ("B?", "no")])
    assert plain == "User: A?\nAssistant: yes\nUser: B?\nAssistant: no\nUser: Q?\nAssistant:"
    assert format_prompt(tiny_llama.tokenizer, "Q?", history=[]) == format_prompt(
        tiny_llama.tokenizer, "Q?"
    )
    chat = format_prompt(chat_tokenizer(), "Q?", history=[("A?", "yes")])
    assert chat.index("<|user|>\nA?") < chat.index("<|assistant|>\nyes") < chat.index("Q?")
    assert chat.endswith("<|assistant|>\n")


def test_shots_are_other_requests_with_their_compliant_answers(tiny_llama, items):
    data, shots = many_shot_examples(tiny_llama.tokenizer, items, ManyShotConfig(shots=3))
    for i, (example, chosen) in enumerate(zip(data.examples, shots, strict=True)):
        assert len(chosen) == 3 and i not in chosen
        for j in chosen:
            assert items[j].request in example.prompt and items[j].unwanted in example.prompt
        assert items[i].unwanted not in example.prompt  # never its own answer
        assert example.prompt.endswith(format_prompt(tiny_llama.tokenizer, items[i].request))
    with pytest.raises(DataError, match="at least 7 requests"):
        many_shot_examples(tiny_llama.tokenizer, items, ManyShotConfig(shots=6))


def test_attack_scores_the_preference_after_the_shots(tiny_llama, items):
    config = ManyShotConfig(shots=2, seed=3)
    result = many_shot_attack(tiny_llama, items, config)
    data, _ = many_shot_examples(tiny_llama.tokenizer, items, config)
    scores = score_pairs(tiny_llama, data, 4)
    hand = [u - d for d, u in zip(scores.desired_mean, scores.unwanted_mean, strict=True)]
    assert result.margins == pytest.approx(hand, abs=1e-5)
    assert result.compliance["rate"] == pytest.approx(sum(m > 0 for m in hand) / len(hand))
    base = refusal_rate(tiny_llama, to_lat_data(tiny_llama.tokenizer, items))["refusal"]["rate"]
    assert result.baseline["rate"] == pytest.approx(1 - base)
    json.dumps(result.to_json())


def test_many_shot_is_a_lat_measurement_configured_by_name():
    assert MEASUREMENTS.get("many_shot").pipeline == "lat"
    evaluation = LatEvaluation.model_validate({"measurements": {"many_shot": {"shots": 4}}})
    planned = {p.name: p for p in plan(evaluation.measurement_options("refusal"), "lat")}
    assert planned["many_shot"].options.shots == 4
