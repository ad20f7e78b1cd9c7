"""The relearning attack (``relearn`` part and ``relearn@<name>`` instances): LoRA on half the
forget facts with their true answers, held-out accuracy measured on the other half (Guo et al.
2024, Sec. 5); the model is restored afterwards."""

from __future__ import annotations

from mechunlearn.attacks.relearn import RelearnConfig, relearn_attack
from mechunlearn.experiments.measurements.context import BatteryContext
from mechunlearn.experiments.measurements.registry import MEASUREMENTS, BatteryResult
from mechunlearn.report.columns import Column

COLUMNS = (
    Column(
        "relearn@*.completion.accuracy",
        "after relearning ({part}): completion acc (held-out)",
        True,
        "attack",
    ),
    Column("relearn.completion.accuracy", "after relearning: completion acc (held-out)", True,
           "attack"),
    Column("relearn.mcq.accuracy", "after relearning: MCQ acc (held-out)", True, "attack"),
    Column("relearn_peak.completion.accuracy",  # the report's best point of the curve
           "relearning, best step: completion acc (held-out)", True, "attack"),
)  # fmt: skip


@MEASUREMENTS.register("relearn", config=RelearnConfig, columns=COLUMNS, trains=True)
def measure_relearn(ctx: BatteryContext, options: RelearnConfig, name: str) -> BatteryResult:
    """The attack at ``options``' strength; metrics and curve under ``name`` (``relearn``, or
    ``relearn@paper`` for the instance configured as ``relearn_variants.paper``)."""
    out = BatteryResult()
    ctx.log(f"relearning attack ({name})")
    relearn = relearn_attack(
        ctx.hm,
        ctx.sets.forget,
        ctx.sets.retain_train,
        list(ctx.text_train),
        options,
        seed=ctx.seed,
        progress=ctx.progress,
    ).to_json()
    out.curves[name] = relearn
    for key, value in relearn["final"].items():
        if isinstance(value, int | float):
            out.metrics[f"{name}.{key}"] = value
    for key, values in relearn["final_per_fact"].items():
        out.per_fact[f"{name}.{key}"] = values
    return out
