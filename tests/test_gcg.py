"""The universal GCG suffix attack: the one-hot gradient is the gradient of the loss through an
explicit one-hot input, a step moves to the best candidate, every request is scored with a
suffix optimised on other requests, and the measurement runs in the LAT pipeline by name."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch

from mechunlearn.attacks.gcg import (
    GCGConfig,
    _losses,
    _mean_logprobs,
    _preference,
    _request,
    gcg_attack,
    optimise_suffix,
    suffix_gradient,
)
from mechunlearn.errors import ConfigError, DataError
from mechunlearn.evals.refusal import refusal_rate
from mechunlearn.experiments.lat_config import LatEvaluation
from mechunlearn.experiments.measurements import MEASUREMENTS, plan
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.refusal import load_refusal_task, to_lat_data
from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer
from tests.test_refusal import CHAT_TEMPLATE


@pytest.fixture(scope="module")
def items():
    return load_refusal_task().harmful["test"][:6]


def chat_model(family: str) -> HookedModel:
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = CHAT_TEMPLATE
    return HookedModel(tiny_model(family), tok)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_candidate_losses_with_the_shared_head_cached_equal_plain_forwards(family, items):
    """``_losses`` runs each request's prompt head once into a KV cache; every candidate's
    loss must equal the plain left-padded forward of its whole sequence."""
    hm = chat_model(family)
    requests = [_request(hm, it, 4) for it in items[:3]]
    rng = random.Random(0)
    suffixes = [[rng.randrange(5, 200) for _ in range(5)] for _ in range(7)]
    suffixes[1] = suffixes[0][:4] + [suffixes[0][4] + 1]  # shares all but the last suffix token
    plain = torch.stack(
        [
            -_mean_logprobs(hm, [r.head + s + r.tail for s in suffixes], [r.target] * 7, 16)
            for r in requests
        ],
        dim=1,
    ).mean(1)
    cached = _losses(hm, requests, suffixes, batch_size=3)  # chunks of 3, 3 and 1 rows
    torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-5)
    assert len(set(cached.tolist())) > 1  # the candidates really differ


def test_suffix_sits_inside_the_user_turn(items):
    hm = chat_model("llama")
    request = _request(hm, items[0], target_words=3)
    text = hm.tokenizer.decode(request.head + [7, 8] + request.tail)
    assert text.index(items[0].request) < text.index("<|assistant|>")
    assert hm.tokenizer.decode(request.tail).startswith("\n<|assistant|>")
    assert len(hm.tokenizer.decode(request.target).split()) == 3


def test_one_hot_gradient_matches_an_explicit_one_hot_input(tiny_llama, items):
    """g[i, v] = dL/de_i . W_E[v] is the gradient of the loss through one_hot @ W_E (Llama
    has no embedding scale)."""
    hm = tiny_llama
    requests = [_request(hm, it, 4) for it in items[:3]]
    suffix = torch.tensor([5, 9, 11])
    loss, grad = suffix_gradient(hm, requests, suffix)
    weight = hm.model.get_input_embeddings().weight.detach()
    one_hot = torch.nn.functional.one_hot(suffix, weight.shape[0]).float().requires_grad_(True)
    total = 0.0
    for r in requests:
        prompt = r.head + suffix.tolist() + r.tail
        ids = torch.tensor([prompt + r.target])
        embeds = weight[ids[0]].clone()
        embeds[len(r.head) : len(r.head) + 3] = one_hot @ weight
        logits = hm.model(inputs_embeds=embeds[None]).logits[0].float()
        picked = logits[len(prompt) - 1 : -1].log_softmax(-1)
        total = total - picked.gather(1, torch.tensor(r.target)[:, None]).mean()
    (total / len(requests)).backward()
    assert loss == pytest.approx(float(total.detach()) / len(requests), rel=1e-4)
    torch.testing.assert_close(grad, one_hot.grad, rtol=1e-3, atol=1e-5)
    # the batched candidate loss is the same quantity
    assert float(_losses(hm, requests, [suffix.tolist()], 2)[0]) == pytest.approx(loss, rel=1e-4)


def test_a_step_moves_to_the_best_candidate_and_keeps_the_best_suffix(tiny_llama, items):
    hm = tiny_llama
    requests = [_request(hm, it, 4) for it in items[:2]]
    config = GCGConfig(suffix_tokens=4, steps=3, top_k=8, candidates=6)
    suffix, curve = optimise_suffix(hm, requests, config, random.Random(0))
    assert len(curve) == 4 and curve == sorted(curve, reverse=True)
    assert curve[-1] == pytest.approx(float(_losses(hm, requests, [suffix], 4)[0]), rel=1e-5)
    assert curve[-1] < curve[0]  # a random tiny model is easy to push around
    again, same = optimise_suffix(hm, requests, config, random.Random(0))
    assert (again, same) == (suffix, curve)


def test_every_request_is_scored_with_a_suffix_optimised_on_others(tiny_llama, items):
    hm = tiny_llama
    config = GCGConfig(suffix_tokens=3, steps=2, top_k=8, candidates=4, folds=3, seed=1)
    result = gcg_attack(hm, items, config)
    scored = [i for fold in result.folds for i in fold["scored_on"]]
    assert sorted(scored) == sorted(it.id for it in items)
    for fold in result.folds:
        assert not set(fold["optimised_on"]) & set(fold["scored_on"])
        assert len(fold["suffix_ids"]) == 3 and isinstance(fold["suffix"], str)
    assert result.compliance["n"] == len(items)
    assert result.compliance["rate"] == pytest.approx(sum(m > 0 for m in result.margins) / 6)
    # without a suffix the preference test is the refusal evaluation's
    base = refusal_rate(hm, to_lat_data(hm.tokenizer, items))["refusal"]["rate"]
    assert result.baseline["rate"] == pytest.approx(1 - base)
    fold = result.folds[0]
    requests = [_request(hm, it, config.target_words) for it in items]
    ids = {it.id: i for i, it in enumerate(items)}
    again = _preference(hm, [requests[ids[i]] for i in fold["scored_on"]], fold["suffix_ids"], 4)
    assert again == pytest.approx([result.margins[ids[i]] for i in fold["scored_on"]], abs=1e-5)
    json.dumps(result.to_json())
    with pytest.raises(DataError, match="at least 3 requests"):
        gcg_attack(hm, items[:2], config)


def test_gcg_is_a_lat_measurement_configured_by_name():
    assert MEASUREMENTS.get("gcg").pipeline == "lat"
    evaluation = LatEvaluation.model_validate({"measurements": {"gcg": {"steps": 5}}})
    planned = {p.name: p for p in plan(evaluation.measurement_options("refusal"), "lat")}
    assert planned["gcg"].options.steps == 5
    with pytest.raises((ConfigError, ValueError), match="gcg"):
        LatEvaluation.model_validate({"measurements": {"gcg": {"stepz": 5}}})
