"""The prefilling attack (targeted LAT, refusal): the answer is started with a compliant
prefix; does the model go on complying?"""

from __future__ import annotations

from mechunlearn.attacks.prefill import PrefillConfig, prefill_attack
from mechunlearn.experiments.measurements.context import LatContext
from mechunlearn.experiments.measurements.registry import MEASUREMENTS, BatteryResult, complied
from mechunlearn.report.columns import Column

COLUMNS = (Column("prefill.success", "compliance under prefilling", True, "attack", ("refusal",)),)


@MEASUREMENTS.register("prefill", config=PrefillConfig, columns=COLUMNS, pipeline="lat")
def measure_prefill(ctx: LatContext, options: PrefillConfig, name: str) -> BatteryResult:
    ctx.log("evaluating: prefilling attack")
    prefill = prefill_attack(ctx.hm, ctx.data.test_items, options).to_json()
    metrics = {
        "prefill.success": prefill["compliance_rate"],
        "prefill.baseline": prefill["baseline"]["rate"],
        "prefill.rest_greedy": prefill["rest_greedy"]["rate"],
    }
    return BatteryResult(
        metrics=metrics,
        curves={"prefill": prefill},
        per_fact={"prefill.success": complied(prefill["margins"])},
    )
