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

from mechunlearn.localize.options import LocalizeOptions, MethodOptions
from mechunlearn.localize.protocol import Scores
from mechunlearn.localize.registry import LOCALIZERS
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.records import FactRecord


def _matrices(hm: HookedModel) -> list[str]:
    adapter = hm.require_adapter()
    parts = [f"attn.{p}" for p in adapter.attn_parts] + [f"mlp.{p}" for p in adapter.mlp_parts]
    return [f"blocks.{layer}.{part}" for layer in range(hm.dims.n_layers) for part in parts]


def _mlps(hm: HookedModel) -> list[str]:
    return [f"blocks.{layer}.mlp" for layer in range(hm.dims.n_layers)]


def _random_scores(components: list[str], seed: int) -> Scores:
    rng = random.Random(seed)
    return Scores({c: rng.random() for c in components})


def _whole_scope(components: list[str]) -> Scores:
    """A baseline defined by its scope: every one of ``components`` selected."""
    return Scores(dict.fromkeys(components, 1.0), selected=components)


@LOCALIZERS.method("random", needs_budget=True)
def random_matrices(
    hm: HookedModel, records: Sequence[FactRecord], options: LocalizeOptions, _: MethodOptions
) -> Scores:
    """Random weight matrices under the budget (seeded)."""
    return _random_scores(_matrices(hm), options.seed)


@LOCALIZERS.method("random_mlps", needs_budget=True)
def random_mlps(
    hm: HookedModel, records: Sequence[FactRecord], options: LocalizeOptions, _: MethodOptions
) -> Scores:
    """Random whole MLP layers under the budget (seeded)."""
    return _random_scores(_mlps(hm), options.seed)


@LOCALIZERS.method("all_mlps", scope_defined=True)
def all_mlps(
    hm: HookedModel, records: Sequence[FactRecord], options: LocalizeOptions, _: MethodOptions
) -> Scores:
    """Every MLP layer (no budget: this baseline is defined by its scope)."""
    return _whole_scope(_mlps(hm))


@LOCALIZERS.method("nonlocalized", scope_defined=True)
def nonlocalized(
    hm: HookedModel, records: Sequence[FactRecord], options: LocalizeOptions, _: MethodOptions
) -> Scores:
    """Every attention and MLP matrix of every layer."""
    layers = range(hm.dims.n_layers)
    return _whole_scope([f"blocks.{layer}.{kind}" for layer in layers for kind in ("attn", "mlp")])


@LOCALIZERS.method("last_layer", scope_defined=True)
def last_layer(
    hm: HookedModel, records: Sequence[FactRecord], options: LocalizeOptions, _: MethodOptions
) -> Scores:
    """The final block's attention and MLP: a deliberately shallow edit, written where the
    answer is read out rather than where it is looked up. The relearning attack's positive
    control (Guo et al. 2024 test that an attack restores such edits): an attack too weak to
    undo this one cannot tell deep edits from shallow ones."""
    layer = hm.dims.n_layers - 1
    return _whole_scope([f"blocks.{layer}.attn", f"blocks.{layer}.mlp"])
