"""Components -> the parameters that implement them, so trainers can train exactly a chosen set.

Component names:

- ``blocks.{L}.attn`` (q, k, v, o), ``blocks.{L}.attn.q`` / ``.k`` / ``.v`` / ``.o``;
- ``blocks.{L}.attn.head{H}``: head H's slices of q, k, v and o (k/v shared under GQA are
  attributed to every head that reads them and counted once per matrix slice);
- ``blocks.{L}.mlp`` and its parts ``.gate`` / ``.up`` / ``.down`` (GPT-2 / NeoX have no gate);
- ``embed`` and ``unembed`` (the same tensor when embeddings are tied).

A ``ParamSlice`` is a parameter plus an optional index along one dimension, used for fused
matrices (GPT-2's ``c_attn``) and heads. ``GradientMask`` trains exactly those slices.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from mechunlearn.errors import SiteError
from mechunlearn.models.adapters import ArchitectureAdapter, Dimensions, ParamSpec, dimensions

_COMPONENT_RE = re.compile(r"^blocks\.(\d+)\.(attn|mlp)(?:\.(head(\d+)|[a-z]+))?$")


@dataclass(frozen=True)
class ParamSlice:
    """A parameter, or the rows/columns ``index`` along ``dim`` of it."""

    name: str
    param: nn.Parameter
    dim: int | None = None
    index: tuple[int, ...] | None = None

    @property
    def numel(self) -> int:
        if self.index is None:
            return self.param.numel()
        return self.param.numel() // self.param.shape[self.dim] * len(self.index)

    @property
    def whole(self) -> bool:
        return self.index is None


def _fused_rows(kind: str, dims: Dimensions) -> list[int]:
    """Indices of q, k or v inside a fused qkv projection."""
    d_q = dims.n_heads * dims.d_head
    if kind in ("q", "k", "v"):  # GPT-2: [q | k | v]
        start = {"q": 0, "k": d_q, "v": 2 * d_q}[kind]
        return list(range(start, start + d_q))
    part = kind.removeprefix("neox_")  # NeoX: per head [q, k, v] blocks of d_head
    offset = {"q": 0, "k": 1, "v": 2}[part]
    return [
        h * 3 * dims.d_head + offset * dims.d_head + i
        for h in range(dims.n_heads)
        for i in range(dims.d_head)
    ]


def _resolve(
    model: nn.Module, adapter: ArchitectureAdapter, layer: int, spec: ParamSpec
) -> ParamSlice | None:
    path = adapter.layer_path(layer, spec.module)
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    param = getattr(module, spec.attr, None)
    if not isinstance(param, nn.Parameter):
        return None
    name = f"{path}.{spec.attr}"
    if spec.part is None:
        return ParamSlice(name, param)
    dim, kind = spec.part
    return ParamSlice(name, param, dim, tuple(_fused_rows(kind, dimensions(model.config))))


def _head_slices(
    model: nn.Module, adapter: ArchitectureAdapter, layer: int, head: int
) -> list[ParamSlice]:
    """Head ``head``'s rows of q/k/v and its input columns of o (unfused Llama/Gemma layout)."""
    dims = dimensions(model.config)
    if head >= dims.n_heads:
        raise SiteError(f"head {head} out of range: layer has {dims.n_heads} heads")
    if not adapter.per_head_params:
        raise SiteError(f"per-head parameters are not implemented for the {adapter.family} family")
    kv_head = head * dims.n_kv_heads // dims.n_heads
    rows = {"q": head, "k": kv_head, "v": kv_head}
    slices = []
    for part, unit in rows.items():
        idx = tuple(range(unit * dims.d_head, (unit + 1) * dims.d_head))
        for spec in adapter.attn_parts[part]:
            if spec.attr == "weight" and spec.module.endswith("_proj"):
                resolved = _resolve(model, adapter, layer, spec)
                slices.append(ParamSlice(resolved.name, resolved.param, 0, idx))
    o = _resolve(model, adapter, layer, adapter.attn_parts["o"][0])
    cols = tuple(range(head * dims.d_head, (head + 1) * dims.d_head))
    slices.append(ParamSlice(o.name, o.param, 1, cols))
    return slices


def component_parameters(
    model: nn.Module, adapter: ArchitectureAdapter, component: str
) -> list[ParamSlice]:
    """The parameter slices implementing one component (see module docstring for names)."""
    if component == "embed":
        return [ParamSlice(f"{adapter.embed}.weight", model.get_submodule(adapter.embed).weight)]
    if component == "unembed":
        return [
            ParamSlice(f"{adapter.unembed}.weight", model.get_submodule(adapter.unembed).weight)
        ]
    match = _COMPONENT_RE.match(component)
    if not match:
        raise SiteError(
            f"malformed component {component!r}; expected 'embed', 'unembed', 'blocks.<L>.attn[.q|k|v|o|head<H>]' "
            "or 'blocks.<L>.mlp[.gate|up|down]'"
        )
    layer, block, part, head = int(match.group(1)), match.group(2), match.group(3), match.group(4)
    dims = dimensions(model.config)
    if layer >= dims.n_layers:
        raise SiteError(f"layer {layer} out of range: the model has {dims.n_layers} layers")
    if head is not None:
        if block != "attn":
            raise SiteError(f"heads belong to attention, not {block}: {component!r}")
        return _head_slices(model, adapter, layer, int(head))
    parts = adapter.attn_parts if block == "attn" else adapter.mlp_parts
    if part is not None and part not in parts:
        raise SiteError(f"{adapter.family} {block} has no part {part!r}; parts: {', '.join(parts)}")
    specs = parts[part] if part is not None else [s for p in parts.values() for s in p]
    resolved = [s for spec in specs if (s := _resolve(model, adapter, layer, spec)) is not None]
    return _merge(resolved)


def _merge(slices: Iterable[ParamSlice]) -> list[ParamSlice]:
    """Merge slices of the same parameter (q+k+v of a fused matrix become the whole matrix)."""
    merged: dict[int, ParamSlice] = {}
    for s in slices:
        key = id(s.param)
        if key not in merged:
            merged[key] = s
            continue
        prev = merged[key]
        if prev.whole or s.whole:
            merged[key] = ParamSlice(prev.name, prev.param)
            continue
        if prev.dim != s.dim:
            merged[key] = ParamSlice(prev.name, prev.param)
            continue
        index = tuple(sorted(set(prev.index) | set(s.index)))
        whole = len(index) == prev.param.shape[prev.dim]
        merged[key] = (
            ParamSlice(prev.name, prev.param)
            if whole
            else ParamSlice(prev.name, prev.param, prev.dim, index)
        )
    return list(merged.values())


def parameters_of(
    model: nn.Module, adapter: ArchitectureAdapter, components: Iterable[str]
) -> list[ParamSlice]:
    """All slices for several components, shared parameters merged (tied embeddings counted once)."""
    return _merge(
        s for component in components for s in component_parameters(model, adapter, component)
    )


def count_parameters(slices: Iterable[ParamSlice]) -> int:
    return sum(s.numel for s in slices)


class GradientMask:
    """Make exactly the given slices trainable: freeze all else, zero gradients outside slices.

    Use as a context manager or call ``apply()``/``remove()``; ``remove`` restores the previous
    ``requires_grad`` flags.
    """

    def __init__(self, model: nn.Module, slices: Iterable[ParamSlice]) -> None:
        self.model = model
        self.slices = list(slices)
        self._saved: dict[str, bool] = {}
        self._handles: list = []

    def trainable(self) -> list[nn.Parameter]:
        seen, params = set(), []
        for s in self.slices:
            if id(s.param) not in seen:
                seen.add(id(s.param))
                params.append(s.param)
        return params

    def apply(self) -> GradientMask:
        self._saved = {name: p.requires_grad for name, p in self.model.named_parameters()}
        for p in self.model.parameters():
            p.requires_grad_(False)
        for param in self.trainable():
            param.requires_grad_(True)
            keep = self.keep_mask(param)
            if keep is not None:
                self._handles.append(param.register_hook(lambda g, keep=keep: g * keep.to(g.dtype)))
        return self

    def keep_mask(self, param: nn.Parameter) -> torch.Tensor | None:
        """Boolean mask of ``param``'s selected entries (``None``: the whole tensor)."""
        mine = [s for s in self.slices if s.param is param]
        if any(s.whole for s in mine):
            return None
        keep = torch.zeros_like(param, dtype=torch.bool)
        for s in mine:
            index = torch.tensor(s.index, device=param.device)
            keep.index_fill_(s.dim, index, True)
        return keep

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name, p in self.model.named_parameters():
            if name in self._saved:
                p.requires_grad_(self._saved[name])

    def __enter__(self) -> GradientMask:
        return self.apply()

    def __exit__(self, *exc) -> None:
        self.remove()
