"""Reading and knocking out attention patterns of the GPT-2 tree model through the hook layer.

The toolkit's sites expose activations, not attention weights, so the pattern of layer ``L``
is recomputed from the cached ``blocks.L.resid_pre`` with the block's own modules:
``A = softmax(q k^T * scale + causal)`` with ``q, k = ln_1(resid_pre) W_{q,k}`` (GPT-2's
attention). A test checks that ``A v`` through ``c_proj`` reproduces the model's ``attn_out``.

Attention knockout (Geva et al. 2023; the reference's ``add_attention_blockout``): the weight
of a (query, key) pair is set to zero after the softmax, without renormalising, so the key
position's value simply never reaches the query in that layer. It is applied by replacing the
``blocks.L.head`` site (the per-head mixed values) with ``(A * keep) v``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch

from mechunlearn.models.handle import HookedModel


def _block(hm: HookedModel, layer: int) -> torch.nn.Module:
    adapter = hm.require_adapter()
    return hm.model.get_submodule(adapter.layer_path(layer))


def attention_from_residual(
    block: torch.nn.Module, resid_pre: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pattern ``[B, H, T, T]`` and values ``[B, H, T, d_head]`` a GPT-2 block computes
    from its input ``resid_pre``."""
    attn = block.attn
    x = block.ln_1(resid_pre)
    q, k, v = attn.c_attn(x).split(attn.split_size, dim=2)
    B, T, _ = q.shape
    H = attn.num_heads
    q, k, v = (t.view(B, T, H, -1).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)).float() * attn.scaling
    causal = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    return scores.softmax(-1).to(v.dtype), v


@contextmanager
def attention_control(
    hm: HookedModel,
    record: Iterable[int] = (),
    knockout: Mapping[int, torch.Tensor] | None = None,
) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, forward passes record the patterns of the layers in ``record``
    (yielded dict ``layer -> [B, H, T, T]``, the pattern actually used, after knockouts) and
    apply ``knockout[layer]``: a bool mask ``[B, T, T]`` (all heads) or ``[B, H, T, T]``,
    True where the (query, key) weight is zeroed."""
    record = set(record)
    knockout = dict(knockout or {})
    patterns: dict[int, torch.Tensor] = {}
    handlers = []
    for layer in sorted(record | set(knockout)):
        block = _block(hm, layer)
        stash: dict[str, torch.Tensor] = {}

        def on_resid(x: torch.Tensor, layer=layer, block=block, stash=stash) -> None:
            if layer in knockout:
                stash["x"] = x
            elif layer in record:
                with torch.no_grad():
                    patterns[layer] = attention_from_residual(block, x)[0].detach()

        handlers.append((f"blocks.{layer}.resid_pre", on_resid))
        if layer in knockout:

            def on_head(z: torch.Tensor, layer=layer, block=block, stash=stash) -> torch.Tensor:
                pattern, v = attention_from_residual(block, stash.pop("x"))
                mask = knockout[layer].to(pattern.device)
                if mask.dim() == 3:
                    mask = mask[:, None]
                pattern = pattern.masked_fill(mask, 0.0)
                if layer in record:
                    patterns[layer] = pattern.detach()
                return (pattern @ v).transpose(1, 2).to(z.dtype)

            handlers.append((f"blocks.{layer}.head", on_head))
    with hm.hooks(handlers=handlers):
        yield patterns


@torch.no_grad()
def run_patterns(
    hm: HookedModel, inputs: torch.Tensor, layers: Iterable[int] | None = None
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """One forward pass: logits and the attention patterns of ``layers`` (default all)."""
    layers = range(hm.dims.n_layers) if layers is None else layers
    with attention_control(hm, record=layers) as patterns:
        logits = hm.model(input_ids=inputs.to(hm.device)).logits
    return logits, patterns
