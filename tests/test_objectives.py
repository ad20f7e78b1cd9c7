"""Editing / unlearning objectives on the tiny llama: values, directions and batching."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from mechunlearn.edit import (
    OBJECTIVES,
    sequence_logprobs,
    token_logprobs,
    unlearn_loss_from_logprobs,
)
from mechunlearn.errors import ConfigError
from mechunlearn.models.batches import TargetBatch

PAIRS = [("Fact: Tom Brady plays the sport of", " football"), ("The", " golf course")]
RETAIN = [("Fact: Serena Williams plays the sport of", " tennis")]


def _batch(hm, pairs=PAIRS) -> TargetBatch:
    return TargetBatch.from_pairs(hm, pairs)


def _seq_logprob(hm, batch) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logprobs(hm, batch)


def _sgd_step(hm, loss, lr=0.05) -> None:
    hm.model.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in hm.model.parameters():
            if p.grad is not None:
                p.sub_(lr * p.grad)


def _loss(hm, name, batch):
    if name == "unlearn":  # the random tiny model puts every target below the default floor
        return OBJECTIVES.get(name)(hm, batch, floor=-100.0)
    if name == "grad_diff":
        return OBJECTIVES.get(name)(hm, batch, retain=_batch(hm, RETAIN))
    if name == "npo":
        return OBJECTIVES.get(name)(hm, batch, ref_logprobs=_seq_logprob(hm, batch))
    return OBJECTIVES.get(name)(hm, batch)


def test_registered_names():
    assert OBJECTIVES.names() == ["edit", "grad_diff", "gradient_ascent", "npo", "rmu", "unlearn"]


def test_unknown_objective_lists_names():
    with pytest.raises(ConfigError, match="unknown objective 'nope'.*edit.*npo.*unlearn"):
        OBJECTIVES.get("nope")


def test_target_mask_covers_continuations_under_left_padding(tiny_llama):
    hm = tiny_llama
    batch = _batch(hm)
    width = batch.input_ids.shape[1]
    for row, (prompt, cont) in enumerate(PAIRS):
        p = hm.tokenize(prompt)
        c = hm.tokenize(cont, add_special_tokens=False)
        assert len(p) + len(c) <= width
        assert batch.input_ids[row, width - len(p) - len(c) :].tolist() == p + c
        expected = [0] * (width - len(c)) + [1] * len(c)
        assert batch.target_mask[row].tolist() == expected
        assert batch.attention_mask[row].sum().item() == len(p) + len(c)
        assert batch.n_targets[row] == len(c)
    # prompts differ in length, so one row is padded
    assert batch.attention_mask[:, 0].tolist().count(0) >= 1


def test_token_logprobs_match_unpadded_full_forward(tiny_llama):
    hm = tiny_llama
    batch = _batch(hm)
    with torch.no_grad():
        lp = token_logprobs(hm, batch)
    assert lp.shape == batch.input_ids.shape
    assert (lp[batch.target_mask == 0] == 0).all()
    for row, (prompt, cont) in enumerate(PAIRS):
        p = hm.tokenize(prompt)
        c = hm.tokenize(cont, add_special_tokens=False)
        ids = torch.tensor([p + c])
        with torch.no_grad():
            full = hm.model(input_ids=ids.to(hm.device)).logits.float().log_softmax(-1)[0]
        expected = [full[len(p) - 1 + j, c[j]].item() for j in range(len(c))]
        got = lp[row, -len(c) :].tolist()
        assert got == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("name", ["edit", "unlearn", "gradient_ascent", "grad_diff", "npo"])
def test_losses_finite_scalar_with_grad(tiny_llama, name):
    loss = _loss(tiny_llama, name, _batch(tiny_llama))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in tiny_llama.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize(
    ("name", "direction"),
    [("edit", +1), ("unlearn", -1), ("gradient_ascent", -1), ("grad_diff", -1), ("npo", -1)],
)
def test_one_sgd_step_moves_target_prob(tiny_llama, name, direction):
    torch.manual_seed(0)
    hm = tiny_llama
    batch = _batch(hm)
    before = _seq_logprob(hm, batch)
    _sgd_step(hm, _loss(hm, name, batch))
    after = _seq_logprob(hm, batch)
    assert (direction * (after - before) > 0).all()


def test_unlearn_ignores_targets_below_floor_on_model(tiny_llama):
    hm = tiny_llama
    batch = _batch(hm)
    with torch.no_grad():
        lp = token_logprobs(hm, batch)
    assert (lp[batch.target_mask.bool()] < -5).all()  # random init: all below the floor
    loss = OBJECTIVES.get("unlearn")(hm, batch)
    assert loss.item() == 0.0
    loss.backward()
    assert all((p.grad is None) or (p.grad == 0).all() for p in hm.model.parameters())


def test_edit_is_mean_nll(tiny_llama):
    batch = _batch(tiny_llama)
    with torch.no_grad():
        lp = token_logprobs(tiny_llama, batch)
        loss = OBJECTIVES.get("edit")(tiny_llama, batch)
        ga = OBJECTIVES.get("gradient_ascent")(tiny_llama, batch)
    assert loss.item() == pytest.approx(-lp.sum().item() / sum(batch.n_targets), rel=1e-5)
    assert ga.item() == pytest.approx(-loss.item(), rel=1e-6)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_npo_closed_form_at_reference(tiny_llama, beta):
    batch = _batch(tiny_llama)
    ref = _seq_logprob(tiny_llama, batch)
    loss = OBJECTIVES.get("npo")(tiny_llama, batch, ref_logprobs=ref, beta=beta)
    assert loss.item() == pytest.approx((2 / beta) * math.log(2), rel=1e-5)


def test_unlearn_math_ignores_tokens_below_floor():
    logprobs = torch.tensor([[0.0, -0.5, -1.0], [0.0, -6.0, -7.0]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    loss = unlearn_loss_from_logprobs(logprobs, mask, floor=-5.0)
    expected = -(math.log(1 - math.exp(-0.5)) + math.log(1 - math.exp(-1.0))) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert (logprobs.grad[1] == 0).all()  # below the floor: no gradient
    assert (logprobs.grad[0, 0] == 0).item()  # not a target
    assert (logprobs.grad[0, 1:] > 0).all()  # lowering log p lowers the loss


def test_unlearn_math_stable_near_certainty():
    logprobs = torch.tensor([[0.0, -1e-12, -1e-3]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1]])
    loss = unlearn_loss_from_logprobs(logprobs, mask)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logprobs.grad).all()
    assert logprobs.grad[0, 2] > 0


def test_unlearn_all_below_floor_is_zero_with_graph():
    logprobs = torch.tensor([[-9.0, -8.0]], requires_grad=True)
    loss = unlearn_loss_from_logprobs(logprobs, torch.ones(1, 2))
    assert loss.item() == 0.0
    loss.backward()
    assert (logprobs.grad == 0).all()


@pytest.mark.parametrize("family", ["gemma3", "llama", "gpt2"])
def test_shared_forward_gives_each_batch_its_own_losses_and_gradients(family):
    """Forget and maintain batches (different widths and target lengths) in one joint forward:
    each term and the gradient of their sum equal the separate forwards'."""
    from mechunlearn.edit.objectives import edit_loss, shared_forward, unlearn_loss
    from mechunlearn.models.handle import HookedModel
    from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    hm = HookedModel(tiny_model(family), tiny_tokenizer(), name="tiny")
    forget = TargetBatch.from_tokens([[5, 6, 7, 8, 9], [5, 6]], [[11], [12, 13]], hm.pad_id)
    retain = TargetBatch.from_tokens([[20, 21], [22, 23, 24]], [[30], [31]], hm.pad_id)

    def step(shared: bool):
        hm.model.zero_grad()
        context = shared_forward(hm, [forget, retain]) if shared else contextlib.nullcontext()
        with context:
            terms = (unlearn_loss(hm, forget), edit_loss(hm, retain))
        sum(terms).backward()
        grads = [p.grad.clone() for p in hm.model.parameters() if p.grad is not None]
        return [t.detach() for t in terms], grads

    (separate, g_sep), (joint, g_joint) = step(False), step(True)
    for a, b in zip(separate, joint, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(g_sep) == len(g_joint) > 0
    for a, b in zip(g_sep, g_joint, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
