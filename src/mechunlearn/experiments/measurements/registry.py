"""The measurement registry: what an experiment measures on a model, each measurement one
registered function with its options schema and its report columns.

``MEASUREMENTS.register(name, config=..., columns=...)`` decorates ``run(ctx, options, name)
-> BatteryResult``; the editing battery (``experiments.battery``) and the targeted-LAT
evaluation (``experiments.lat_measure``) both run the measurements their config lists, in
registration order, and the reports take their headline columns from here. Adding a
measurement is one module and its registration; nothing else needs to change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from mechunlearn.errors import ConfigError
from mechunlearn.registry import Registry
from mechunlearn.report.columns import Column
from mechunlearn.schema import STRICT_CONFIG

Pipeline = Literal["edit", "lat"]
INSTANCE = "@"
"""Separates a measurement's name from an instance's (``relearn@paper``): a measurement can
run several times with different options, each instance its own battery part."""


@dataclass
class BatteryResult:
    """What a measurement returns (and a battery merges): flat ``metrics``, ``curves`` for the
    plots (LAT: the details of each evaluation), ``notes`` for the report, and ``per_fact``
    (``{metric: {fact id: value}}``; LAT: request index, ``per_item``) for paired comparisons."""

    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    per_fact: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "curves": self.curves,
            "notes": self.notes,
            "per_fact": self.per_fact,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatteryResult:
        return cls(
            dict(data["metrics"]),
            dict(data["curves"]),
            list(data["notes"]),
            {k: dict(v) for k, v in data.get("per_fact", {}).items()},
        )

    def update(self, other: BatteryResult) -> None:
        """Add ``other``'s metrics, curves, notes and per-fact values (``other`` wins ties)."""
        self.metrics.update(other.metrics)
        self.curves.update(other.curves)
        self.notes.extend(other.notes)
        self.per_fact.update(other.per_fact)


def per_item(values: Sequence[bool | float]) -> dict[str, float]:
    """Per-item values keyed by the item's index in its split (``per_fact`` of a LAT
    measurement: every method of a seed is scored on the same held-out requests, in the same
    order, so index ``i`` pairs the same request across methods)."""
    return {str(i): float(v) for i, v in enumerate(values)}


def complied(margins: Sequence[float]) -> dict[str, float]:
    """Per request, 1 where the compliant answer is preferred (margin > 0: ties count for the
    refusal, as in ``evals.refusal``)."""
    return per_item([m > 0 for m in margins])


class NoOptions(BaseModel):
    """The options of a measurement set only by its experiment's shared settings."""

    model_config = STRICT_CONFIG


Run = Callable[[Any, Any, str], BatteryResult]
"""``run(ctx, options, name)``: ``ctx`` the pipeline's context (``context``), ``options`` the
validated ``config`` model, ``name`` the configured name (``relearn@paper``), which prefixes
metrics that instances of one measurement would otherwise share."""


@dataclass(frozen=True)
class Measurement:
    """A registered measurement.

    ``pipeline``: the experiments that run it (``edit``: the battery after every edit, with a
    ``BatteryContext``; ``lat``: every targeted-LAT method, with a ``LatContext``). ``part``:
    the battery part (one unit of work, one file) it runs in; measurements sharing a part run
    together in registration order. ``trains``: it trains (an attack) and restores the model
    afterwards. ``on_base``: also measured on an editing run's base model."""

    name: str
    run: Run
    config: type[BaseModel]
    columns: tuple[Column, ...]
    pipeline: Pipeline
    part: str
    trains: bool
    on_base: bool


class MeasurementRegistry(Registry[Measurement]):
    """``Registry`` of ``Measurement``; ``register`` decorates the run function."""

    def register(  # type: ignore[override]
        self,
        name: str,
        *,
        config: type[BaseModel] = NoOptions,
        columns: Sequence[Column] = (),
        pipeline: Pipeline = "edit",
        part: str | None = None,
        trains: bool = False,
        on_base: bool | None = None,
    ) -> Callable[[Run], Run]:
        """Register the decorated ``run``; ``on_base`` defaults to ``not trains`` (attacks
        say nothing about an unedited model)."""
        if not name or INSTANCE in name:
            raise ValueError(f"measurement name {name!r} must be non-empty without {INSTANCE!r}")

        def decorator(run: Run) -> Run:
            measurement = Measurement(
                name, run, config, tuple(columns), pipeline, part or name, trains,
                not trains if on_base is None else on_base,
            )  # fmt: skip
            super(MeasurementRegistry, self).register(name)(measurement)
            return run

        return decorator

    def ordered(self, pipeline: Pipeline | None = None) -> list[Measurement]:
        """The measurements (of ``pipeline``) in registration order: the order they run and
        their metrics and columns are reported in."""
        return [m for m in self._entries.values() if pipeline in (None, m.pipeline)]

    def columns(self, pipeline: Pipeline | None = None) -> list[Column]:
        """Every registered report column (of ``pipeline``), in registration order."""
        return [c for m in self.ordered(pipeline) for c in m.columns]

    def part_rank(self, part: str) -> int | None:
        """Position of battery ``part`` (``relearn@paper``: ``relearn``'s) in the order parts
        are reported: its first measurement's registration order (``None``: no such part)."""
        base = part.partition(INSTANCE)[0]
        return next((i for i, m in enumerate(self.ordered()) if m.part == base), None)


MEASUREMENTS = MeasurementRegistry("measurement")


@dataclass(frozen=True)
class Planned:
    """One configured measurement: ``name`` (``relearn`` or ``relearn@paper``) with its
    validated options."""

    name: str
    measurement: Measurement
    options: BaseModel

    @property
    def part(self) -> str:
        """The battery part it runs in (an instance gets its own: ``relearn@paper``)."""
        instance = self.name.partition(INSTANCE)[2]
        return self.measurement.part + (INSTANCE + instance if instance else "")


def plan(chosen: Mapping[str, Any], pipeline: Pipeline) -> list[Planned]:
    """``chosen`` (configured name -> options, raw or validated) as validated ``Planned``
    entries in registration order (instances of one measurement in ``chosen``'s order)."""
    out = []
    for key, options in chosen.items():
        measurement = measurement_for(key, pipeline)
        out.append(Planned(key, measurement, validated_options(key, measurement, options)))
    order = MEASUREMENTS.ordered()
    return sorted(out, key=lambda p: order.index(p.measurement))


def measurement_for(key: str, pipeline: Pipeline) -> Measurement:
    """The registered measurement a configured name selects (``ValueError`` naming it)."""
    name, _, instance = key.partition(INSTANCE)
    if INSTANCE in key and not (instance and all(c.isalnum() or c in "-_" for c in instance)):
        raise ValueError(f"measurement {key!r}: the instance name must be letters, digits, - or _")
    try:
        measurement = MEASUREMENTS.get(name)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    if measurement.pipeline != pipeline:
        raise ValueError(
            f"measurement {key!r} is measured in {measurement.pipeline} experiments, not {pipeline}"
        )
    return measurement


def validated_options(key: str, measurement: Measurement, options: Any) -> BaseModel:
    """``options`` validated by the measurement's schema (``ValueError`` naming it)."""
    try:
        return measurement.config.model_validate({} if options is None else options)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"measurement {key!r}: {problems}") from None


def check_extra(
    measurements: Mapping[str, Any], pipeline: Pipeline, dedicated: Mapping[str, str]
) -> None:
    """Check a config's ``measurements`` block: registered names of this pipeline with valid
    options, none of those its config sets with a field of its own (``dedicated``: measurement
    -> field)."""
    for key, options in measurements.items():
        measurement = measurement_for(key, pipeline)
        if measurement.name in dedicated:
            raise ValueError(
                f"measurement {key!r} is configured by evaluation.{dedicated[measurement.name]}, "
                "not under measurements"
            )
        validated_options(key, measurement, options)
