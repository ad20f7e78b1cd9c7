"""The robustness battery run on every edited model (Guo et al. 2024, Sec. 5-6).

The battery is the list of ``pipeline="edit"`` measurements its config asks for
(``battery_plan``; the measurements live in ``experiments.measurements``, one module each):

- ``formats`` part: format shift (every prompt format on forget facts and held-out retain
  facts, one scoring pass) and LM loss; CounterFact's ROME scores; latent probes;
- ``relocalize``: localization methods run again on this model;
- ``relearn`` and each ``relearn@<name>`` variant: the relearning attack; ``soft_prompt``: the
  soft-prompt attack; each attack restores the model afterwards;
- a part per measurement added under ``evaluation.measurements``.

Everything is returned as a flat ``metrics`` dict (names like ``forget.mcq.p_original``) plus
curves for the plots, so the report aggregates any experiment the same way, and ``per_fact``:
the same metrics per forget fact (``{metric: {fact id: value}}``), which paired comparisons of
two localizations resample (``report.paired``). Parts of one edit can run in different
processes; ``merge_batteries`` puts them back in registration order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from mechunlearn.errors import DataError
from mechunlearn.experiments.edit_config import ExperimentConfig
from mechunlearn.experiments.fact_sets import FactSets
from mechunlearn.experiments.measurements import (
    MEASUREMENTS,
    BatteryContext,
    BatteryResult,
    Planned,
    plan,
)
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.records import FactRecord


def _finite(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def battery_plan(config: ExperimentConfig, attacks: bool = True) -> list[Planned]:
    """The measurements ``config`` asks for, in the order they run (``attacks=False``: the
    base model, only measurements made ``on_base``)."""
    chosen = plan(config.evaluation.measurement_options(), "edit")
    return [p for p in chosen if attacks or p.measurement.on_base]


def battery_parts(config: ExperimentConfig, attacks: bool = True) -> list[str]:
    """The parts ``config`` asks for (``attacks=False``: the base model, no attacks)."""
    return list(dict.fromkeys(p.part for p in battery_plan(config, attacks)))


def _part_rank(name: str) -> tuple[int, str]:
    rank = MEASUREMENTS.part_rank(name)
    if rank is None:
        known = ", ".join(dict.fromkeys(m.part for m in MEASUREMENTS.ordered("edit")))
        raise DataError(f"unknown battery part {name!r}; known: {known}, <part>@<name>")
    return rank, name.partition("@")[2]


def merge_batteries(parts: dict[str, BatteryResult]) -> BatteryResult:
    """One battery from its parts, in registration order whatever order they ran in (a part's
    instances, e.g. ``relearn@paper``, right after the part itself, by name)."""
    out = BatteryResult()
    for name in sorted(parts, key=_part_rank):
        out.update(parts[name])
    return out


def run_battery(
    hm: HookedModel,
    sets: FactSets,
    config: ExperimentConfig,
    seed: int,
    *,
    general_text_eval: Sequence[str],
    general_text_train: Sequence[str],
    counterfact_records: Sequence[FactRecord] = (),
    probe_reserve: Sequence[FactRecord] = (),
    attacks: bool = True,
    parts: Sequence[str] | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> BatteryResult:
    """Measure the current model; ``attacks=False`` skips the measurements that are not made
    on the base model (the attacks); ``parts``: only these of ``battery_parts(config,
    attacks)`` (default: all). ``probe_reserve``: see ``BatteryContext``."""
    planned = battery_plan(config, attacks)
    available = list(dict.fromkeys(p.part for p in planned))
    chosen = available if parts is None else list(parts)
    missing = [p for p in chosen if p not in available]
    if missing:
        raise DataError(f"battery parts {missing} are not configured; configured: {available}")
    ctx = BatteryContext(
        hm, seed, progress, log, sets=sets, config=config, text_eval=general_text_eval,
        text_train=general_text_train, counterfact_records=counterfact_records,
        probe_reserve=probe_reserve,
    )  # fmt: skip
    results: dict[str, BatteryResult] = {}
    for entry in planned:
        if entry.part in chosen:
            result = entry.measurement.run(ctx, entry.options, entry.name)
            results.setdefault(entry.part, BatteryResult()).update(result)
    out = merge_batteries(results)
    out.metrics = {k: v for k, v in out.metrics.items() if _finite(v) is not None}
    out.per_fact = {
        k: {fact: v for fact, v in values.items() if _finite(v) is not None}
        for k, values in out.per_fact.items()
    }
    return out
