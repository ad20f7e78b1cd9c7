"""Architecture adapters: canonical sites and components -> modules of a plain HF model.

Like TransformerLens's architecture adapters and pyvene's model mappings, one small table per
family tells where each canonical site lives, so hooks, localization and trainers never mention
``model.layers`` or ``transformer.h``. Families: Llama (also Mistral, Qwen2/3, SmolLM), Gemma
2/3 (post-norms), GPT-2, GPT-NeoX (parallel or sequential residual).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mechunlearn.errors import SiteError
from mechunlearn.models.sites import Site


@dataclass(frozen=True)
class HookPoint:
    """Where a site is read: a module's first input or its output (first tuple element)."""

    module: str
    where: str  # "input" | "output"


@dataclass(frozen=True)
class ParamSpec:
    """A trainable piece of a component: a parameter, optionally only some rows or columns.

    ``part`` slices fused matrices (GPT-2's ``c_attn``, NeoX's ``query_key_value``): a
    ``(dim, kind)`` pair resolved against the config by the adapter.
    """

    module: str
    attr: str = "weight"
    part: tuple[int, str] | None = None


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module paths of one architecture family (relative paths use ``{L}`` for the layer)."""

    family: str
    layers: str
    embed: str
    final_norm: str
    unembed: str
    layer_points: dict[str, HookPoint]
    attn_parts: dict[str, tuple[ParamSpec, ...]]
    mlp_parts: dict[str, tuple[ParamSpec, ...]]
    o_proj: str
    o_proj_transposed: bool = False  # Conv1D stores [in, out]
    post_attn_norm: str | None = None  # Gemma: attn_out is a norm of the o_proj output
    parallel_residual: bool = False
    extra_attn_params: tuple[ParamSpec, ...] = field(default_factory=tuple)
    # the norms through which a block's attention and MLP read the residual stream (relative
    # to the block): edge attribution patching gives each reader its own copy of its input
    attn_input_norm: str = "input_layernorm"
    mlp_input_norm: str = "post_attention_layernorm"
    # the final norm is ``gain * P(x) / sigma(x)``: ``P`` mean-centres for LayerNorm (GPT-2,
    # NeoX), not for RMSNorm; Gemma's RMSNorm gain is ``1 + weight``. Fact lookup freezes
    # ``sigma`` to read the logit difference linearly.
    final_norm_centred: bool = False
    final_norm_gain_offset: float = 0.0
    # q/k/v/o are separate matrices, so one head's rows and columns are its own parameters
    # (not in fused-qkv families)
    per_head_params: bool = False

    # ---- sites -------------------------------------------------------------------------
    def hook_point(self, site: Site) -> HookPoint:
        """The module (absolute path) and side where ``site`` is observed."""
        if site.kind == "embed":
            return HookPoint(self.embed, "output")
        if site.kind == "final_norm":
            return HookPoint(self.final_norm, "output")
        if site.kind == "unembed":  # the logits the model returns (after Gemma 2's soft-capping)
            return HookPoint("", "output")
        if site.kind == "resid_mid" and self.parallel_residual:
            raise SiteError(
                f"{self.family} with parallel attention and MLP has no resid_mid site: "
                "both sub-blocks read resid_pre"
            )
        point = self.layer_points[site.kind]
        return HookPoint(self.layer_path(site.layer, point.module), point.where)

    def layer_path(self, layer: int | None, relative: str = "") -> str:
        base = f"{self.layers}.{layer}"
        return f"{base}.{relative}" if relative else base


def _llama() -> ArchitectureAdapter:
    q = (
        ParamSpec("self_attn.q_proj"),
        ParamSpec("self_attn.q_proj", "bias"),
        ParamSpec("self_attn.q_norm"),
    )
    k = (
        ParamSpec("self_attn.k_proj"),
        ParamSpec("self_attn.k_proj", "bias"),
        ParamSpec("self_attn.k_norm"),
    )
    v = (ParamSpec("self_attn.v_proj"), ParamSpec("self_attn.v_proj", "bias"))
    o = (ParamSpec("self_attn.o_proj"), ParamSpec("self_attn.o_proj", "bias"))
    return ArchitectureAdapter(
        family="llama",
        layers="model.layers",
        embed="model.embed_tokens",
        final_norm="model.norm",
        unembed="lm_head",
        layer_points={
            "resid_pre": HookPoint("", "input"),
            "head": HookPoint("self_attn.o_proj", "input"),
            "attn_out": HookPoint("self_attn", "output"),
            "resid_mid": HookPoint("post_attention_layernorm", "input"),
            "mlp_in": HookPoint("mlp", "input"),
            "mlp_hidden": HookPoint("mlp.down_proj", "input"),
            "mlp_out": HookPoint("mlp", "output"),
            "resid_post": HookPoint("", "output"),
        },
        attn_parts={"q": q, "k": k, "v": v, "o": o},
        mlp_parts={
            "gate": (ParamSpec("mlp.gate_proj"), ParamSpec("mlp.gate_proj", "bias")),
            "up": (ParamSpec("mlp.up_proj"), ParamSpec("mlp.up_proj", "bias")),
            "down": (ParamSpec("mlp.down_proj"), ParamSpec("mlp.down_proj", "bias")),
        },
        o_proj="self_attn.o_proj",
        per_head_params=True,
    )


def _gemma() -> ArchitectureAdapter:
    base = _llama()
    points = dict(base.layer_points)
    points.update(
        attn_out=HookPoint("post_attention_layernorm", "output"),
        resid_mid=HookPoint("pre_feedforward_layernorm", "input"),
        mlp_out=HookPoint("post_feedforward_layernorm", "output"),
    )
    attn_parts = dict(base.attn_parts)
    attn_parts["o"] = (*base.attn_parts["o"], ParamSpec("post_attention_layernorm"))
    mlp_parts = dict(base.mlp_parts)
    mlp_parts["down"] = (*base.mlp_parts["down"], ParamSpec("post_feedforward_layernorm"))
    return ArchitectureAdapter(
        family="gemma",
        layers=base.layers,
        embed=base.embed,
        final_norm=base.final_norm,
        unembed=base.unembed,
        layer_points=points,
        attn_parts=attn_parts,
        mlp_parts=mlp_parts,
        o_proj=base.o_proj,
        post_attn_norm="post_attention_layernorm",
        mlp_input_norm="pre_feedforward_layernorm",
        final_norm_gain_offset=1.0,
        per_head_params=True,
    )


def _gpt2() -> ArchitectureAdapter:
    return ArchitectureAdapter(
        family="gpt2",
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        unembed="lm_head",
        layer_points={
            "resid_pre": HookPoint("", "input"),
            "head": HookPoint("attn.c_proj", "input"),
            "attn_out": HookPoint("attn", "output"),
            "resid_mid": HookPoint("ln_2", "input"),
            "mlp_in": HookPoint("mlp", "input"),
            "mlp_hidden": HookPoint("mlp.c_proj", "input"),
            "mlp_out": HookPoint("mlp", "output"),
            "resid_post": HookPoint("", "output"),
        },
        attn_parts={
            "q": (
                ParamSpec("attn.c_attn", "weight", (1, "q")),
                ParamSpec("attn.c_attn", "bias", (0, "q")),
            ),
            "k": (
                ParamSpec("attn.c_attn", "weight", (1, "k")),
                ParamSpec("attn.c_attn", "bias", (0, "k")),
            ),
            "v": (
                ParamSpec("attn.c_attn", "weight", (1, "v")),
                ParamSpec("attn.c_attn", "bias", (0, "v")),
            ),
            "o": (ParamSpec("attn.c_proj"), ParamSpec("attn.c_proj", "bias")),
        },
        mlp_parts={
            "up": (ParamSpec("mlp.c_fc"), ParamSpec("mlp.c_fc", "bias")),
            "down": (ParamSpec("mlp.c_proj"), ParamSpec("mlp.c_proj", "bias")),
        },
        o_proj="attn.c_proj",
        o_proj_transposed=True,
        attn_input_norm="ln_1",
        mlp_input_norm="ln_2",
        final_norm_centred=True,
    )


def _neox(parallel: bool) -> ArchitectureAdapter:
    fused = "attention.query_key_value"
    return ArchitectureAdapter(
        family="gpt_neox",
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        unembed="lm_head",
        layer_points={
            "resid_pre": HookPoint("", "input"),
            "head": HookPoint("attention.dense", "input"),
            "attn_out": HookPoint("post_attention_dropout", "output"),
            "resid_mid": HookPoint("post_attention_layernorm", "input"),
            "mlp_in": HookPoint("mlp", "input"),
            "mlp_hidden": HookPoint("mlp.dense_4h_to_h", "input"),
            "mlp_out": HookPoint("post_mlp_dropout", "output"),
            "resid_post": HookPoint("", "output"),
        },
        attn_parts={
            part: (
                ParamSpec(fused, "weight", (0, f"neox_{part}")),
                ParamSpec(fused, "bias", (0, f"neox_{part}")),
            )
            for part in ("q", "k", "v")
        }
        | {"o": (ParamSpec("attention.dense"), ParamSpec("attention.dense", "bias"))},
        mlp_parts={
            "up": (ParamSpec("mlp.dense_h_to_4h"), ParamSpec("mlp.dense_h_to_4h", "bias")),
            "down": (ParamSpec("mlp.dense_4h_to_h"), ParamSpec("mlp.dense_4h_to_h", "bias")),
        },
        o_proj="attention.dense",
        parallel_residual=parallel,
        final_norm_centred=True,
    )


LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2")
GEMMA_LIKE = ("gemma2", "gemma3_text")


def adapter_for(config) -> ArchitectureAdapter:
    """Pick the adapter for a Hugging Face config by its ``model_type``."""
    model_type = getattr(config, "model_type", None)
    if model_type in LLAMA_LIKE:
        return _llama()
    if model_type in GEMMA_LIKE:
        return _gemma()
    if model_type == "gpt2":
        return _gpt2()
    if model_type == "gpt_neox":
        return _neox(bool(getattr(config, "use_parallel_residual", True)))
    supported = ", ".join((*LLAMA_LIKE, *GEMMA_LIKE, "gpt2", "gpt_neox"))
    raise SiteError(
        f"no architecture adapter for model_type {model_type!r}; supported: {supported}"
    )


@dataclass(frozen=True)
class Dimensions:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    d_mlp: int
    vocab_size: int


def dimensions(config) -> Dimensions:
    """Sizes from a config, whatever the family calls them."""
    d_model = getattr(config, "hidden_size", None) or config.n_embd
    n_heads = getattr(config, "num_attention_heads", None) or config.n_head
    n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    d_head = getattr(config, "head_dim", None) or d_model // n_heads
    d_mlp = (
        getattr(config, "intermediate_size", None)
        or getattr(config, "n_inner", None)
        or 4 * d_model
    )
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    return Dimensions(n_layers, n_heads, n_kv, d_head, d_model, d_mlp, config.vocab_size)


def output_projection(
    model: nn.Module, adapter: ArchitectureAdapter, layer: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The o_proj weight as ``[n_heads * d_head, d_model]`` (input-major) and its bias."""
    module = model.get_submodule(adapter.layer_path(layer, adapter.o_proj))
    weight = module.weight if adapter.o_proj_transposed else module.weight.T
    return weight, getattr(module, "bias", None)


def head_contributions(
    model: nn.Module, adapter: ArchitectureAdapter, layer: int, z: torch.Tensor
) -> torch.Tensor:
    """Each head's contribution to ``attn_out`` at ``layer``: ``[batch, seq, n_heads, d_model]``.

    ``z`` is the cached ``head`` site ``[batch, seq, n_heads, d_head]``. For Gemma the
    post-attention RMSNorm is linearised at its actual scale (the rms of the summed output),
    so the heads still sum exactly to ``attn_out``. The o_proj bias (GPT-2, NeoX) belongs to no
    head: ``attn_out = heads.sum(2) + bias``.
    """
    weight, _ = output_projection(model, adapter, layer)
    n_heads, d_head = z.shape[-2], z.shape[-1]
    per_head_weight = weight.reshape(n_heads, d_head, -1)
    contributions = torch.einsum("bshd,hdm->bshm", z.to(weight.dtype), per_head_weight)
    if adapter.post_attn_norm is None:
        return contributions
    norm = model.get_submodule(adapter.layer_path(layer, adapter.post_attn_norm))
    total = contributions.sum(dim=2).float()
    inv_rms = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + norm.eps)
    gain = 1.0 + norm.weight.float()
    return (contributions.float() * inv_rms.unsqueeze(2) * gain).to(z.dtype)
