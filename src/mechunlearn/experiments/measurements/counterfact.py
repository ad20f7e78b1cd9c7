"""CounterFact (``formats`` part): ROME's efficacy / paraphrase / neighbourhood scores when the
edits are CounterFact edits, and ROME's neighbourhood score on unrelated CounterFact facts
(``evaluation.counterfact_side_effects``) as a side effect of any edit."""

from __future__ import annotations

from collections.abc import Sequence

from mechunlearn.evals.counterfact_metrics import rome_metrics, rome_per_record, summarize_records
from mechunlearn.experiments.measurements.context import BatteryContext
from mechunlearn.experiments.measurements.registry import MEASUREMENTS, BatteryResult, NoOptions
from mechunlearn.models.handle import HookedModel
from mechunlearn.report.columns import Column
from mechunlearn.tasks.records import FactRecord

COLUMNS = (
    Column("counterfact.score", "CounterFact score S", False, "side_effect"),
    Column(
        "side_effects.counterfact_neighborhood",
        "unrelated CounterFact neighbourhood score",
        False,
        "side_effect",
    ),
)


def counterfact_side_effect(
    hm: HookedModel, records: Sequence[FactRecord], batch_size: int
) -> float:
    """ROME's neighbourhood score on unrelated CounterFact facts: the share of their
    neighbourhood prompts where P(true) > P(new). An edit of other facts should not move it."""
    return rome_metrics(hm, records, batch_size=batch_size)["neighborhood_score"]


@MEASUREMENTS.register("counterfact", config=NoOptions, columns=COLUMNS, part="formats")
def measure_counterfact(ctx: BatteryContext, options: NoOptions, name: str) -> BatteryResult:
    """Whichever of the two applies to this run (nothing for other tasks without side-effect
    facts)."""
    out = BatteryResult()
    config, batch_size = ctx.config, ctx.config.evaluation.batch_size
    if config.task == "counterfact" and config.mode == "edit":
        per_record = rome_per_record(ctx.hm, ctx.sets.forget, batch_size=batch_size)
        for key, value in summarize_records(per_record).items():
            out.metrics[f"counterfact.{key}"] = value
        for key, values in per_record.items():
            out.per_fact[f"counterfact.{key}"] = values
    if ctx.counterfact_records:
        out.metrics["side_effects.counterfact_neighborhood"] = counterfact_side_effect(
            ctx.hm, ctx.counterfact_records, batch_size
        )
    return out
