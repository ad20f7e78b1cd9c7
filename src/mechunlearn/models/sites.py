"""Canonical hook-site names, independent of the architecture.

Names follow TransformerLens's vocabulary so researchers recognise them:

- ``embed``: token-embedding module output (Gemma's sqrt(d) scale included).
- ``blocks.{L}.resid_pre``: residual stream entering block L.
- ``blocks.{L}.head``: per-head attention outputs, the input of the output projection split
  into heads, shape ``[batch, seq, n_heads, d_head]`` (TransformerLens's ``z``).
- ``blocks.{L}.attn_out``: the attention sub-block's actual contribution to the residual
  stream (after Gemma's post-attention norm, after dropout).
- ``blocks.{L}.resid_mid``: ``resid_pre + attn_out`` (absent in parallel-residual blocks).
- ``blocks.{L}.mlp_in``: the MLP's input (after its pre-norm).
- ``blocks.{L}.mlp_hidden``: MLP hidden activations (input of the down projection).
- ``blocks.{L}.mlp_out``: the MLP's actual residual contribution (after Gemma's post-norm).
- ``blocks.{L}.resid_post``: residual stream leaving block L.
- ``final_norm``: output of the final norm; ``unembed``: the logits.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from mechunlearn.errors import SiteError

LAYER_KINDS: tuple[str, ...] = (
    "resid_pre",
    "head",
    "attn_out",
    "resid_mid",
    "mlp_in",
    "mlp_hidden",
    "mlp_out",
    "resid_post",
)
GLOBAL_KINDS: tuple[str, ...] = ("embed", "final_norm", "unembed")
ALL_KINDS: tuple[str, ...] = ("embed", *LAYER_KINDS, "final_norm", "unembed")

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.([a-z_]+)$")


@dataclass(frozen=True, order=True)
class Site:
    """One hook site: a kind and, for per-layer kinds, the layer index."""

    kind: str
    layer: int | None = None

    def __post_init__(self) -> None:
        if self.kind in GLOBAL_KINDS:
            if self.layer is not None:
                raise SiteError(f"site kind {self.kind!r} has no layer")
        elif self.kind in LAYER_KINDS:
            if self.layer is None or self.layer < 0:
                raise SiteError(f"site kind {self.kind!r} needs a layer index >= 0")
        else:
            raise SiteError(f"unknown site kind {self.kind!r}; known: {', '.join(ALL_KINDS)}")

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"blocks.{self.layer}.{self.kind}"

    def __str__(self) -> str:
        return self.name


def parse_site(name: str | Site) -> Site:
    """Parse ``"blocks.3.mlp_out"`` or ``"embed"`` into a ``Site``."""
    if isinstance(name, Site):
        return name
    if name in GLOBAL_KINDS:
        return Site(name)
    match = _LAYER_RE.match(name)
    if not match:
        raise SiteError(
            f"malformed site name {name!r}; expected one of {', '.join(GLOBAL_KINDS)} "
            "or 'blocks.<layer>.<kind>' with kind in " + ", ".join(LAYER_KINDS)
        )
    return Site(match.group(2), int(match.group(1)))


def all_sites(n_layers: int, kinds: Iterable[str] = ALL_KINDS) -> list[Site]:
    """Every site of the given kinds in execution order."""
    kinds = tuple(kinds)
    sites: list[Site] = []
    if "embed" in kinds:
        sites.append(Site("embed"))
    for layer in range(n_layers):
        sites.extend(Site(kind, layer) for kind in LAYER_KINDS if kind in kinds)
    sites.extend(Site(kind) for kind in ("final_norm", "unembed") if kind in kinds)
    return sites


SiteFilter = Iterable[str] | Callable[[str], bool] | str | None


def site_filter(names: SiteFilter) -> Callable[[Site], bool]:
    """Turn a names filter into a predicate.

    Accepts ``None`` (everything), a callable on the site name, or names where each entry is
    either a full site name (``"blocks.2.attn_out"``) or a kind (``"resid_post"``: all layers).
    """
    if names is None:
        return lambda site: True
    if callable(names):
        predicate = names
        return lambda site: bool(predicate(site.name))
    if isinstance(names, str):
        names = [names]
    wanted_kinds: set[str] = set()
    wanted_sites: set[Site] = set()
    for entry in names:
        if entry in ALL_KINDS:
            wanted_kinds.add(entry)
        else:
            wanted_sites.add(parse_site(entry))
    return lambda site: site.kind in wanted_kinds or site in wanted_sites
