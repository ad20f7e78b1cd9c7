"""Component -> parameter mapping on every tiny family, and ``GradientMask`` training exactly it."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from mechunlearn.errors import SiteError
from mechunlearn.models import GradientMask, ZeroAblate, component_parameters, count_parameters

LLAMA_LIKE = ("llama", "gemma3", "gemma2")
FUSED = ("gpt2", "gpt_neox", "gpt_neox_sequential")
TIED = {
    "llama": False,
    "gemma3": True,
    "gemma2": True,
    "gpt2": True,
    "gpt_neox": False,
    "gpt_neox_sequential": False,
}
TEXTS = ["Fact: LeBron James plays the sport of", "The river flows past the old mill."]


def expected_counts(family: str, dims) -> dict[str, int]:
    """Parameter counts of layer-0 components, computed by hand from the config sizes."""
    d, nh, nkv, dh, dm = dims.d_model, dims.n_heads, dims.n_kv_heads, dims.d_head, dims.d_mlp
    if family in LLAMA_LIKE:
        qk_norm = dh if family == "gemma3" else 0  # Gemma 3 normalises q and k per head
        post_norm = d if family.startswith("gemma") else 0  # Gemma's post-attn / post-ffw norms
        counts = {
            "q": d * nh * dh + qk_norm,
            "k": d * nkv * dh + qk_norm,
            "v": d * nkv * dh,
            "o": nh * dh * d + post_norm,
            "gate": d * dm,
            "up": d * dm,
            "down": dm * d + post_norm,
        }
    else:  # fused qkv with bias; q, k and v are thirds of it
        counts = {
            "q": d * nh * dh + nh * dh,
            "k": d * nh * dh + nh * dh,
            "v": d * nh * dh + nh * dh,
            "o": nh * dh * d + d,
            "up": d * dm + dm,
            "down": dm * d + d,
        }
    counts["attn"] = sum(counts[p] for p in "qkvo")
    counts["mlp"] = sum(counts[p] for p in ("gate", "up", "down") if p in counts)
    return counts


def param_by_name(model, name):
    module, attr = name.rsplit(".", 1)
    return getattr(model.get_submodule(module), attr)


def forward(hm, **kw):
    with torch.no_grad():
        return hm.model(**hm.batch(TEXTS).model_inputs(), **kw)


@contextmanager
def zeroed(slices):
    """Temporarily set the given slices to zero."""
    saved = [s.param.detach().clone() for s in slices]
    with torch.no_grad():
        for s in slices:
            if s.whole:
                s.param.zero_()
            else:
                s.param.index_fill_(s.dim, torch.tensor(s.index, device=s.param.device), 0.0)
    try:
        yield
    finally:
        with torch.no_grad():
            for s, value in zip(slices, saved, strict=True):
                s.param.copy_(value)


# ---- mapping and counts ------------------------------------------------------------------


def test_component_counts_match_config(tiny, family):
    expected = expected_counts(family, tiny.dims)
    names = {
        "attn": "blocks.0.attn",
        **{p: f"blocks.0.attn.{p}" for p in "qkvo"},
        "mlp": "blocks.0.mlp",
        **{p: f"blocks.0.mlp.{p}" for p in ("gate", "up", "down") if p in expected},
    }
    for key, component in names.items():
        slices = tiny.parameters_of([component])
        assert count_parameters(slices) == expected[key], (family, component)
        for s in slices:  # every slice names the very parameter it holds
            assert param_by_name(tiny.model, s.name) is s.param
            assert s.name.startswith(tiny.adapter.layer_path(0) + ".")


def test_last_layer_is_addressable(tiny, family):
    last = tiny.dims.n_layers - 1
    slices = tiny.parameters_of([f"blocks.{last}.mlp"])
    assert count_parameters(slices) == expected_counts(family, tiny.dims)["mlp"]
    assert all(s.name.startswith(tiny.adapter.layer_path(last) + ".") for s in slices)


def test_embed_unembed(tiny, family):
    d, vocab = tiny.dims.d_model, tiny.dims.vocab_size
    (embed,) = tiny.parameters_of(["embed"])
    (unembed,) = tiny.parameters_of(["unembed"])
    assert embed.param is tiny.model.get_input_embeddings().weight
    assert unembed.param is tiny.model.get_output_embeddings().weight
    assert embed.numel == unembed.numel == vocab * d
    tied = embed.param is unembed.param
    assert tied == TIED[family]
    both = tiny.parameters_of(["embed", "unembed"])
    assert len(both) == (1 if tied else 2)
    assert count_parameters(both) == vocab * d * (1 if tied else 2)


def test_fused_parts_are_thirds_and_merge_to_whole(tiny, family):
    if family not in FUSED:
        pytest.skip("unfused q/k/v projections")
    d, nh, dh = tiny.dims.d_model, tiny.dims.n_heads, tiny.dims.d_head
    rows = {}
    for part in "qkv":
        slices = tiny.parameters_of([f"blocks.0.attn.{part}"])
        assert len(slices) == 2  # weight and bias of the same fused module
        weight, bias = slices
        assert weight.param.shape[weight.dim] == 3 * nh * dh
        assert len(weight.index) == len(bias.index) == nh * dh
        assert weight.index == bias.index
        rows[part] = set(weight.index)
    assert (
        rows["q"].isdisjoint(rows["k"])
        and rows["k"].isdisjoint(rows["v"])
        and rows["q"].isdisjoint(rows["v"])
    )
    assert rows["q"] | rows["k"] | rows["v"] == set(range(3 * nh * dh))
    merged = tiny.parameters_of(["blocks.0.attn.q", "blocks.0.attn.k", "blocks.0.attn.v"])
    assert len(merged) == 2 and all(s.whole for s in merged)
    assert count_parameters(merged) == 3 * (d * nh * dh + nh * dh)
    partial = tiny.parameters_of(["blocks.0.attn.q", "blocks.0.attn.k"])
    assert [len(s.index) for s in partial] == [2 * nh * dh, 2 * nh * dh]
    # overlapping components are counted once
    assert (
        count_parameters(tiny.parameters_of(["blocks.0.attn", "blocks.0.attn.q"]))
        == expected_counts(family, tiny.dims)["attn"]
    )


def test_qkv_slices_drive_q_k_v(tiny):
    """Functional check of the slicing (fused layouts included): zeroing q or k makes every
    attention score 0 (same uniform attention either way); zeroing v zeroes every head."""
    with zeroed(tiny.parameters_of(["blocks.0.attn.q"])):
        no_q = forward(tiny).logits
    with zeroed(tiny.parameters_of(["blocks.0.attn.k"])):
        no_k = forward(tiny).logits
    plain = forward(tiny).logits
    torch.testing.assert_close(no_q, no_k, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(no_q, plain, atol=1e-4)
    with (
        zeroed(tiny.parameters_of(["blocks.0.attn.v"])),
        tiny.hooks(cache=["blocks.0.head"]) as cache,
    ):
        forward(tiny)
    assert torch.count_nonzero(cache["blocks.0.head"]) == 0
    torch.testing.assert_close(forward(tiny).logits, plain)  # zeroed() restored the weights


# ---- heads -------------------------------------------------------------------------------


def test_head_slices(tiny, family):
    if family not in LLAMA_LIKE:
        with pytest.raises(SiteError, match=r"per-head .* not implemented"):
            tiny.parameters_of(["blocks.0.attn.head1"])
        return
    dims = tiny.dims
    dh, d = dims.d_head, dims.d_model
    for head in range(dims.n_heads):
        slices = {
            s.name.rsplit(".", 2)[-2]: s for s in tiny.parameters_of([f"blocks.0.attn.head{head}"])
        }
        assert set(slices) == {"q_proj", "k_proj", "v_proj", "o_proj"}
        kv = head // (dims.n_heads // dims.n_kv_heads)  # grouped-query sharing, as in repeat_kv
        assert slices["q_proj"].dim == 0 and slices["q_proj"].index == tuple(
            range(head * dh, (head + 1) * dh)
        )
        for name in ("k_proj", "v_proj"):
            assert slices[name].dim == 0 and slices[name].index == tuple(
                range(kv * dh, (kv + 1) * dh)
            )
        assert slices["o_proj"].dim == 1 and slices["o_proj"].index == tuple(
            range(head * dh, (head + 1) * dh)
        )
        assert count_parameters(slices.values()) == 4 * dh * d
    every_head = tiny.parameters_of([f"blocks.0.attn.head{h}" for h in range(dims.n_heads)])
    assert (
        count_parameters(every_head) == expected_counts("llama", dims)["attn"]
    )  # no norms in heads
    with pytest.raises(SiteError, match=f"head {dims.n_heads} out of range"):
        tiny.parameters_of([f"blocks.0.attn.head{dims.n_heads}"])
    with pytest.raises(SiteError, match="heads belong to attention"):
        tiny.parameters_of(["blocks.0.mlp.head1"])


def test_head_o_columns_match_head_ablation(tiny_llama):
    """Zeroing head 1's o_proj columns equals zero-ablating head 1 at the ``head`` site."""
    hm = tiny_llama
    o_cols = [s for s in hm.parameters_of(["blocks.0.attn.head1"]) if s.dim == 1]
    with zeroed(o_cols):
        by_weights = forward(hm).logits
    batch = hm.batch(TEXTS)
    mask = torch.zeros(*batch.input_ids.shape, hm.dims.n_heads, dtype=torch.bool)
    mask[..., 1] = True
    with hm.hooks([ZeroAblate("blocks.0.head", mask=mask)]):
        by_hook = forward(hm).logits
    torch.testing.assert_close(by_weights, by_hook, atol=1e-5, rtol=1e-5)


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "blocks.x.attn",
        "block.0.attn",
        "blocks.0.attn.",
        "blocks.0.resid_post",
        "blocks.0",
        "attn",
        "blocks.0.attn.Q",
        "",
    ],
)
def test_malformed_component(tiny_llama, name):
    with pytest.raises(SiteError, match="malformed component"):
        component_parameters(tiny_llama.model, tiny_llama.adapter, name)


def test_layer_out_of_range(tiny):
    n = tiny.dims.n_layers
    with pytest.raises(SiteError, match=f"layer {n} out of range.*{n} layers"):
        tiny.parameters_of([f"blocks.{n}.attn"])
    with pytest.raises(SiteError, match="out of range"):
        tiny.parameters_of([f"blocks.{n + 7}.mlp.up"])


def test_unknown_part(tiny, family):
    if family in FUSED:
        with pytest.raises(SiteError, match="has no part 'gate'"):
            tiny.parameters_of(["blocks.0.mlp.gate"])
    with pytest.raises(SiteError, match="has no part 'x'"):
        tiny.parameters_of(["blocks.0.attn.x"])
    with pytest.raises(SiteError, match="has no part 'q'"):
        tiny.parameters_of(["blocks.0.mlp.q"])


# ---- GradientMask ------------------------------------------------------------------------


def head1_loss(hm):
    batch = hm.batch(TEXTS)
    logits = hm.model(**batch.model_inputs()).logits
    return logits.float().log_softmax(-1)[:, -1].mean()


def test_gradient_mask_trains_only_head(tiny_llama):
    hm = tiny_llama
    dh = hm.dims.d_head
    hm.model.model.norm.weight.requires_grad_(False)  # a non-default flag remove() must restore
    before = {name: p.requires_grad for name, p in hm.model.named_parameters()}
    slices = hm.parameters_of(["blocks.0.attn.head1"])
    mask = GradientMask(hm.model, slices).apply()
    trainable = {id(p) for p in mask.trainable()}
    assert len(trainable) == 4
    assert all(p.requires_grad == (id(p) in trainable) for p in hm.model.parameters())
    head1_loss(hm).backward()
    attn = hm.model.model.layers[0].self_attn
    inside = {
        "q_proj": (0, slice(dh, 2 * dh)),  # head 1's query rows
        "k_proj": (0, slice(0, dh)),  # kv head 0, shared by heads 0 and 1
        "v_proj": (0, slice(0, dh)),
        "o_proj": (1, slice(dh, 2 * dh)),  # head 1's input columns
    }
    for proj, (dim, rows) in inside.items():
        grad = getattr(attn, proj).weight.grad
        assert grad is not None
        keep = torch.zeros_like(grad, dtype=torch.bool)
        if dim == 0:
            keep[rows] = True
        else:
            keep[:, rows] = True
        assert torch.count_nonzero(grad[~keep]) == 0, proj
        assert torch.count_nonzero(grad[keep]) > 0, proj
    for name, p in hm.model.named_parameters():
        if id(p) not in trainable:
            assert p.grad is None, name
    mask.remove()
    assert {name: p.requires_grad for name, p in hm.model.named_parameters()} == before
    assert not hm.model.model.norm.weight.requires_grad


def test_gradient_mask_optimizer_step_changes_only_slice(tiny_llama):
    hm = tiny_llama
    dh = hm.dims.d_head
    snapshot = {name: p.detach().clone() for name, p in hm.model.named_parameters()}
    with GradientMask(hm.model, hm.parameters_of(["blocks.0.attn.head1"])) as mask:
        optimizer = torch.optim.AdamW(mask.trainable(), lr=1e-2, weight_decay=0.0)
        head1_loss(hm).backward()
        optimizer.step()
    assert all(p.requires_grad for p in hm.model.parameters())  # restored on exit
    q_name = "model.layers.0.self_attn.q_proj.weight"
    o_name = "model.layers.0.self_attn.o_proj.weight"
    for name, p in hm.model.named_parameters():
        changed = p.detach() != snapshot[name]
        if name == q_name:
            assert changed[dh : 2 * dh].any()
            assert not changed[:dh].any() and not changed[2 * dh :].any()
        elif name == o_name:
            assert changed[:, dh : 2 * dh].any()
            assert not changed[:, :dh].any() and not changed[:, 2 * dh :].any()
        elif name.endswith(("k_proj.weight", "v_proj.weight")) and ".layers.0." in name:
            assert changed[:dh].any() and not changed[dh:].any()
        else:
            assert not changed.any(), name


def test_gradient_mask_fused_gpt2_q_only():
    from mechunlearn.models.handle import HookedModel
    from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

    hm = HookedModel(tiny_model("gpt2"), tiny_tokenizer())
    d_q = hm.dims.n_heads * hm.dims.d_head
    with GradientMask(hm.model, hm.parameters_of(["blocks.0.attn.q"])):
        head1_loss(hm).backward()
    c_attn = hm.model.transformer.h[0].attn.c_attn
    assert torch.count_nonzero(c_attn.weight.grad[:, d_q:]) == 0  # Conv1D: [in, out] columns
    assert torch.count_nonzero(c_attn.weight.grad[:, :d_q]) > 0
    assert torch.count_nonzero(c_attn.bias.grad[d_q:]) == 0
    assert torch.count_nonzero(c_attn.bias.grad[:d_q]) > 0
    assert hm.model.transformer.h[0].attn.c_proj.weight.grad is None
