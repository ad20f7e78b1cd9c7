"""One hook context over a plain HF model: cache, patch, ablate, perturb.

Every intervention is a function of the site's activation, applied with a PyTorch forward
hook on the module the architecture adapter names. Interventions are differentiable (they use
``torch.where`` and addition, never in-place writes on the model's tensors), so the same
mechanism serves activation patching, steering and latent adversarial perturbations (PGD).

Batched patching: a ``Patch`` takes a source activation that broadcasts against the site's
activation and a boolean ``mask`` over ``[batch, seq]`` (or ``[batch, seq, heads]`` for the
``head`` site); give each batch row a different mask to run many patches in one forward.

``resid_mid`` is not a tensor any module receives as its residual input (only the next norm
reads it), so writing to it is done on the attention output: the new contribution is
``f(resid_pre + attn_out) - resid_pre``; reading it is exact.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from mechunlearn.errors import SiteError
from mechunlearn.models.adapters import ArchitectureAdapter, HookPoint, dimensions
from mechunlearn.models.sites import ALL_KINDS, Site, SiteFilter, all_sites, parse_site, site_filter

ActivationFn = Callable[[torch.Tensor], torch.Tensor]


def _broadcast_mask(
    mask: torch.Tensor | None, activation: torch.Tensor, is_head: bool
) -> torch.Tensor | None:
    """Reshape a ``[batch, seq]`` or ``[batch, seq, heads]`` mask to broadcast over features."""
    if mask is None:
        return None
    mask = mask.to(device=activation.device, dtype=torch.bool)
    needed = activation.dim() - mask.dim()
    if needed < 0:
        raise SiteError(f"mask has {mask.dim()} dims but the activation only {activation.dim()}")
    return mask.reshape(*mask.shape, *([1] * needed))


def position_mask(
    batch: int,
    seq: int,
    positions: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
    device=None,
) -> torch.Tensor:
    """Boolean ``[batch, seq]`` mask: the same positions for every row, or a list per row."""
    mask = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    positions = positions.tolist() if isinstance(positions, torch.Tensor) else positions
    if len(positions) and isinstance(positions[0], (list, tuple)):
        if len(positions) != batch:
            raise SiteError(f"{len(positions)} position lists for a batch of {batch}")
        for row, row_positions in enumerate(positions):
            mask[row, list(row_positions)] = True
    else:
        mask[:, list(positions)] = True
    return mask


@dataclass
class Intervention(ABC):
    """Base class: something that rewrites the activation at ``site`` during a forward."""

    site: str | Site

    @abstractmethod
    def apply(self, activation: torch.Tensor) -> torch.Tensor:
        """The activation to use from here on (a function of the one computed)."""

    @property
    def parsed(self) -> Site:
        return parse_site(self.site)


@dataclass
class Patch(Intervention):
    """Replace (or add to) the activation with ``value`` where ``mask`` is true.

    ``value`` broadcasts against the activation (e.g. a clean run's cached ``[1, seq, d]``
    tensor, or a ``[d]`` vector); ``mask`` is ``[batch, seq]`` or, for ``head``,
    ``[batch, seq, heads]``; ``None`` means everywhere.
    """

    value: torch.Tensor | float = 0.0
    mask: torch.Tensor | None = None
    mode: str = "replace"

    def __post_init__(self) -> None:
        if self.mode not in ("replace", "add"):
            raise SiteError(f"patch mode must be 'replace' or 'add', got {self.mode!r}")
        parse_site(self.site)  # validate the site name early

    def apply(self, activation: torch.Tensor) -> torch.Tensor:
        value = self.value
        if isinstance(value, torch.Tensor):
            value = value.to(device=activation.device, dtype=activation.dtype)
        else:
            value = torch.tensor(value, device=activation.device, dtype=activation.dtype)
        mask = _broadcast_mask(self.mask, activation, self.parsed.kind == "head")
        if self.mode == "add":
            return activation + (value if mask is None else value * mask)
        if mask is None:
            return (
                value.expand_as(activation)
                if value.dim()
                else torch.full_like(activation, value.item())
            )
        return torch.where(mask, value, activation)


def ZeroAblate(site: str | Site, mask: torch.Tensor | None = None) -> Patch:  # noqa: N802 - reads as a type
    """Set the site to zero where ``mask`` is true."""
    return Patch(site, 0.0, mask)


def MeanAblate(site: str | Site, mean: torch.Tensor, mask: torch.Tensor | None = None) -> Patch:  # noqa: N802
    """Replace the site by a reference mean (``[d]`` or per-position ``[seq, d]``)."""
    return Patch(site, mean, mask)


def Perturb(site: str | Site, delta: torch.Tensor, mask: torch.Tensor | None = None) -> Patch:  # noqa: N802
    """Add a (possibly trainable) perturbation; gradients flow to ``delta``."""
    return Patch(site, delta, mask, mode="add")


@dataclass
class Apply(Intervention):
    """Apply an arbitrary differentiable function to the activation."""

    fn: ActivationFn = field(default=lambda x: x)

    def apply(self, activation: torch.Tensor) -> torch.Tensor:
        return self.fn(activation)


class ActivationCache(dict[str, torch.Tensor]):
    """Site name -> activation. ``stack(kind)`` gives ``[n_layers, ...]`` for one kind."""

    def stack(self, kind: str) -> torch.Tensor:
        layers = sorted(
            (site.layer, tensor)
            for name, tensor in self.items()
            if (site := parse_site(name)).kind == kind and site.layer is not None
        )
        if not layers:
            raise SiteError(f"no cached activations of kind {kind!r}")
        return torch.stack([tensor for _, tensor in layers])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.values())


# ---- reading and writing a hook point ---------------------------------------------------
def _get_input(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    first_key = next(iter(kwargs))
    return kwargs[first_key]


def _set_input(args: tuple, kwargs: dict, value: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (value, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return args, {**kwargs, key: value}


def _get_output(output):
    if isinstance(output, tuple):
        return output[0]
    return output.logits if hasattr(output, "logits") else output


def _set_output(output, value: torch.Tensor):
    if isinstance(output, tuple):
        return (value, *output[1:])
    if hasattr(output, "logits"):
        output.logits = value
        return output
    return value


Handler = Callable[[torch.Tensor], torch.Tensor | None]


class HookSession:
    """Collects handlers per hook point and installs one PyTorch hook per point.

    Handlers at a point run in the order added; each may return a replacement activation.
    ``head`` handlers see ``[batch, seq, n_heads, d_head]``.
    """

    def __init__(self, model: nn.Module, adapter: ArchitectureAdapter) -> None:
        self.model = model
        self.adapter = adapter
        self.dims = dimensions(model.config)
        self._handlers: dict[HookPoint, list[Handler]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def check_site(self, site: Site) -> Site:
        if site.layer is not None and site.layer >= self.dims.n_layers:
            raise SiteError(
                f"layer {site.layer} out of range: the model has {self.dims.n_layers} layers"
            )
        self.adapter.hook_point(site)  # raises for unsupported kinds
        return site

    def add(self, site: Site, handler: Handler) -> None:
        self.check_site(site)
        point = self.adapter.hook_point(site)
        if site.kind == "head":
            handler = self._head_view(handler)
        self._handlers.setdefault(point, []).append(handler)

    def _head_view(self, handler: Handler) -> Handler:
        n_heads = self.dims.n_heads

        def wrapped(flat: torch.Tensor) -> torch.Tensor | None:
            split = flat.unflatten(-1, (n_heads, flat.shape[-1] // n_heads))
            result = handler(split)
            return None if result is None else result.flatten(-2)

        return wrapped

    def add_intervention(self, intervention: Intervention) -> None:
        site = self.check_site(intervention.parsed)
        if site.kind == "resid_mid":
            self._add_resid_mid_write(site, intervention.apply)
        else:
            self.add(site, intervention.apply)

    def _add_resid_mid_write(self, site: Site, fn: ActivationFn) -> None:
        stash: dict[str, torch.Tensor] = {}

        def remember_pre(activation: torch.Tensor) -> None:
            stash["pre"] = activation

        def rewrite_attn(attn_out: torch.Tensor) -> torch.Tensor:
            pre = stash.pop("pre")
            return fn(pre + attn_out) - pre

        self.add(Site("resid_pre", site.layer), remember_pre)
        self.add(Site("attn_out", site.layer), rewrite_attn)

    def install(self) -> None:
        for point, handlers in self._handlers.items():
            module = self.model.get_submodule(point.module) if point.module else self.model
            if point.where == "input":
                self._handles.append(
                    module.register_forward_pre_hook(_pre_hook(handlers), with_kwargs=True)
                )
            else:
                self._handles.append(module.register_forward_hook(_post_hook(handlers)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _run_handlers(handlers: list[Handler], activation: torch.Tensor) -> tuple[torch.Tensor, bool]:
    changed = False
    for handler in handlers:
        result = handler(activation)
        if result is not None:
            activation, changed = result, True
    return activation, changed


def _pre_hook(handlers: list[Handler]):
    def hook(module, args, kwargs):
        activation, changed = _run_handlers(handlers, _get_input(args, kwargs))
        return _set_input(args, kwargs, activation) if changed else None

    return hook


def _post_hook(handlers: list[Handler]):
    def hook(module, args, output):
        activation, changed = _run_handlers(handlers, _get_output(output))
        return _set_output(output, activation) if changed else None

    return hook


def _cache_handler(cache: ActivationCache, name: str, detach: bool) -> Handler:
    def record(activation: torch.Tensor) -> None:
        cache[name] = activation.detach() if detach else activation

    return record


@contextmanager
def hooked(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    interventions: Iterable[Intervention] = (),
    cache: SiteFilter | bool = False,
    detach: bool = True,
    handlers: Iterable[tuple[str | Site, Handler]] = (),
) -> Iterator[ActivationCache]:
    """Install interventions and/or caching for the duration of the ``with`` block.

    ``cache``: ``False`` (none), ``True`` (every site), or a names filter (see
    ``site_filter``). Cached values are taken after the interventions at that site, so a cache
    shows what the model really computed. With ``detach=False`` cached tensors keep their graph
    (for attribution patching). Raw ``handlers`` receive activations for custom reads.
    """
    session = HookSession(model, adapter)
    result = ActivationCache()
    interventions = list(interventions)
    by_kind_order = {kind: i for i, kind in enumerate(ALL_KINDS)}
    for intervention in sorted(interventions, key=lambda iv: by_kind_order[iv.parsed.kind]):
        session.add_intervention(intervention)
    for site, handler in handlers:
        session.add(parse_site(site), handler)
    if cache is not False:
        wanted = site_filter(None if cache is True else cache)
        for site in all_sites(session.dims.n_layers):
            if not wanted(site):
                continue
            if site.kind == "resid_mid" and adapter.parallel_residual:
                if cache is True:
                    continue
            session.add(site, _cache_handler(result, site.name, detach))
    session.install()
    try:
        yield result
    finally:
        session.remove()


def compute_means(
    cache_batches: Iterable[ActivationCache], mask_batches: Iterable[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Mean activation per site over the real (unpadded) tokens of several cached batches."""
    sums: dict[str, torch.Tensor] = {}
    count = 0.0
    for cache, mask in zip(cache_batches, mask_batches, strict=True):
        weights = mask.to(torch.float32)
        count += float(weights.sum())
        for name, tensor in cache.items():
            w = weights.to(tensor.device).reshape(*weights.shape, *([1] * (tensor.dim() - 2)))
            total = (tensor.float() * w).sum(dim=(0, 1))
            sums[name] = sums[name] + total if name in sums else total
    if count == 0:
        raise SiteError("no tokens to average over")
    return {name: total / count for name, total in sums.items()}
