"""Train one method of a targeted-LAT experiment from the current weights and measure it:
refusal and benign rates, fresh latent / prefilling / embedding attacks, backdoor rates, and
the compute it used (seconds, forward/backward passes)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from mechunlearn.attacks.latent import latent_attack
from mechunlearn.attacks.prefill import prefill_attack
from mechunlearn.edit.lat import LatConfig, train_lat
from mechunlearn.edit.latent_adversary import LatentAdversaryConfig
from mechunlearn.edit.parametrization import WeightSnapshot, make_trainable
from mechunlearn.edit.trainer import TrainResult
from mechunlearn.evals.refusal import backdoor_success_rate, benign_compliance, refusal_rate
from mechunlearn.experiments.lat_config import LatExperimentConfig, MethodSpec, TrainableSpec
from mechunlearn.experiments.lat_data import SeedData
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.preference import LatData

Log = Callable[[str], None]


# ---- training --------------------------------------------------------------------------------
@contextmanager
def trained(
    hm: HookedModel,
    spec: TrainableSpec,
    lat_config: LatConfig,
    data: SeedData,
    progress: bool,
    log: Log,
) -> Iterator[tuple[TrainResult, dict[str, Any]]]:
    """Train with ``lat_config`` inside the block; afterwards the model is as before (LoRA
    adapters unloaded without merging, trained weights restored)."""
    mode, components = spec.resolve(hm.dims.n_layers)
    lora = spec.lora.model_copy(update={"seed": lat_config.seed}) if mode == "lora" else None
    trainable = make_trainable(hm, mode, components, lora)
    snapshot = WeightSnapshot(trainable.params) if mode != "lora" else None
    try:
        tick = time.perf_counter()
        result = train_lat(
            hm, trainable, data.train, data.benign, lat_config, progress=progress, log=log
        )
        info = {
            "mode": mode,
            "components": components,
            "n_params": trainable.n_params,
            "wall_seconds": time.perf_counter() - tick,  # with setup (tokenizing, references)
        }
        yield result, info
    finally:
        trainable.restore()
        if snapshot is not None:
            snapshot.restore()


def compute_record(
    result: TrainResult, config: LatConfig, data: SeedData, mode: str, wall_seconds: float
) -> dict[str, Any]:
    """Seconds and passes of one training run. A pass is one forward (and backward) over a
    batch: the adversary's PGD steps, the defender's steps on the LAT batch (its rows hold the
    completions the loss reads), the benign term's steps, and no-grad reference forwards.
    ``seconds`` is the whole ``train_lat`` call (setup and references included),
    ``loop_seconds`` its training steps."""
    coefs = result.info.get("coefs", {})
    steps, k = config.steps, config.defender_steps
    adversary = config.adversary
    adv = steps * adversary.steps if adversary is not None else 0
    measure = steps if adversary is not None and adversary.epsilon_mode == "relative" else 0
    benign = steps * k if "benign" in coefs else 0
    reference = 0
    if "benign" in coefs and config.benign == "kl":
        reference += (
            benign if mode == "lora" else math.ceil(len(data.benign) / config.benign_batch_size)
        )
    reference += int(result.info.get("reference_forwards", 0))  # DPO
    adv_seconds = sum(result.history.get("adv_seconds", []))
    return {
        "seconds": round(wall_seconds, 3),
        "loop_seconds": round(result.seconds, 3),
        "adversary_seconds": round(adv_seconds, 3),
        "defender_seconds": round(result.seconds - adv_seconds, 3),
        "steps": steps,
        "optimizer_steps": steps * k,
        "passes": {
            "adversary_fwd_bwd": adv,
            "adversary_norm_fwd": measure,
            "defender_fwd_bwd": steps * k,
            "benign_fwd_bwd": benign,
            "reference_fwd": reference,
        },
        "fwd_bwd_passes": adv + steps * k + benign,
        "forward_passes": adv + measure + steps * k + benign + reference,
    }


# ---- evaluation ------------------------------------------------------------------------------
def _attack(
    hm: HookedModel,
    data: LatData,
    attack: LatentAdversaryConfig,
    seed: int,
    batch_size: int,
    progress: bool,
) -> dict[str, Any]:
    result = latent_attack(hm, data, attack, seed=seed, batch_size=batch_size, progress=progress)
    return result.to_json()


def evaluate(
    hm: HookedModel,
    config: LatExperimentConfig,
    data: SeedData,
    layers: list,
    seed: int,
    progress: bool,
    log: Log = lambda _: None,
) -> tuple[dict[str, float], dict[str, Any], float]:
    """``(metrics, details, seconds)`` of the current model on the seed's held-out requests."""
    tick = time.perf_counter()
    log(f"evaluating: {config.application}")
    ev = config.evaluation
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    if config.application == "refusal":
        refusal = refusal_rate(hm, data.test_data, ev.batch_size)
        metrics["refusal.rate"] = refusal["refusal"]["rate"]
        metrics["refusal.margin"] = refusal["margin"]["rate"]
        metrics["refusal.compliant_greedy"] = refusal["compliant_greedy"]["rate"]
        metrics["refusal.refusal_loss"] = refusal["refusal_loss"]
        details["refusal"] = refusal
    else:
        measured = measure_backdoor(hm, config, data)
        metrics.update(backdoor_metrics(measured, "backdoor"))
        details["backdoor"] = measured
    attacks = (
        ("latent_attack", ev.latent_attack, layers),
        ("embed_attack", ev.embedding_attack, ["embed"]),
    )
    for name, spec, default in attacks:
        if spec is not None:
            log(f"evaluating: {name.replace('_', ' ')}")
            result = _attack(
                hm, data.test_data, spec.resolve(default), seed, ev.attack_batch_size, progress
            )
            metrics[f"{name}.success"] = result["success_rate_after"]
            metrics[f"{name}.success_before"] = result["success_rate_before"]
            metrics[f"{name}.argmax"] = result["after"]["argmax_rate"]
            metrics[f"{name}.toward_loss"] = result["after"]["toward_loss"]
            details[name] = {k: v for k, v in result.items() if k != "losses"}
            details[name]["final_losses"] = [batch[-1] for batch in result["losses"] if batch]
            for eps in spec.curve_epsilons:
                log(f"evaluating: {name.replace('_', ' ')} at epsilon {eps:g}")
                attack = spec.resolve(default).model_copy(update={"epsilon": eps})
                point = _attack(hm, data.test_data, attack, seed, ev.attack_batch_size, progress)
                metrics[f"{name}.success@{eps:g}"] = point["success_rate_after"]
    if config.application == "refusal" and ev.prefill is not None:
        log("evaluating: prefilling attack")
        prefill = prefill_attack(hm, data.test_items, ev.prefill).to_json()
        metrics["prefill.success"] = prefill["compliance_rate"]
        metrics["prefill.baseline"] = prefill["baseline"]["rate"]
        metrics["prefill.rest_greedy"] = prefill["rest_greedy"]["rate"]
        details["prefill"] = prefill
    log("evaluating: benign requests")
    benign = benign_compliance(hm, data.test_benign, ev.batch_size)
    metrics["benign.compliance"] = benign["compliance"]["rate"]
    metrics["benign.loss"] = benign["benign_loss"]
    metrics["benign.refusal_greedy"] = benign["refusal_greedy"]["rate"]
    details["benign"] = benign
    return metrics, details, time.perf_counter() - tick


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


# ---- one (method, seed) ----------------------------------------------------------------------
def measure_method(
    hm: HookedModel,
    config: LatExperimentConfig,
    method: MethodSpec,
    data: SeedData,
    layers: list,
    seed: int,
    progress: bool,
    log: Log,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``method`` (if it trains), evaluate, undo the training; the result record."""
    out: dict[str, Any] = {
        "method": method.name,
        "seed": seed,
        "application": config.application,
        "trained": method.train,
        "adversary": method.adversary,
        "baseline": config.baseline_of(method),
        "data": data.sizes(),
        **(extra or {}),
    }
    if not method.train:
        metrics, details, eval_seconds = evaluate(hm, config, data, layers, seed, progress, log)
        out.update(defender_loss=None, lat_config=None, compute={"seconds": 0.0})
    else:
        lat_config = method.lat_config(config.train, layers, seed)
        with trained(hm, config.trainable, lat_config, data, progress, log) as (result, info):
            metrics, details, eval_seconds = evaluate(hm, config, data, layers, seed, progress, log)
        compute = compute_record(result, lat_config, data, info["mode"], info["wall_seconds"])
        out.update(
            defender_loss=lat_config.defender_loss,
            lat_config=lat_config.model_dump(mode="json"),
            trainable=info,
            train={
                "steps": result.steps,
                "seconds": round(result.seconds, 2),
                "info": result.info,
                "final": {k: v[-1] for k, v in result.history.items() if v},
                "history": result.history,
            },
            compute=compute,
        )
        metrics["compute.train_seconds"] = compute["seconds"]
        metrics["compute.fwd_bwd_passes"] = compute["fwd_bwd_passes"]
        metrics["compute.adversary_seconds"] = compute["adversary_seconds"]
    out["eval_seconds"] = round(eval_seconds, 2)
    out["metrics"] = metrics
    out["details"] = details
    return out
