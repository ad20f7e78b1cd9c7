"""Benign requests (targeted LAT, every application): compliance and loss on held-out benign
requests, the capability LAT must not cost."""

from __future__ import annotations

from mechunlearn.evals.refusal import benign_compliance
from mechunlearn.experiments.measurements.context import LatContext
from mechunlearn.experiments.measurements.registry import (
    MEASUREMENTS,
    BatteryResult,
    NoOptions,
    per_item,
)
from mechunlearn.report.columns import Column

LAT_RUNS = ("refusal", "backdoor")
COLUMNS = (
    Column("benign.compliance", "benign compliance", False, "side_effect", LAT_RUNS),
    Column("benign.loss", "benign loss (nats)", True, "side_effect", LAT_RUNS),
)


@MEASUREMENTS.register("benign", config=NoOptions, columns=COLUMNS, pipeline="lat")
def measure_benign(ctx: LatContext, options: NoOptions, name: str) -> BatteryResult:
    ctx.log("evaluating: benign requests")
    benign = benign_compliance(ctx.hm, ctx.data.test_benign, ctx.config.evaluation.batch_size)
    metrics = {
        "benign.compliance": benign["compliance"]["rate"],
        "benign.loss": benign["benign_loss"],
        "benign.refusal_greedy": benign["refusal_greedy"]["rate"],
    }
    per_request = {"benign.compliance": per_item(benign["per_example"]["compliance"])}
    return BatteryResult(metrics=metrics, curves={"benign": benign}, per_fact=per_request)
