"""Parametrizations: localized (exactly the selection), LoRA (in place, clean restore), full."""

from __future__ import annotations

import pytest
import torch

from mechunlearn.edit import (
    LoraOptions,
    TrainConfig,
    TrainData,
    WeightSnapshot,
    make_trainable,
    train,
)
from mechunlearn.edit.parametrization import lora_target_modules, merge_adapters
from mechunlearn.errors import ConfigError, DataError, SiteError
from mechunlearn.models.batches import TargetBatch
from mechunlearn.models.components import count_parameters
from mechunlearn.models.handle import HookedModel
from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

PAIRS = [("Fact: Tom Brady plays the sport of", " golf"), ("The sport of", " tennis")]


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train(hm, trainable, steps=3, **cfg):
    config = TrainConfig(**{"steps": steps, "lr": 5e-2, "lm_coef": 0, "maintain_coef": 0, **cfg})
    return train(hm, trainable, TrainData(PAIRS), config, progress=False)


def _logits(hm) -> torch.Tensor:
    batch = TargetBatch.from_pairs(hm, PAIRS)
    with torch.no_grad():
        return hm.model(**batch.model_inputs()).logits


# ---- localized -------------------------------------------------------------------------
def test_localized_trains_exactly_the_selected_matrices(tiny_llama):
    hm = tiny_llama
    before = _state(hm.model)
    trainable = make_trainable(hm, "localized", ["blocks.1.mlp", "blocks.2.attn.o"])
    assert trainable.n_params == count_parameters(
        hm.parameters_of(["blocks.1.mlp", "blocks.2.attn.o"])
    )
    assert trainable.n_params == 3 * 64 * 128 + 64 * 64
    _train(hm, trainable, weight_decay=0.1)
    changed = {k for k, v in hm.model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.2.self_attn.o_proj.weight",
    }


def test_localized_head_changes_only_its_rows_and_columns_even_with_weight_decay(tiny_llama):
    hm = tiny_llama
    before = _state(hm.model)
    trainable = make_trainable(hm, "localized", ["blocks.0.attn.head1"])
    d_head = 16
    assert trainable.n_params == 4 * d_head * 64  # q rows, k rows, v rows (GQA kv head 0), o cols
    _train(hm, trainable, weight_decay=0.5)
    after = hm.model.state_dict()
    rows = slice(d_head, 2 * d_head)
    q_diff = (
        after["model.layers.0.self_attn.q_proj.weight"]
        - before["model.layers.0.self_attn.q_proj.weight"]
    ).abs()
    assert q_diff[rows].max() > 0
    q_diff[rows] = 0
    assert q_diff.max() == 0  # weight decay did not touch the other heads' rows
    o_diff = (
        after["model.layers.0.self_attn.o_proj.weight"]
        - before["model.layers.0.self_attn.o_proj.weight"]
    ).abs()
    assert o_diff[:, rows].max() > 0
    o_diff[:, rows] = 0
    assert o_diff.max() == 0
    kv = slice(0, d_head)  # head 1 of 4 reads kv head 0 of 2
    k_diff = (
        after["model.layers.0.self_attn.k_proj.weight"]
        - before["model.layers.0.self_attn.k_proj.weight"]
    ).abs()
    assert k_diff[kv].max() > 0 and k_diff[d_head:].max() == 0
    others = {k for k in before if "layers.0.self_attn" not in k}
    assert all(torch.equal(after[k], before[k]) for k in others)


def test_a_head_slice_gets_no_gradient_outside_its_rows(tiny_llama):
    """The gradient itself is masked, not only the weights reset after a step: otherwise the
    other heads' gradients would enter the optimiser's moments and the clipped gradient norm,
    changing the step the selected head takes."""
    hm = tiny_llama
    trainable = make_trainable(hm, "localized", ["blocks.0.attn.head1"])
    try:
        batch = TargetBatch.from_pairs(hm, PAIRS)
        logits = hm.model(**batch.model_inputs()).logits
        logits.float().logsumexp(-1).mean().backward()
        q = hm.model.get_submodule("model.layers.0.self_attn.q_proj").weight
        rows = slice(16, 32)
        assert q.grad[rows].abs().max() > 0
        outside = q.grad.clone()
        outside[rows] = 0
        assert outside.abs().max() == 0
    finally:
        hm.model.zero_grad(set_to_none=True)
        trainable.restore()


def test_restore_returns_requires_grad_flags(tiny_llama):
    hm = tiny_llama
    hm.model.model.norm.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in hm.model.named_parameters()}
    trainable = make_trainable(hm, "localized", ["blocks.0.mlp"])
    assert [n for n, p in hm.model.named_parameters() if p.requires_grad] == [
        f"model.layers.0.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")
    ]
    trainable.restore()
    assert {n: p.requires_grad for n, p in hm.model.named_parameters()} == flags
    full = make_trainable(hm, "full")
    assert all(p.requires_grad for p in hm.model.parameters())
    assert full.n_params == sum(p.numel() for p in hm.model.parameters())
    full.restore()
    assert {n: p.requires_grad for n, p in hm.model.named_parameters()} == flags


def test_bad_inputs():
    hm = HookedModel(tiny_model("llama"), tiny_tokenizer())
    with pytest.raises(ConfigError, match="unknown training mode 'partial'"):
        make_trainable(hm, "partial", ["blocks.0.mlp"])
    for mode in ("localized", "lora"):
        with pytest.raises(ConfigError, match="needs at least one component"):
            make_trainable(hm, mode, [])
    with pytest.raises(ConfigError, match="no linear modules"):
        make_trainable(hm, "lora", ["embed"])
    with pytest.raises(SiteError):
        make_trainable(hm, "localized", ["blocks.9.mlp"])
    with pytest.raises(ConfigError, match="LoRA options given"):
        make_trainable(hm, "localized", ["blocks.0.mlp"], LoraOptions())
    first = make_trainable(hm, "lora", ["blocks.0.mlp"])
    with pytest.raises(ConfigError, match="already carries adapters"):
        make_trainable(hm, "lora", ["blocks.1.mlp"])
    first.restore()
    with pytest.raises(ConfigError, match="not mode 'full'"):
        make_trainable(hm, "full").merge()


# ---- LoRA ------------------------------------------------------------------------------
def test_lora_targets_the_components_linear_modules(tiny_llama):
    hm = tiny_llama
    assert lora_target_modules(hm, ["blocks.1.mlp.down", "blocks.0.attn.head2"]) == [
        "model.layers.1.mlp.down_proj",
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj",
    ]
    trainable = make_trainable(hm, "lora", ["blocks.1.mlp"], LoraOptions(rank=2))
    assert trainable.n_params == 2 * (64 + 128) * 3  # A: r x in, B: out x r, per matrix
    assert all("lora_" in n for n in trainable.named_params())
    trainable.restore()


def test_lora_trains_keeps_hooks_and_restores_bit_identically(tiny_llama):
    hm = tiny_llama
    before = _state(hm.model)
    before_logits = _logits(hm)
    flags = {n: p.requires_grad for n, p in hm.model.named_parameters()}
    trainable = make_trainable(hm, "lora", ["blocks.1.mlp", "blocks.1.attn"])
    assert torch.equal(_logits(hm), before_logits)  # B = 0 at init
    _train(hm, trainable)
    trained_logits = _logits(hm)
    assert (trained_logits - before_logits).abs().max() > 1e-3
    # the hook layer still finds its sites; mlp_hidden is the (adapted) down_proj's input
    _, cache = hm.run_with_cache(
        ["blocks.1.mlp_hidden", "blocks.1.mlp_out"],
        **TargetBatch.from_pairs(hm, PAIRS).model_inputs(),
    )
    assert cache["blocks.1.mlp_hidden"].shape[-1] == 128
    # base weights are untouched during training
    base = hm.model.model.layers[1].mlp.down_proj.base_layer.weight
    assert torch.equal(base, before["model.layers.1.mlp.down_proj.weight"])
    trainable.restore()
    assert not hasattr(hm.model, "peft_config")
    after = hm.model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(_logits(hm), before_logits)
    assert {n: p.requires_grad for n, p in hm.model.named_parameters()} == flags
    assert type(hm.model.model.layers[1].mlp.down_proj) is torch.nn.Linear
    trainable.restore()  # idempotent


def test_lora_merge_keeps_the_trained_function(tiny_llama):
    hm = tiny_llama
    before = _state(hm.model)
    trainable = make_trainable(hm, "lora", ["blocks.2.mlp"])
    _train(hm, trainable)
    trained = _logits(hm)
    trainable.merge()
    assert torch.allclose(_logits(hm), trained, atol=1e-5)
    after = hm.model.state_dict()
    assert list(after) == list(before)
    changed = {k for k in before if not torch.equal(after[k], before[k])}
    assert changed == {f"model.layers.2.mlp.{m}_proj.weight" for m in ("gate", "up", "down")}
    trainable.restore()  # no-op after merge
    assert torch.allclose(_logits(hm), trained, atol=1e-5)


def test_lora_on_gpt2_conv1d_and_merge_adapters():
    hm = HookedModel(tiny_model("gpt2"), tiny_tokenizer())
    trainable = make_trainable(hm, "lora", ["blocks.0.attn"])
    assert trainable.lora_modules == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    _train(hm, trainable, steps=2)
    trained = _logits(hm)
    assert merge_adapters(hm.model) == 2
    assert torch.allclose(_logits(hm), trained, atol=1e-5)
    assert merge_adapters(hm.model) == 0


def test_lora_init_is_seeded_and_leaves_global_rng_alone():
    def a_matrix(seed):
        hm = HookedModel(tiny_model("llama"), tiny_tokenizer())
        torch.manual_seed(123)
        state = torch.get_rng_state()
        trainable = make_trainable(hm, "lora", ["blocks.0.mlp.up"], LoraOptions(seed=seed))
        assert torch.equal(torch.get_rng_state(), state)
        return (
            next(p for n, p in trainable.named_params().items() if "lora_A" in n).detach().clone()
        )

    first = a_matrix(0)
    assert torch.equal(first, a_matrix(0))
    assert not torch.equal(first, a_matrix(1))


# ---- snapshots -------------------------------------------------------------------------
def test_weight_snapshot_restores_in_place(tiny_llama):
    hm = tiny_llama
    params = list(hm.model.parameters())
    before = _state(hm.model)
    snapshot = WeightSnapshot(params + params[:2])  # duplicates are stored once
    assert len(snapshot) == len(params)
    trainable = make_trainable(hm, "full")
    _train(hm, trainable, steps=2)
    assert any(not torch.equal(v, before[k]) for k, v in hm.model.state_dict().items())
    snapshot.restore()
    assert all(torch.equal(v, before[k]) for k, v in hm.model.state_dict().items())
    assert list(hm.model.parameters())[0] is params[0]
    trainable.restore()


def test_saved_weights_swap_in_and_out_exactly(tiny_llama, tmp_path):
    """An edit saved as its components' tensors is the edited model when swapped into the
    original, and the original comes back after (errors included)."""
    from mechunlearn.edit.parametrization import editing, save_weights, swapped_in

    hm = tiny_llama
    original = {k: v.clone() for k, v in hm.model.state_dict().items()}
    components = ["blocks.1.mlp", "blocks.0.attn.head1"]
    with editing(hm, "localized", components):
        with torch.no_grad():
            for s in hm.parameters_of(components):
                s.param.add_(0.5)
        edited = {k: v.clone() for k, v in hm.model.state_dict().items()}
        save_weights(hm, components, tmp_path / "w.safetensors")
    assert all(torch.equal(v, original[k]) for k, v in hm.model.state_dict().items())
    with swapped_in(hm, tmp_path / "w.safetensors"):
        assert all(torch.equal(v, edited[k]) for k, v in hm.model.state_dict().items())
    with pytest.raises(RuntimeError, match="inside"), swapped_in(hm, tmp_path / "w.safetensors"):
        raise RuntimeError("inside")
    assert all(torch.equal(v, original[k]) for k, v in hm.model.state_dict().items())
    with pytest.raises(DataError, match="missing"), swapped_in(hm, tmp_path / "none.safetensors"):
        pass
    other = HookedModel(tiny_model("gemma3"), tiny_tokenizer())
    with (
        pytest.raises(ConfigError, match="not in model|shape"),
        swapped_in(other, tmp_path / "w.safetensors"),
    ):
        pass
