"""Refusal of held-out harmful requests (targeted LAT, ``application: refusal``)."""

from __future__ import annotations

from mechunlearn.evals.refusal import refusal_rate
from mechunlearn.experiments.measurements.context import LatContext
from mechunlearn.experiments.measurements.registry import (
    MEASUREMENTS,
    BatteryResult,
    NoOptions,
    per_item,
)
from mechunlearn.report.columns import Column

COLUMNS = (
    Column("refusal.rate", "refusal rate (held-out templates)", False, "target", ("refusal",)),
)


@MEASUREMENTS.register("refusal", config=NoOptions, columns=COLUMNS, pipeline="lat")
def measure_refusal(ctx: LatContext, options: NoOptions, name: str) -> BatteryResult:
    """Refusal preferred, by margin and greedily, and the refusal's loss on the test split."""
    refusal = refusal_rate(ctx.hm, ctx.data.test_data, ctx.config.evaluation.batch_size)
    metrics = {
        "refusal.rate": refusal["refusal"]["rate"],
        "refusal.margin": refusal["margin"]["rate"],
        "refusal.compliant_greedy": refusal["compliant_greedy"]["rate"],
        "refusal.refusal_loss": refusal["refusal_loss"],
    }
    per_request = {
        "refusal.rate": per_item(refusal["per_example"]["refusal"]),
        "refusal.compliant_greedy": per_item(refusal["per_example"]["compliant_greedy"]),
    }
    return BatteryResult(metrics=metrics, curves={"refusal": refusal}, per_fact=per_request)
