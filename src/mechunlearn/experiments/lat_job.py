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
each): refusal, one unit per (method, seed), after the method's calibration when it calibrates
once on the first seed (``match_benign.per_seed: false``); backdoor, one unit per seed (its
installation is shared by the seed's removal methods). A unit's result does not depend on which
process ran it: its data come from the seed, its RNGs from its key, and it starts from the
loaded weights.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mechunlearn import __version__
from mechunlearn.edit.data import TrainData
from mechunlearn.edit.parametrization import WeightSnapshot, make_trainable
from mechunlearn.edit.trainer import TrainConfig, train
from mechunlearn.errors import ConfigError
from mechunlearn.experiments.config import read_yaml_mapping
from mechunlearn.experiments.lat_config import LatExperimentConfig
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


def _result_path(partial: Path, method: str, seed: int) -> Path:
    return partial / "results" / method / f"seed{seed}.json"


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
            result = measure_method(
                hm, config, method, data, layers, seed, progress, log, extra=extra
            )
            atomic_write_json(_result_path(partial, method.name, seed), result)
    finally:
        original.restore()  # the next seed installs its backdoor into the original weights


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


def plan_lat_units(config: LatExperimentConfig) -> list[Unit]:
    """Refusal: a unit per (method, seed), its result file, after the method's calibration
    unit when it calibrates once (``match_benign.per_seed: false``); backdoor: a unit per seed
    (the installation and every removal method), marked done by ``units/lat/seed<n>.json``."""
    if config.application == "refusal":
        once = _calibrated_once(config)
        first = config.seeds[0]
        calibrations = [
            Unit(f"calibrate/{name}", "calibrate", f"calibration/{name}.json",
                 params={"method": name, "seed": first})
            for name in once
        ]  # fmt: skip
        return calibrations + [
            Unit(
                f"{method.name}/seed{seed}",
                "method",
                f"results/{method.name}/seed{seed}.json",
                params={"method": method.name, "seed": seed},
                deps=(f"calibrate/{method.name}",) if method.name in once else (),
            )
            for seed in config.seeds
            for method in config.methods
        ]
    return [
        Unit(f"seed{seed}", "seed", f"units/lat/seed{seed}.json", params={"seed": seed})
        for seed in config.seeds
    ]


def execute_lat_unit(ctx: LatRunContext, unit: Unit) -> dict[str, Any]:
    """Compute one unit of ``plan_lat_units`` (see ``experiments.workers``)."""
    seed = unit.params["seed"]
    data = ctx.seed_data(seed)
    config = ctx.config
    if unit.kind in ("method", "calibrate"):
        method = next(m for m in config.methods if m.name == unit.params["method"])
        args = (ctx.hm, config, method, data, ctx.layers, seed, ctx.progress, ctx.log)
        if unit.kind == "calibrate":
            ctx.log(f"{method.name}: matching benign compliance on seed {seed}")
            return match_benign(*args)
        ctx.log(f"seed {seed}: {method.name}")
        calibration = None
        if method.name in _calibrated_once(config):
            calibration = read_json(ctx.folder / "calibration" / f"{method.name}.json")
        return measure_method(*args, calibration=calibration)
    _backdoor_seed(ctx.hm, config, data, ctx.layers, seed, ctx.folder, ctx.progress, ctx.log)
    return {"seed": seed, "methods": [m.name for m in config.methods]}


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
        workers=workers, context=context, log=log, on_done=lambda *_: run.save_clock(),
    )  # fmt: skip
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
