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

The work runs as units of ``experiments.workers`` (``workers`` processes, one torch thread
each), one unit per (method, seed). Refusal: after the method's calibration unit when it
matches benign compliance, once on the first seed (``match_benign.per_seed: false``) or on
every seed (a unit per seed). Backdoor: after the seed's
installation unit, which saves the backdoored weights (``units/backdoor``, deleted at the end)
for the seed's removal units to start from. A unit's result does not depend on which process
ran it: its data come from the seed, its RNGs from its key (the installation from the seed),
and it starts from the loaded (or backdoored) weights.
"""

from __future__ import annotations

import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechunlearn import __version__
from mechunlearn.edit.data import TrainData
from mechunlearn.edit.parametrization import (
    WeightSnapshot,
    make_trainable,
    save_weights,
    swapped_in,
)
from mechunlearn.edit.trainer import TrainConfig, train
from mechunlearn.errors import ConfigError
from mechunlearn.experiments.config import read_yaml_mapping
from mechunlearn.experiments.lat_config import LatExperimentConfig, MethodSpec
from mechunlearn.experiments.lat_data import SeedData, load_file_items, seed_data
from mechunlearn.experiments.lat_measure import match_benign, measure_method
from mechunlearn.experiments.measurements import MEASUREMENTS
from mechunlearn.experiments.measurements.backdoor import backdoor_metrics, measure_backdoor
from mechunlearn.experiments.run_folder import RunFolder
from mechunlearn.experiments.workers import Unit, record_part, run_units
from mechunlearn.io import atomic_write_json, read_json
from mechunlearn.models.handle import HookedModel
from mechunlearn.models.loading import load_model
from mechunlearn.report.experiment import write_report

Log = Callable[[str], None]


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


BACKDOOR_WEIGHTS = Path("units") / "backdoor"
"""Where each seed's backdoored weights wait for its removal units (deleted when the run ends)."""


def _backdoor_weights(folder: Path, seed: int) -> Path:
    return folder / BACKDOOR_WEIGHTS / f"seed{seed}.safetensors"


def backdoor_seed(ctx: LatRunContext, seed: int) -> dict[str, Any]:
    """Install the seed's backdoor into the loaded weights, measure it on the held-out
    requests, and save the backdoored weights for the seed's removal units; the install record.
    The weights are restored afterwards; the installation is seeded (the same backdoor in any
    process), and one that did not install is an error that names its measurement."""
    hm, config, folder = ctx.hm, ctx.config, ctx.folder
    data, bd = ctx.seed_data(seed), ctx.config.backdoor
    original = WeightSnapshot(hm.model.parameters())
    try:
        ctx.log(f"seed {seed}: installing the backdoor ({bd.install.steps} steps)")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            install = install_backdoor(hm, config, data, seed, ctx.progress, ctx.log)
        measured = measure_backdoor(hm, config, data)
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
        record_path = folder / "install" / f"seed{seed}.json"
        atomic_write_json(record_path, record)
        ctx.log(
            f"seed {seed}: backdoor with trigger {rates['install.triggered']:.0%}, "
            f"without {rates['install.clean']:.0%} of held-out requests"
        )
        if not installed:
            raise ConfigError(
                f"seed {seed}: the backdoor did not install: with the trigger the response is "
                f"preferred on {rates['install.triggered']:.0%} of held-out requests (need >= "
                f"{bd.min_triggered:.0%}), without it on {rates['install.clean']:.0%} (need <= "
                f"{bd.max_clean:.0%}); raise backdoor.install.steps or lr "
                f"(measurement: {record_path})"
            )
        save_weights(hm, None, _backdoor_weights(folder, seed))
        return record
    finally:
        original.restore()


def _removal(ctx: LatRunContext, method: MethodSpec, seed: int) -> dict[str, Any]:
    """One removal method from the seed's backdoored weights (installed again when a resumed
    run no longer has them), restored afterwards."""
    weights = _backdoor_weights(ctx.folder, seed)
    if not weights.is_file():
        backdoor_seed(ctx, seed)
    record = read_json(ctx.folder / "install" / f"seed{seed}.json")
    extra = {"install": {"train": record["train"], "metrics": record["metrics"]}}
    with swapped_in(ctx.hm, weights):
        return measure_method(
            ctx.hm, ctx.config, method, ctx.seed_data(seed), ctx.layers, seed, ctx.progress,
            ctx.log, extra=extra,
        )  # fmt: skip


# ---- units ---------------------------------------------------------------------------------
@dataclass
class LatRunContext:
    """A process's view of a LAT run: the model (loaded once per process), the config, the
    adversary's layers and the data file's requests; each seed's data built on first use."""

    folder: Path
    config: LatExperimentConfig
    hm: HookedModel
    layers: list[Any]
    file_items: Any
    progress: bool = False
    log: Log = lambda _: None
    seeds: dict[int, SeedData] = field(default_factory=dict)

    def seed_data(self, seed: int) -> SeedData:
        if seed not in self.seeds:
            self.seeds[seed] = seed_data(self.config, self.hm.tokenizer, seed, self.file_items)
        return self.seeds[seed]


def lat_worker_context(folder: Path) -> LatRunContext:
    """A worker process's context, from the run folder's saved config (module level, so
    spawned processes can unpickle it)."""
    config = LatExperimentConfig.model_validate(read_yaml_mapping(folder / "config.yaml"))
    hm = load_model(config.model, device=config.device, dtype=config.dtype)
    layers = config.check_model_layers(hm.dims.n_layers)
    return LatRunContext(folder, config, hm, layers, load_file_items(config))


def _calibrated_once(config: LatExperimentConfig) -> list[str]:
    """The methods whose ``match_benign`` calibrates on the first seed only."""
    return [m.name for m in config.methods if m.match_benign and not m.match_benign.per_seed]


def calibration_stem(config: LatExperimentConfig, method: str, seed: int) -> str:
    """``calibration/<stem>.json`` (and ``<stem>.trials.json``) of ``method``'s refusal
    calibration that trains ``seed``: ``<method>`` when it calibrates once on the first seed,
    ``<method>.seed<k>`` when it calibrates on every seed."""
    return method if method in _calibrated_once(config) else f"{method}.seed{seed}"


def plan_lat_units(config: LatExperimentConfig) -> list[Unit]:
    """A unit per (method, seed), its result file. Refusal: after the method's calibration
    unit (``calibration/<stem>.json``) when it matches benign compliance: one on the first
    seed (``match_benign.per_seed: false``) or one per seed, each a unit of its own so that
    calibrations run in parallel and resume; backdoor: after the seed's installation unit (its
    record, ``install/seed<n>.json``; a removal method calibrates inside its unit, on the
    seed's backdoored model)."""
    if config.application == "refusal":
        once = _calibrated_once(config)
        matched = [m.name for m in config.methods if m.match_benign]

        def calibrate_key(method: str, seed: int) -> str:
            return f"calibrate/{method}" if method in once else f"calibrate/{method}/seed{seed}"

        first = [
            Unit(calibrate_key(name, seed), "calibrate", f"calibration/{stem}.json",
                 params={"method": name, "seed": seed, "stem": stem})
            for name in matched
            for seed in (config.seeds[:1] if name in once else config.seeds)
            for stem in (calibration_stem(config, name, seed),)
        ]  # fmt: skip

        def deps(method: str, seed: int) -> tuple[str, ...]:
            return (calibrate_key(method, seed),) if method in matched else ()
    else:
        first = [
            Unit(f"install/seed{seed}", "install", f"install/seed{seed}.json",
                 params={"seed": seed})
            for seed in config.seeds
        ]  # fmt: skip

        def deps(method: str, seed: int) -> tuple[str, ...]:
            return (f"install/seed{seed}",)

    return first + [
        Unit(
            f"{method.name}/seed{seed}",
            "method",
            f"results/{method.name}/seed{seed}.json",
            params={"method": method.name, "seed": seed},
            deps=deps(method.name, seed),
        )
        for seed in config.seeds
        for method in config.methods
    ]


def execute_lat_unit(ctx: LatRunContext, unit: Unit) -> dict[str, Any]:
    """Compute one unit of ``plan_lat_units`` (see ``experiments.workers``)."""
    seed = unit.params["seed"]
    data = ctx.seed_data(seed)
    config = ctx.config
    if unit.kind == "install":
        return backdoor_seed(ctx, seed)
    method = next(m for m in config.methods if m.name == unit.params["method"])
    if config.application == "backdoor":
        ctx.log(f"seed {seed}: {method.name}")
        return _removal(ctx, method, seed)
    args = (ctx.hm, config, method, data, ctx.layers, seed, ctx.progress, ctx.log)
    if unit.kind == "calibrate":
        ctx.log(f"{method.name}: matching benign compliance on seed {seed}")
        trials = ctx.folder / "calibration" / f"{unit.params['stem']}.trials.json"
        return match_benign(*args, trials_path=trials)
    ctx.log(f"seed {seed}: {method.name}")
    calibration = None
    if method.match_benign is not None:
        stem = calibration_stem(config, method.name, seed)
        calibration = read_json(ctx.folder / "calibration" / f"{stem}.json")
    return measure_method(*args, calibration=calibration)


# ---- the run ---------------------------------------------------------------------------------
def run_lat_experiment(
    config: LatExperimentConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    workers: int = 1,
    log: Log = lambda _: None,
) -> Path:
    """Run ``config`` on ``workers`` processes; see the module docstring. Returns the final
    run folder."""
    file_items = load_file_items(config)
    run = RunFolder(out, config, resume=resume, ignore=frozenset({"seeds"}))
    run.check()
    started = time.time()

    hm = load_model(config.model, device=config.device, dtype=config.dtype, log=log)
    n_layers = hm.dims.n_layers
    layers = config.check_model_layers(n_layers)
    seeds = {seed: seed_data(config, hm.tokenizer, seed, file_items) for seed in config.seeds}
    log(
        f"{config.application}: {len(config.methods)} methods x {len(config.seeds)} seeds; "
        f"adversary layers {layers} of {n_layers}; data {seeds[config.seeds[0]].sizes()}"
    )

    partial = run.open(started)  # loading the model and building the data count
    units = plan_lat_units(config)
    context = None
    if workers <= 1:
        context = LatRunContext(partial, config, hm, layers, file_items, progress, log, seeds)
    device = str(hm.device)
    del hm  # workers load their own copies
    timing = run_units(
        partial, units, make_context=lat_worker_context, executor=execute_lat_unit,
        workers=workers, priority=("install", "calibrate"), context=context, log=log,
        on_done=lambda *_: run.save_clock(),
    )  # fmt: skip
    shutil.rmtree(partial / BACKDOOR_WEIGHTS, ignore_errors=True)  # every result is written
    parts = record_part(partial, workers, timing, units)

    seconds = run.save_clock()
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
            "seconds": seconds,
            "workers": workers,
            "phases": parts[-1]["phases"],
            "mechunlearn": __version__,
            "torch": torch.__version__,
            "threads": 1 if workers > 1 else torch.get_num_threads(),
            "device": device,
            "python": platform.python_version(),
        },
    )
    write_report(partial, MEASUREMENTS.columns())
    return run.finalise()
