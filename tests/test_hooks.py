"""Parity tests of the hook layer against plain HF forwards, on every supported family."""

from __future__ import annotations

import pytest
import torch

from mechunlearn.errors import SiteError
from mechunlearn.models import (
    Apply,
    MeanAblate,
    Patch,
    Perturb,
    ZeroAblate,
    all_sites,
    compute_means,
    head_contributions,
    position_mask,
)
from mechunlearn.models.adapters import output_projection

TEXTS = ["Fact: LeBron James plays the sport of", "The river flows past the old mill."]


def batch_of(hm):
    return hm.batch(TEXTS).model_inputs()


def forward(hm, inputs, **kw):
    with torch.no_grad():
        return hm.model(**inputs, **kw)


def test_idle_hooks_bit_identical(tiny):
    inputs = batch_of(tiny)
    plain = forward(tiny, inputs).logits
    with tiny.hooks(cache=True):
        hooked_logits = forward(tiny, inputs).logits
    with tiny.hooks(
        handlers=[
            (s, lambda a: None)
            for s in all_sites(tiny.dims.n_layers)
            if s.kind != "resid_mid" or not tiny.adapter.parallel_residual
        ]
    ):
        idle = forward(tiny, inputs).logits
    assert torch.equal(plain, hooked_logits)
    assert torch.equal(plain, idle)


def test_resid_post_matches_hidden_states(tiny):
    inputs = batch_of(tiny)
    with tiny.hooks(cache=["resid_post", "resid_pre", "final_norm", "unembed"]) as cache:
        out = forward(tiny, inputs, output_hidden_states=True)
    hidden = out.hidden_states
    n = tiny.dims.n_layers
    assert torch.equal(cache["blocks.0.resid_pre"], hidden[0])
    for layer in range(n - 1):
        assert torch.equal(cache[f"blocks.{layer}.resid_post"], hidden[layer + 1])
    # HF replaces the last hidden state by the final-norm output in some families
    assert torch.equal(cache[f"blocks.{n - 1}.resid_post"], hidden[n]) or torch.equal(
        cache["final_norm"], hidden[n]
    )
    assert torch.equal(cache["unembed"], out.logits)


def test_residual_decomposition(tiny):
    inputs = batch_of(tiny)
    with tiny.hooks(cache=True) as cache:
        forward(tiny, inputs)
    for layer in range(tiny.dims.n_layers):
        pre = cache[f"blocks.{layer}.resid_pre"]
        attn, mlp = cache[f"blocks.{layer}.attn_out"], cache[f"blocks.{layer}.mlp_out"]
        post = cache[f"blocks.{layer}.resid_post"]
        if tiny.adapter.parallel_residual:
            torch.testing.assert_close(post, pre + attn + mlp, atol=1e-5, rtol=1e-5)
        else:
            mid = cache[f"blocks.{layer}.resid_mid"]
            torch.testing.assert_close(mid, pre + attn, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(post, mid + mlp, atol=1e-5, rtol=1e-5)


def test_heads_sum_to_attn_out(tiny):
    inputs = batch_of(tiny)
    with tiny.hooks(cache=["head", "attn_out"]) as cache:
        forward(tiny, inputs)
    for layer in range(tiny.dims.n_layers):
        z = cache[f"blocks.{layer}.head"]
        assert z.shape[-2:] == (tiny.dims.n_heads, tiny.dims.d_head)
        heads = head_contributions(tiny.model, tiny.adapter, layer, z)
        _, bias = output_projection(tiny.model, tiny.adapter, layer)
        total = heads.sum(2) + (0 if bias is None else bias)
        torch.testing.assert_close(total, cache[f"blocks.{layer}.attn_out"], atol=1e-5, rtol=1e-4)


def test_patch_clean_into_clean_changes_nothing(tiny):
    inputs = batch_of(tiny)
    with tiny.hooks(cache=True) as clean:
        reference = forward(tiny, inputs).logits
    patches = [Patch(name, value) for name, value in clean.items() if name not in ("unembed",)]
    with tiny.hooks(patches):
        patched = forward(tiny, inputs).logits
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=1e-5)


def test_batched_patch_equals_one_forward_per_patch(tiny):
    """Each batch row gets a different (layer-1 resid_pre, position) patch from a donor prompt."""
    source = tiny.batch([TEXTS[0]])
    donor = tiny.batch(["The river flows past the old mill and on to"])
    width = source.input_ids.shape[1]
    with tiny.hooks(cache=["blocks.1.resid_pre"]) as donor_cache:
        forward(tiny, donor.model_inputs())
    donor_act = donor_cache["blocks.1.resid_pre"][:, -width:]
    positions = [1, 3, width - 1]
    rows = len(positions)
    repeated = {k: v.repeat(rows, 1) for k, v in source.model_inputs().items()}
    mask = position_mask(rows, width, [[p] for p in positions])
    with tiny.hooks([Patch("blocks.1.resid_pre", donor_act, mask)]):
        batched = forward(tiny, repeated).logits
    for row, pos in enumerate(positions):
        with tiny.hooks([Patch("blocks.1.resid_pre", donor_act, position_mask(1, width, [pos]))]):
            single = forward(tiny, source.model_inputs()).logits
        torch.testing.assert_close(batched[row], single[0], atol=1e-5, rtol=1e-5)


def test_head_patch_only_changes_that_head(tiny):
    inputs = batch_of(tiny)
    with tiny.hooks(
        [
            ZeroAblate(
                "blocks.0.head",
                mask=torch.tensor([[[False, True, False, False]]])
                .expand(2, -1, -1)
                .repeat(1, inputs["input_ids"].shape[1], 1),
            )
        ],
        cache=["blocks.0.head"],
    ) as cache:
        forward(tiny, inputs)
    z = cache["blocks.0.head"]
    assert torch.all(z[:, :, 1] == 0)
    assert z[:, :, 0].abs().sum() > 0


def test_zero_and_mean_ablation_change_output(tiny):
    inputs = batch_of(tiny)
    reference = forward(tiny, inputs).logits
    with tiny.hooks([ZeroAblate("blocks.0.mlp_out")], cache=["blocks.0.mlp_out"]) as cache:
        zeroed = forward(tiny, inputs).logits
    assert torch.all(cache["blocks.0.mlp_out"] == 0)
    assert not torch.allclose(zeroed, reference)
    with tiny.hooks(cache=["blocks.0.mlp_out"]) as c:
        forward(tiny, inputs)
    means = compute_means([c], [inputs["attention_mask"]])
    with tiny.hooks(
        [MeanAblate("blocks.0.mlp_out", means["blocks.0.mlp_out"])], cache=["blocks.0.mlp_out"]
    ) as cache:
        forward(tiny, inputs)
    torch.testing.assert_close(cache["blocks.0.mlp_out"][0, 0], means["blocks.0.mlp_out"])


def test_resid_mid_write_sets_resid_mid(tiny):
    if tiny.adapter.parallel_residual:
        with pytest.raises(SiteError, match="resid_mid"):
            with tiny.hooks([ZeroAblate("blocks.0.resid_mid")]):
                pass
        return
    inputs = batch_of(tiny)
    target = torch.randn(tiny.dims.d_model, device=tiny.device)
    with tiny.hooks([Patch("blocks.1.resid_mid", target)], cache=["blocks.1.resid_mid"]) as cache:
        forward(tiny, inputs)
    torch.testing.assert_close(
        cache["blocks.1.resid_mid"],
        target.expand_as(cache["blocks.1.resid_mid"]),
        atol=1e-5,
        rtol=1e-5,
    )


def test_perturbation_is_differentiable(tiny):
    inputs = batch_of(tiny)
    delta = torch.zeros(tiny.dims.d_model, requires_grad=True)
    with tiny.hooks([Perturb("blocks.1.resid_pre", delta)]):
        out = tiny.model(**inputs)
    out.logits[:, -1, 5].sum().backward()
    assert delta.grad is not None and delta.grad.abs().sum() > 0


def test_perturb_equals_apply_add(tiny):
    inputs = batch_of(tiny)
    delta = 0.5 * torch.randn(tiny.dims.d_model, device=tiny.device)
    with tiny.hooks([Perturb("blocks.0.resid_post", delta)]):
        a = forward(tiny, inputs).logits
    with tiny.hooks([Apply("blocks.0.resid_post", lambda x: x + delta)]):
        b = forward(tiny, inputs).logits
    assert torch.equal(a, b)


def test_cache_with_grad_keeps_graph(tiny_llama):
    inputs = batch_of(tiny_llama)
    with tiny_llama.hooks(cache=["blocks.1.mlp_out"], detach=False) as cache:
        out = tiny_llama.model(**inputs)
    act = cache["blocks.1.mlp_out"]
    assert act.requires_grad
    grad = torch.autograd.grad(out.logits[:, -1].sum(), act)[0]
    assert grad.shape == act.shape


def test_bad_sites_raise(tiny_llama):
    for bad in ["blocks.99.resid_pre", "blocks.0.nonsense", "resid_pre", "blocks.x.mlp_out"]:
        with pytest.raises(SiteError):
            with tiny_llama.hooks([ZeroAblate(bad)]):
                pass
    with pytest.raises(SiteError):
        Patch("blocks.0.mlp_out", 0.0, mode="multiply")


def test_left_padding_matches_unpadded(tiny):
    """Rows padded on the left give the same last-token logits as the row alone."""
    batch = tiny.batch(TEXTS)
    together = forward(tiny, batch.model_inputs()).logits[:, -1]
    for row, text in enumerate(TEXTS):
        alone = forward(tiny, tiny.batch([text]).model_inputs()).logits[0, -1]
        torch.testing.assert_close(together[row], alone, atol=1e-4, rtol=1e-4)


def test_cache_names_filter(tiny_llama):
    inputs = batch_of(tiny_llama)
    with tiny_llama.hooks(cache=["resid_post", "blocks.0.mlp_hidden"]) as cache:
        forward(tiny_llama, inputs)
    assert set(cache) == {f"blocks.{i}.resid_post" for i in range(3)} | {"blocks.0.mlp_hidden"}
    assert cache.stack("resid_post").shape[0] == 3
    assert cache["blocks.0.mlp_hidden"].shape[-1] == tiny_llama.dims.d_mlp
    assert cache.nbytes() > 0
