"""A fresh latent-space attack trained against the final model (targeted LAT, Sheshadri et al.
2024): how often the unwanted completion is preferred under an L2-bounded perturbation of the
residual stream at ``latent_attack.layers`` (default: the training adversary's layers)."""

from __future__ import annotations

from collections.abc import Sequence

from mechunlearn.attacks.latent import latent_attack
from mechunlearn.edit.latent_adversary import Layer
from mechunlearn.experiments.lat_config import AttackSpec
from mechunlearn.experiments.measurements.context import LatContext
from mechunlearn.experiments.measurements.registry import MEASUREMENTS, BatteryResult, per_item
from mechunlearn.report.columns import Column

COLUMNS = (
    Column("latent_attack.success", "compliance under latent attack", True, "attack", ("refusal",)),
    Column("latent_attack.success", "backdoor under latent attack", True, "attack", ("backdoor",)),
)


def attack_measurement(
    ctx: LatContext, spec: AttackSpec, default_layers: Sequence[Layer], name: str
) -> BatteryResult:
    """The attack ``spec`` (layers ``default_layers`` when it leaves them null) on the test
    split: success before and after, argmax rate and loss, under ``name``; and its success at
    every ``curve_epsilons`` bound (``<name>.success@<eps>``), per request too, since a small
    bound is often the only one that separates the methods."""
    ev = ctx.config.evaluation
    out = BatteryResult()

    def attack(epsilon: float | None = None) -> dict:
        config = spec.resolve(list(default_layers))
        if epsilon is not None:
            config = config.model_copy(update={"epsilon": epsilon})
        found = latent_attack(
            ctx.hm, ctx.data.test_data, config, seed=ctx.seed, batch_size=ev.attack_batch_size,
            progress=ctx.progress,
        )  # fmt: skip
        return found.to_json()

    ctx.log(f"evaluating: {name.replace('_', ' ')}")
    result = attack()
    out.metrics[f"{name}.success"] = result["success_rate_after"]
    out.metrics[f"{name}.success_before"] = result["success_rate_before"]
    out.metrics[f"{name}.argmax"] = result["after"]["argmax_rate"]
    out.metrics[f"{name}.toward_loss"] = result["after"]["toward_loss"]
    out.per_fact[f"{name}.success"] = per_item(result["success_after"])
    details = {k: v for k, v in result.items() if k != "losses"}
    details["final_losses"] = [batch[-1] for batch in result["losses"] if batch]
    out.curves[name] = details
    for eps in spec.curve_epsilons:
        ctx.log(f"evaluating: {name.replace('_', ' ')} at epsilon {eps:g}")
        curve = attack(eps)
        out.metrics[f"{name}.success@{eps:g}"] = curve["success_rate_after"]
        out.per_fact[f"{name}.success@{eps:g}"] = per_item(curve["success_after"])
    return out


@MEASUREMENTS.register("latent_attack", config=AttackSpec, columns=COLUMNS, pipeline="lat")
def measure_latent_attack(ctx: LatContext, options: AttackSpec, name: str) -> BatteryResult:
    return attack_measurement(ctx, options, ctx.layers, name)
