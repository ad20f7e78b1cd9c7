"""What a measurement is given: the model and everything its experiment knows about the seed,
in one object instead of a long argument list, so a new measurement needs no new plumbing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mechunlearn.experiments.edit_config import ExperimentConfig
from mechunlearn.experiments.fact_sets import FactSets
from mechunlearn.experiments.lat_config import LatExperimentConfig
from mechunlearn.experiments.lat_data import SeedData
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.records import FactRecord


def _quiet(_: str) -> None:
    """The default log: says nothing."""


@dataclass(frozen=True)
class MeasureContext:
    """Shared by every pipeline: the model as it is now, the seed, progress bars, the log."""

    hm: HookedModel
    seed: int
    progress: bool = False
    log: Callable[[str], None] = _quiet


@dataclass(frozen=True)
class BatteryContext(MeasureContext):
    """An editing experiment's seed (``pipeline="edit"``): its fact sets and config, general
    text (``text_eval`` for the LM loss, ``text_train`` for attacks that keep the model
    fluent), unrelated CounterFact facts (side effects), and ``probe_reserve``: facts outside
    every forget and retain set (the validation forget facts), for probes that need examples of
    an answer no retain fact has."""

    sets: FactSets = field(kw_only=True)
    config: ExperimentConfig = field(kw_only=True)
    text_eval: Sequence[str] = ()
    text_train: Sequence[str] = ()
    counterfact_records: Sequence[FactRecord] = ()
    probe_reserve: Sequence[FactRecord] = ()


@dataclass(frozen=True)
class LatContext(MeasureContext):
    """A targeted-LAT seed (``pipeline="lat"``): the config, the seed's held-out data, and the
    training adversary's resolved layers (the latent attack's default)."""

    config: LatExperimentConfig = field(kw_only=True)
    data: SeedData = field(kw_only=True)
    layers: list[Any] = field(kw_only=True)
