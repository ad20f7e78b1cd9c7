"""Baseline localizations of Mechanistic Unlearning (Guo et al. 2024, Sec. 4):

- ``random``: random weight matrices (any q/k/v/o or MLP matrix of any layer) up to the budget;
- ``random_mlps``: random whole MLP layers up to the budget;
- ``all_mlps``: every MLP layer;
- ``nonlocalized``: every attention and MLP matrix (full fine-tuning of the blocks);
- ``last_layer``: the final block only (a shallow edit: the relearning attack's positive control).

They need no facts; the facts argument is accepted for a uniform interface.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mechunlearn.errors import ConfigError
from mechunlearn.localize.registry import LOCALIZERS, LocalizeOptions
from mechunlearn.localize.result import Localization, make_localization
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.records import FactRecord


def _matrices(hm: HookedModel) -> list[str]:
    adapter = hm.require_adapter()
    parts = [f"attn.{p}" for p in adapter.attn_parts] + [f"mlp.{p}" for p in adapter.mlp_parts]
    return [f"blocks.{layer}.{part}" for layer in range(hm.dims.n_layers) for part in parts]


def _mlps(hm: HookedModel) -> list[str]:
    return [f"blocks.{layer}.mlp" for layer in range(hm.dims.n_layers)]


def _random_selection(
    hm: HookedModel, method: str, components: list[str], options: LocalizeOptions
) -> Localization:
    if options.budget is None and options.top_k is None:
        raise ConfigError(
            f"{method} needs a parameter budget (or top_k) to know how much to select"
        )
    rng = random.Random(options.seed)
    scores = {c: rng.random() for c in components}
    return make_localization(
        hm,
        method,
        scores,
        budget=options.budget,
        top_k=options.top_k,
        seed=options.seed,
        task=options.task,
    )


def _whole_scope(
    hm: HookedModel, method: str, components: list[str], options: LocalizeOptions
) -> Localization:
    """A baseline defined by its scope: every one of ``components`` selected, no budget."""
    return make_localization(
        hm,
        method,
        dict.fromkeys(components, 1.0),
        selected=components,
        seed=options.seed,
        task=options.task,
    )


@LOCALIZERS.register("random")
def random_matrices(
    hm: HookedModel, records: Sequence[FactRecord], options: LocalizeOptions
) -> Localization:
    """Random weight matrices under the budget (seeded)."""
    return _random_selection(hm, "random", _matrices(hm), options)


@LOCALIZERS.register("random_mlps")
def random_mlps(
    hm: HookedModel, records: Sequence[FactRecord], options: LocalizeOptions
) -> Localization:
    """Random whole MLP layers under the budget (seeded)."""
    return _random_selection(hm, "random_mlps", _mlps(hm), options)


@LOCALIZERS.register("all_mlps")
def all_mlps(
    hm: HookedModel, records: Sequence[FactRecord], options: LocalizeOptions
) -> Localization:
    """Every MLP layer (ignores the budget: this baseline is defined by its scope)."""
    components = _mlps(hm)
    return _whole_scope(hm, "all_mlps", components, options)


@LOCALIZERS.register("nonlocalized")
def nonlocalized(
    hm: HookedModel, records: Sequence[FactRecord], options: LocalizeOptions
) -> Localization:
    """Every attention and MLP matrix of every layer."""
    components = [
        f"blocks.{layer}.{kind}" for layer in range(hm.dims.n_layers) for kind in ("attn", "mlp")
    ]
    return _whole_scope(hm, "nonlocalized", components, options)


@LOCALIZERS.register("last_layer")
def last_layer(
    hm: HookedModel, records: Sequence[FactRecord], options: LocalizeOptions
) -> Localization:
    """The final block's attention and MLP: a deliberately shallow edit, written where the
    answer is read out rather than where it is looked up. The relearning attack's positive
    control (Guo et al. 2024 test that an attack restores such edits): an attack too weak to
    undo this one cannot tell deep edits from shallow ones."""
    layer = hm.dims.n_layers - 1
    components = [f"blocks.{layer}.attn", f"blocks.{layer}.mlp"]
    return _whole_scope(hm, "last_layer", components, options)
