"""Train one method of a targeted-LAT experiment from the current weights and measure it with
the registered LAT measurements (``experiments.measurements``: refusal and benign rates, fresh
latent / prefilling / embedding attacks, backdoor rates), and the compute it used (seconds,
forward/backward passes)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mechunlearn.edit.lat import LatConfig, train_lat
from mechunlearn.edit.parametrization import WeightSnapshot, make_trainable
from mechunlearn.edit.trainer import TrainResult
from mechunlearn.errors import DataError
from mechunlearn.evals.refusal import benign_compliance
from mechunlearn.experiments import calibration
from mechunlearn.experiments.lat_config import LatExperimentConfig, MethodSpec, TrainableSpec
from mechunlearn.experiments.lat_data import SeedData
from mechunlearn.experiments.measurements import BatteryResult, LatContext, plan
from mechunlearn.io import atomic_write_json, read_json
from mechunlearn.models.handle import HookedModel
from mechunlearn.report.columns import EVAL_SECONDS

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
def evaluate(
    hm: HookedModel,
    config: LatExperimentConfig,
    data: SeedData,
    layers: list,
    seed: int,
    progress: bool,
    log: Log = lambda _: None,
) -> tuple[BatteryResult, float]:
    """``(result, seconds)`` of the current model on the seed's held-out requests: every
    measurement the config asks for (``LatEvaluation.measurement_options``), each one's wall
    time in ``compute.eval_seconds.<name>`` (the attacks cost most of a run's time on a CPU)."""
    tick = time.perf_counter()
    log(f"evaluating: {config.application}")
    ctx = LatContext(hm, seed, progress, log, config=config, data=data, layers=layers)
    out = BatteryResult()
    for entry in plan(config.evaluation.measurement_options(config.application), "lat"):
        started = time.perf_counter()
        out.update(entry.measurement.run(ctx, entry.options, entry.name))
        out.metrics[f"{EVAL_SECONDS}.{entry.name}"] = round(time.perf_counter() - started, 3)
    return out, time.perf_counter() - tick


# ---- matched benign compliance ----------------------------------------------------------------
def closest_to_target(tried: list[dict[str, float]], target: float) -> float:
    """The ``benign_coef`` whose validation compliance is closest to ``target`` (ties: the
    smaller coefficient, the weaker pull toward the benign data)."""
    return calibration.closest_to_target(tried, target, "benign_coef", "validation_compliance")


def next_benign_coef(tried: list[dict[str, float]], target: float) -> float | None:
    """The next ``benign_coef`` to try when refining (``calibration.next_bracketing_value``)."""
    return calibration.next_bracketing_value(tried, target, "benign_coef", "validation_compliance")


def match_benign(
    hm: HookedModel,
    config: LatExperimentConfig,
    method: MethodSpec,
    data: SeedData,
    layers: list,
    seed: int,
    progress: bool,
    log: Log,
    trials_path: Path | None = None,
) -> dict[str, Any]:
    """Train ``method`` at each ``match_benign.values`` benign coefficient (then ``refine``
    bisection steps) and measure benign compliance on the validation requests; the record names
    the value closest to the target (training undone after each try). ``trials_path``: a log of
    finished tries, written after each one, so an interrupted calibration (each try is a full
    training) resumes without redoing them; tries logged for another seed or validation set are
    ignored."""
    spec = method.match_benign
    if data.benign_validation is None or not len(data.benign_validation):
        raise DataError(f"method {method.name!r}: no validation benign requests to match on")
    key = {"seed": seed, "n_validation": len(data.benign_validation)}
    logged: dict[float, dict[str, float]] = {}
    if trials_path is not None and trials_path.is_file():
        record = read_json(trials_path)
        if {k: record.get(k) for k in key} == key:
            logged = {t["benign_coef"]: t for t in record["tried"]}
    tried: list[dict[str, float]] = []

    def attempt(value: float) -> None:
        if value in logged:
            tried.append(logged[value])
            return
        trial = method.model_copy(update={"benign_coef": value, "match_benign": None})
        lat_config = trial.lat_config(config.train, layers, seed)
        log(f"{method.name}: matching benign compliance, benign_coef {value:g}")
        with trained(hm, config.trainable, lat_config, data, progress, log) as (_, info):
            benign = benign_compliance(hm, data.benign_validation, config.evaluation.batch_size)
        tried.append(
            {
                "benign_coef": value,
                "validation_compliance": benign["compliance"]["rate"],
                "seconds": round(info["wall_seconds"], 3),
            }
        )
        if trials_path is not None:
            atomic_write_json(trials_path, {**key, "tried": tried})

    for value in spec.values:
        attempt(value)
    for _ in range(spec.refine):
        value = next_benign_coef(tried, spec.target)
        if value is None:
            break
        attempt(value)
    return {
        "seed": seed,
        "target": spec.target,
        "tried": tried,
        "chosen": closest_to_target(tried, spec.target),
        "n_validation": len(data.benign_validation),
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
    calibration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train ``method`` (if it trains), evaluate, undo the training; the result record.
    ``calibration``: a ``match_benign`` record made on another seed, used instead of
    calibrating on this one."""
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
    if method.match_benign is not None:
        if calibration is None:
            calibration = match_benign(hm, config, method, data, layers, seed, progress, log)
        out["calibration"] = calibration
        method = method.model_copy(
            update={"benign_coef": calibration["chosen"], "match_benign": None}
        )
    if not method.train:
        measured, eval_seconds = evaluate(hm, config, data, layers, seed, progress, log)
        out.update(defender_loss=None, lat_config=None, compute={"seconds": 0.0})
    else:
        lat_config = method.lat_config(config.train, layers, seed)
        with trained(hm, config.trainable, lat_config, data, progress, log) as (result, info):
            measured, eval_seconds = evaluate(hm, config, data, layers, seed, progress, log)
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
        measured.metrics["compute.train_seconds"] = compute["seconds"]
        measured.metrics["compute.fwd_bwd_passes"] = compute["fwd_bwd_passes"]
        measured.metrics["compute.adversary_seconds"] = compute["adversary_seconds"]
    out["eval_seconds"] = round(eval_seconds, 2)
    out["metrics"] = measured.metrics
    out["details"] = measured.curves
    out["per_request"] = measured.per_fact  # {metric: {request index: 0/1}}, for paired CIs
    return out
