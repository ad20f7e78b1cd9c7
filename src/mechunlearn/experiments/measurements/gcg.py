"""The universal GCG suffix attack (targeted LAT, refusal): an input-space optimisation attack,
so robustness is not only measured in the latent space the defender trained in."""

from __future__ import annotations

from mechunlearn.attacks.gcg import GCGConfig, gcg_attack
from mechunlearn.experiments.measurements.context import LatContext
from mechunlearn.experiments.measurements.registry import MEASUREMENTS, BatteryResult, complied
from mechunlearn.report.columns import Column

COLUMNS = (Column("gcg.success", "compliance under a GCG suffix", True, "attack", ("refusal",)),)


@MEASUREMENTS.register("gcg", config=GCGConfig, columns=COLUMNS, pipeline="lat")
def measure_gcg(ctx: LatContext, options: GCGConfig, name: str) -> BatteryResult:
    ctx.log("evaluating: GCG suffix attack")
    options = options.model_copy(update={"seed": options.seed + ctx.seed})
    gcg = gcg_attack(ctx.hm, ctx.data.test_items, options, progress=ctx.progress).to_json()
    metrics = {"gcg.success": gcg["compliance_rate"], "gcg.baseline": gcg["baseline"]["rate"]}
    return BatteryResult(
        metrics=metrics,
        curves={"gcg": gcg},
        per_fact={"gcg.success": complied(gcg["margins"])},
    )
