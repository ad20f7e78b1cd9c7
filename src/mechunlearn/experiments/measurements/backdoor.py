"""The backdoor's success with and without its trigger (targeted LAT, ``application:
backdoor``): after removal, and (``lat_job``) right after installation."""

from __future__ import annotations

from typing import Any

from mechunlearn.evals.refusal import backdoor_success_rate
from mechunlearn.experiments.lat_config import LatExperimentConfig
from mechunlearn.experiments.lat_data import SeedData
from mechunlearn.experiments.measurements.context import LatContext
from mechunlearn.experiments.measurements.registry import (
    MEASUREMENTS,
    BatteryResult,
    NoOptions,
    per_item,
)
from mechunlearn.models.handle import HookedModel
from mechunlearn.report.columns import Column


def _column(key: str, label: str) -> Column:
    return Column(key, label, True, "target", ("backdoor",))


COLUMNS = (
    _column("backdoor.triggered", "backdoor success with trigger"),
    _column("backdoor.triggered_greedy", "greedy backdoor with trigger"),
    _column("backdoor.clean", "backdoor success without trigger"),
)


def measure_backdoor(
    hm: HookedModel, config: LatExperimentConfig, data: SeedData
) -> dict[str, Any]:
    """The backdoor's success with and without its trigger on the seed's held-out requests."""
    bd = config.backdoor
    return backdoor_success_rate(
        hm,
        data.test_items,
        bd.backdoor.trigger,
        bd.backdoor.response,
        bd.backdoor.position,
        bd.greedy_tokens,
        config.evaluation.batch_size,
    )


def backdoor_metrics(measured: dict[str, Any], prefix: str) -> dict[str, float]:
    """Flat rates from ``backdoor_success_rate``: success (response preferred) and greedy, with
    and without the trigger, and the response's loss with the trigger."""
    on, off = measured["triggered"], measured["clean"]
    return {
        f"{prefix}.triggered": on["preference"]["rate"],
        f"{prefix}.triggered_greedy": on["greedy"]["rate"],
        f"{prefix}.clean": off["preference"]["rate"],
        f"{prefix}.clean_greedy": off["greedy"]["rate"],
        f"{prefix}.triggered_response_loss": on["response_loss"],
    }


@MEASUREMENTS.register("backdoor", config=NoOptions, columns=COLUMNS, pipeline="lat")
def measure_backdoor_removal(ctx: LatContext, options: NoOptions, name: str) -> BatteryResult:
    """The backdoor (``config.backdoor``) on the current model."""
    measured = measure_backdoor(ctx.hm, ctx.config, ctx.data)
    on, off = measured["triggered"]["per_example"], measured["clean"]["per_example"]
    per_request = {
        "backdoor.triggered": per_item(on["preference"]),
        "backdoor.triggered_greedy": per_item(on["greedy"]),
        "backdoor.clean": per_item(off["preference"]),
    }
    return BatteryResult(
        metrics=backdoor_metrics(measured, "backdoor"),
        curves={"backdoor": measured},
        per_fact=per_request,
    )
