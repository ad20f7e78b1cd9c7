"""The soft-prompt attack (``soft_prompt`` part): a trained prompt prefix that tries to bring
the original answers back; the model's weights are not changed."""

from __future__ import annotations

from mechunlearn.attacks.soft_prompt import SoftPromptConfig, soft_prompt_attack
from mechunlearn.experiments.measurements.context import BatteryContext
from mechunlearn.experiments.measurements.registry import MEASUREMENTS, BatteryResult
from mechunlearn.report.columns import Column

COLUMNS = (
    Column("soft_prompt.accuracy_after", "after soft prompt: acc (held-out)", True, "attack"),
)


@MEASUREMENTS.register("soft_prompt", config=SoftPromptConfig, columns=COLUMNS, trains=True)
def measure_soft_prompt(ctx: BatteryContext, options: SoftPromptConfig, name: str) -> BatteryResult:
    """Accuracy and P(true) on the forget facts before and after the attack."""
    out = BatteryResult()
    ctx.log("soft-prompt attack")
    soft = soft_prompt_attack(
        ctx.hm, ctx.sets.forget, options, seed=ctx.seed, progress=ctx.progress
    ).to_json()
    out.curves["soft_prompt"] = soft
    for key in ("accuracy_before", "accuracy_after", "p_true_before", "p_true_after"):
        if key in soft:
            out.metrics[f"soft_prompt.{key}"] = soft[key]
    return out
