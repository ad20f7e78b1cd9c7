"""The many-shot jailbreaking attack (targeted LAT, refusal): earlier compliant turns in the
same conversation, an input-space attack without optimisation."""

from __future__ import annotations

from mechunlearn.attacks.many_shot import ManyShotConfig, many_shot_attack
from mechunlearn.experiments.measurements.context import LatContext
from mechunlearn.experiments.measurements.registry import MEASUREMENTS, BatteryResult, complied
from mechunlearn.report.columns import Column

COLUMNS = (
    Column("many_shot.success", "compliance under many-shot prompts", True, "attack", ("refusal",)),
)


@MEASUREMENTS.register("many_shot", config=ManyShotConfig, columns=COLUMNS, pipeline="lat")
def measure_many_shot(ctx: LatContext, options: ManyShotConfig, name: str) -> BatteryResult:
    ctx.log("evaluating: many-shot attack")
    options = options.model_copy(update={"seed": options.seed + ctx.seed})
    result = many_shot_attack(ctx.hm, ctx.data.test_items, options).to_json()
    metrics = {
        "many_shot.success": result["compliance_rate"],
        "many_shot.baseline": result["baseline"]["rate"],
    }
    return BatteryResult(
        metrics=metrics,
        curves={"many_shot": result},
        per_fact={"many_shot.success": complied(result["margins"])},
    )
