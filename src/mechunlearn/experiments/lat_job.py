"""``mechunlearn run CONFIG`` for ``kind: lat``: targeted-LAT applications end to end
(Sheshadri et al. 2024, arXiv:2407.15549, Secs. 4.1-4.2).

Refusal, per seed: split the requests (held-out templates), then for every method train from
the base weights (fresh LoRA adapters unloaded afterwards, or the trained weights restored from
a ``WeightSnapshot``) and evaluate on the test split: refusal rate; compliance under a fresh
latent attack trained against the final model, the prefilling attack and an embedding-space
attack; benign compliance and loss.

Backdoor, per seed: install the backdoor by poisoned SFT, measure it with and without the
trigger on held-out requests and stop with a clear error when it did not install; then every
removal method trains on trigger-free data from the backdoored weights (reset in between) and
is evaluated: backdoor success with and without the trigger, benign compliance and loss.

Every result records its compute (seconds; forward/backward passes by kind), so each LAT
variant can be compared with its baseline (RT, SFT, DPO). The run is assembled in
``OUT.partial`` with one result file per (method, seed), written atomically when done; an
interrupted run resumes (``resume=True``) where it stopped, and a finished one is extended to
more seeds. Only a complete run is moved to ``OUT``. Input is validated before the model loads
(config, data files) or, for what needs the model (layers, tokenization), before anything is
written.
"""

from __future__ import annotations

import math
import os
import platform
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mechunlearn import __version__
from mechunlearn.attacks.latent import LatData, LatentAdversaryConfig, latent_attack
from mechunlearn.attacks.prefill import prefill_attack, prefill_examples
from mechunlearn.edit.data import TrainData
from mechunlearn.edit.lat import LatConfig, train_lat
from mechunlearn.edit.parametrization import WeightSnapshot, make_trainable
from mechunlearn.edit.trainer import TrainConfig, TrainResult, train
from mechunlearn.errors import ConfigError, DataError
from mechunlearn.evals.refusal import backdoor_success_rate, benign_compliance, refusal_rate
from mechunlearn.experiments.edit_job import _move_into_place
from mechunlearn.experiments.lat_config import LatExperimentConfig, MethodSpec, TrainableSpec
from mechunlearn.io import atomic_write_json, atomic_write_yaml
from mechunlearn.models.handle import HookedModel
from mechunlearn.models.loading import load_model
from mechunlearn.report.experiment import write_report
from mechunlearn.tasks.backdoor import poisoning_pairs, removal_data
from mechunlearn.tasks.refusal import (
    ChatItem,
    desired_pairs,
    load_preference_items,
    load_refusal_task,
    to_lat_data,
)

Log = Callable[[str], None]


# ---- data ------------------------------------------------------------------------------------
@dataclass
class SeedData:
    """One seed's data: LAT training examples and benign pairs; held-out test requests."""

    train: LatData
    benign: list[tuple[str, str]]
    test_items: list[ChatItem]  # refusal: harmful requests; backdoor: clean requests
    test_data: LatData  # the same requests as preference examples (chat-formatted)
    test_benign: LatData
    poison: list[tuple[str, str]] | None = None  # backdoor: the poisoning SFT pairs

    def sizes(self) -> dict[str, int]:
        out = {
            "train": len(self.train),
            "benign_train": len(self.benign),
            "test": len(self.test_items),
            "test_benign": len(self.test_benign),
        }
        if self.poison is not None:
            out["poison"] = len(self.poison)
        return out


def _cap(items: list[ChatItem], n: int | None, seed: int) -> list[ChatItem]:
    """A seeded subset of ``n`` items, in their original order (all when ``n`` is None)."""
    if n is None or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed * 7919 + 17).sample(range(len(items)), n))
    return [items[i] for i in keep]


def _split_file_items(
    items: list[ChatItem], fractions: Sequence[float], seed: int
) -> dict[str, list[ChatItem]]:
    """Seeded train / validation / test split of a preference file's rows."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fractions[1] * len(items)))
    n_test = max(1, round(fractions[2] * len(items)))
    if len(items) - n_val - n_test < 1:
        raise DataError(f"too few rows ({len(items)}) to split into train, validation and test")
    test = sorted(order[:n_test])
    val = sorted(order[n_test : n_test + n_val])
    train = sorted(order[n_test + n_val :])
    parts = {"train": train, "validation": val, "test": test}
    return {name: [items[i] for i in index] for name, index in parts.items()}


def load_file_items(config: LatExperimentConfig) -> list[ChatItem] | None:
    """The refusal preference file's rows (``DataError`` for missing columns / files)."""
    if config.data is None:
        return None
    opts = config.data_options
    items = load_preference_items(
        config.data, opts.prompt, opts.chosen, opts.rejected, opts.max_words, opts.limit
    )
    if len(items) < 3:
        raise DataError(f"{config.data}: {len(items)} rows; a split needs at least 3")
    return items


def seed_data(
    config: LatExperimentConfig, tokenizer: Any, seed: int, file_items: list[ChatItem] | None
) -> SeedData:
    """Build (and so check) one seed's data with the model's tokenizer."""
    opts, cap = config.data_options, config.evaluation.max_test
    task = load_refusal_task(seed, opts.fractions, opts.by)
    benign_train = task.benign["train"]
    benign_test = _cap(task.benign["test"], cap, seed)
    if config.application == "refusal":
        harmful = (
            _split_file_items(file_items, opts.fractions, seed)
            if file_items is not None
            else task.harmful
        )
        test = _cap(harmful["test"], cap, seed)
        data = SeedData(
            train=to_lat_data(tokenizer, harmful["train"]),
            benign=desired_pairs(tokenizer, benign_train),
            test_items=test,
            test_data=to_lat_data(tokenizer, test),
            test_benign=to_lat_data(tokenizer, benign_test),
        )
        if config.evaluation.prefill is not None:
            prefill_examples(tokenizer, test, config.evaluation.prefill)  # enough words?
        return data
    bd = config.backdoor.backdoor
    attack = removal_data(tokenizer, benign_test, bd)  # clean prompt -> response (unwanted)
    return SeedData(
        train=removal_data(tokenizer, benign_train, bd),
        benign=desired_pairs(tokenizer, benign_train),
        test_items=benign_test,
        test_data=attack,
        test_benign=to_lat_data(tokenizer, benign_test),
        poison=poisoning_pairs(tokenizer, benign_train, bd, seed),
    )


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
) -> tuple[dict[str, float], dict[str, Any], float]:
    """``(metrics, details, seconds)`` of the current model on the seed's held-out requests."""
    tick = time.perf_counter()
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
        bd = config.backdoor
        measured = backdoor_success_rate(
            hm,
            data.test_items,
            bd.backdoor.trigger,
            bd.backdoor.response,
            bd.backdoor.position,
            bd.greedy_tokens,
            ev.batch_size,
        )
        metrics.update(backdoor_metrics(measured, "backdoor"))
        details["backdoor"] = measured
    attacks = (
        ("latent_attack", ev.latent_attack, layers),
        ("embed_attack", ev.embedding_attack, ["embed"]),
    )
    for name, spec, default in attacks:
        if spec is not None:
            result = _attack(
                hm, data.test_data, spec.resolve(default), seed, ev.attack_batch_size, progress
            )
            metrics[f"{name}.success"] = result["success_rate_after"]
            metrics[f"{name}.success_before"] = result["success_rate_before"]
            metrics[f"{name}.argmax"] = result["after"]["argmax_rate"]
            metrics[f"{name}.toward_loss"] = result["after"]["toward_loss"]
            details[name] = {k: v for k, v in result.items() if k != "losses"}
            details[name]["final_losses"] = [batch[-1] for batch in result["losses"] if batch]
    if config.application == "refusal" and ev.prefill is not None:
        prefill = prefill_attack(hm, data.test_items, ev.prefill).to_json()
        metrics["prefill.success"] = prefill["compliance_rate"]
        metrics["prefill.baseline"] = prefill["baseline"]["rate"]
        metrics["prefill.rest_greedy"] = prefill["rest_greedy"]["rate"]
        details["prefill"] = prefill
    benign = benign_compliance(hm, data.test_benign, ev.batch_size)
    metrics["benign.compliance"] = benign["compliance"]["rate"]
    metrics["benign.loss"] = benign["benign_loss"]
    metrics["benign.refusal_greedy"] = benign["refusal_greedy"]["rate"]
    details["benign"] = benign
    return metrics, details, time.perf_counter() - tick


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
def _measure_method(
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
        metrics, details, eval_seconds = evaluate(hm, config, data, layers, seed, progress)
        out.update(defender_loss=None, lat_config=None, compute={"seconds": 0.0})
    else:
        lat_config = method.lat_config(config.train, layers, seed)
        with trained(hm, config.trainable, lat_config, data, progress, log) as (result, info):
            metrics, details, eval_seconds = evaluate(hm, config, data, layers, seed, progress)
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


def _result_path(partial: Path, method: str, seed: int) -> Path:
    return partial / "results" / method / f"seed{seed}.json"


def _refusal_seed(hm, config, data, layers, seed, partial, progress, log) -> None:
    for method in config.methods:
        path = _result_path(partial, method.name, seed)
        if path.is_file():
            continue
        log(f"seed {seed}: {method.name}")
        atomic_write_json(
            path, _measure_method(hm, config, method, data, layers, seed, progress, log)
        )


def install_backdoor(
    hm: HookedModel, config: LatExperimentConfig, data: SeedData, seed: int, progress: bool, log
) -> dict[str, Any]:
    """Poisoned SFT (kept in the weights: LoRA adapters are merged); returns the training
    record. The caller snapshots the weights before and restores them after the seed."""
    install = config.backdoor.install
    mode, components = install.trainable.resolve(hm.dims.n_layers)
    lora = install.trainable.lora.model_copy(update={"seed": seed}) if mode == "lora" else None
    trainable = make_trainable(hm, mode, components, lora)
    try:
        result = train(
            hm,
            trainable,
            TrainData(forget=list(data.poison or [])),
            TrainConfig(
                objective="edit",
                maintain_coef=0,
                lm_coef=0,
                steps=install.steps,
                lr=install.lr,
                batch_size=install.batch_size,
                schedule=install.schedule,
                seed=seed,
            ),
            progress=progress,
            log=log,
        )
        if mode == "lora":
            trainable.merge()
    finally:
        trainable.restore()
    return {
        "steps": result.steps,
        "seconds": round(result.seconds, 2),
        "mode": mode,
        "n_params": trainable.n_params,
        "final_loss": result.history["loss"][-1],
    }


def _backdoor_seed(hm, config, data, layers, seed, partial, progress, log) -> None:
    todo = [m for m in config.methods if not _result_path(partial, m.name, seed).is_file()]
    if not todo:
        return
    bd = config.backdoor
    original = WeightSnapshot(hm.model.parameters())
    try:
        log(f"seed {seed}: installing the backdoor ({bd.install.steps} steps)")
        install = install_backdoor(hm, config, data, seed, progress, log)
        measured = backdoor_success_rate(
            hm,
            data.test_items,
            bd.backdoor.trigger,
            bd.backdoor.response,
            bd.backdoor.position,
            bd.greedy_tokens,
            config.evaluation.batch_size,
        )
        rates = backdoor_metrics(measured, "install")
        installed = (
            rates["install.triggered"] >= bd.min_triggered
            and rates["install.clean"] <= bd.max_clean
        )
        record = {
            "seed": seed,
            "installed": installed,
            "train": install,
            "metrics": rates,
            "measured": measured,
            "min_triggered": bd.min_triggered,
            "max_clean": bd.max_clean,
        }
        atomic_write_json(partial / "install" / f"seed{seed}.json", record)
        log(
            f"seed {seed}: backdoor with trigger {rates['install.triggered']:.0%}, "
            f"without {rates['install.clean']:.0%} of held-out requests"
        )
        if not installed:
            raise ConfigError(
                f"seed {seed}: the backdoor did not install: with the trigger the response is "
                f"preferred on {rates['install.triggered']:.0%} of held-out requests (need >= "
                f"{bd.min_triggered:.0%}), without it on {rates['install.clean']:.0%} (need <= "
                f"{bd.max_clean:.0%}); raise backdoor.install.steps or lr "
                f"(measurement: {partial / 'install' / f'seed{seed}.json'})"
            )
        extra = {"install": {"train": install, "metrics": rates}}
        for method in todo:
            log(f"seed {seed}: {method.name}")
            result = _measure_method(
                hm, config, method, data, layers, seed, progress, log, extra=extra
            )
            atomic_write_json(_result_path(partial, method.name, seed), result)
    finally:
        original.restore()  # the next seed installs its backdoor into the original weights


# ---- the run ---------------------------------------------------------------------------------
def check_same_config(folder: Path, config: LatExperimentConfig) -> None:
    """Resuming is only meaningful with the same experiment (seeds may differ)."""
    saved = LatExperimentConfig.model_validate(yaml.safe_load((folder / "config.yaml").read_text()))
    if saved.model_dump(exclude={"seeds"}) != config.model_dump(exclude={"seeds"}):
        raise ConfigError(f"{folder} was run with another config; rerun without --resume")


def run_lat_experiment(
    config: LatExperimentConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Log = lambda _: None,
) -> Path:
    """Run ``config``; see the module docstring. Returns the final run folder."""
    out = Path(out)
    file_items = load_file_items(config)
    partial = out.with_name(out.name + ".partial")
    if resume and not partial.exists() and (out / "config.yaml").is_file():
        check_same_config(out, config)
        os.replace(out, partial)
    if resume and (partial / "config.yaml").is_file():
        check_same_config(partial, config)
    started = time.time()

    hm = load_model(config.model, device=config.device, dtype=config.dtype, log=log)
    n_layers = hm.dims.n_layers
    layers = config.check_model_layers(n_layers)
    seeds = {seed: seed_data(config, hm.tokenizer, seed, file_items) for seed in config.seeds}
    log(
        f"{config.application}: {len(config.methods)} methods x {len(config.seeds)} seeds; "
        f"adversary layers {layers} of {n_layers}; data {seeds[config.seeds[0]].sizes()}"
    )

    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    atomic_write_yaml(partial / "config.yaml", config.model_dump(mode="json"))
    run_seed = _refusal_seed if config.application == "refusal" else _backdoor_seed
    for seed, data in seeds.items():
        run_seed(hm, config, data, layers, seed, partial, progress, log)

    atomic_write_json(
        partial / "run.json",
        {
            "kind": "lat",
            "application": config.application,
            "name": config.name,
            "model": config.model,
            "n_layers": n_layers,
            "adversary_layers": layers,
            "methods": [m.name for m in config.methods],
            "baselines": {m.name: config.baseline_of(m) for m in config.methods},
            "seconds": round(time.time() - started, 1),
            "mechunlearn": __version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(hm.device),
            "python": platform.python_version(),
        },
    )
    write_report(partial)
    _move_into_place(partial, out)
    return out
