"""``mechunlearn run CONFIG``: the Mechanistic Unlearning comparison end to end.

known facts -> validation / per-seed fact sets -> localizations at equal budget -> per
localization a hyper-parameter sweep on the validation split -> for every (localization, seed):
train only the localized weights, run the robustness battery, restore the weights -> report.

The run is assembled in ``OUT.partial`` with one result file per (localization, seed), written
atomically as soon as it is done, so an interrupted run resumes (``resume=True``) where it
stopped. Only a complete run is moved to ``OUT``: the final folder never holds partial results.
``resume=True`` on a finished ``OUT`` extends it (e.g. from one seed to all seeds).
Input (config, data, localization files) is validated before the model loads.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml

from mechunlearn import __version__
from mechunlearn.edit.data import TrainData, fact_pairs
from mechunlearn.edit.engine import with_changes
from mechunlearn.edit.export import save_edited
from mechunlearn.edit.parametrization import WeightSnapshot, make_trainable
from mechunlearn.edit.trainer import train
from mechunlearn.errors import ConfigError, DataError
from mechunlearn.evals.harness import known_records
from mechunlearn.experiments.battery import run_battery
from mechunlearn.experiments.edit_config import ExperimentConfig, Hyperparameters
from mechunlearn.experiments.fact_sets import (
    FactSets,
    add_options,
    extra_options,
    split_experiment_facts,
    with_targets,
)
from mechunlearn.experiments.localizations import compute_localizations, localization_facts
from mechunlearn.experiments.sweep import (
    forget_perturbation,
    sweep_localization,
    validation_score,
)
from mechunlearn.io import RunClock, atomic_write_json, atomic_write_yaml, move_into_place
from mechunlearn.localize import Localization
from mechunlearn.models.loading import load_model
from mechunlearn.report.experiment import write_report
from mechunlearn.tasks.counterfact import load_counterfact
from mechunlearn.tasks.datasets import load_task
from mechunlearn.tasks.general_text import load_general_text
from mechunlearn.tasks.records import FactRecord


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class RemainingTime:
    """``run k of n``, and once one is done the time left at the mean pace so far (a run of
    several hours is planned around it)."""

    def __init__(self, total: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.total, self.done = total, 0
        self.clock = clock
        self.started = clock()

    def done_one(self) -> None:
        self.done += 1

    def describe(self) -> str:
        text = f"run {self.done + 1} of {self.total}"
        if self.done:
            pace = (self.clock() - self.started) / self.done
            left = pace * (self.total - self.done)
            text += f", {pace / 60:.0f} min each so far, about {left / 3600:.1f} h left"
        return text


def _prepare_sets(config: ExperimentConfig, sets: FactSets, seed: int) -> FactSets:
    """Give forget facts their new answers (editing); unlearning keeps the records as they are."""
    if config.mode != "edit":
        return sets
    return FactSets(
        with_targets(sets.forget, config.target, seed), sets.retain_train, sets.retain_eval
    )


def train_data(config: ExperimentConfig, sets: FactSets, general_text: list[str]) -> TrainData:
    target = "new_answer" if config.mode == "edit" else "answer"
    # under LAT the adversary pushes an edited fact back toward its original answer
    originals = [c for _, c in fact_pairs(sets.forget, target="answer")]
    data = TrainData(
        forget=fact_pairs(sets.forget, target=target, prompt=config.train_prompt),
        retain=fact_pairs(sets.retain_train, target="answer", prompt=config.train_prompt),
        general_text=list(general_text),
        adversary_targets=originals if config.mode == "edit" else None,
    )
    data.validate()
    return data


def check_inputs(config: ExperimentConfig) -> tuple[list[FactRecord], list[FactRecord]]:
    """Everything that can fail without a model: data files, localization files."""
    records = load_task(config.task, config.data)
    if not records:
        raise DataError(f"task {config.task} has no records")
    for spec in config.localizations:
        if spec.from_file:
            Localization.load(spec.from_file)
    counterfact = []
    path = config.evaluation.counterfact_side_effects
    if path:
        counterfact = load_counterfact(path)[: config.evaluation.n_counterfact_side_effects]
    return records, counterfact


def run_experiment(
    config: ExperimentConfig,
    out: str | Path,
    *,
    resume: bool = False,
    use_cache: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> Path:
    """Run ``config``; see the module docstring. Returns the final run folder."""
    out = Path(out)
    records, counterfact = check_inputs(config)
    partial = out.with_name(out.name + ".partial")
    if resume and not partial.exists() and (out / "config.yaml").is_file():
        # a finished run is extended (e.g. the quick one-seed run to every seed): its results
        # move back to the partial folder and only the missing (localization, seed) runs are done
        _check_same_config(out, config)
        os.replace(out, partial)
    if resume and (partial / "config.yaml").is_file():
        _check_same_config(partial, config)
    started = time.time()

    texts = load_general_text()
    n_eval = min(config.evaluation.lm_texts, len(texts) // 2)
    text_eval, text_train = texts[:n_eval], texts[n_eval:]

    hm = load_model(config.model, device=config.device, dtype=config.dtype, log=log)
    for spec in config.localizations:
        if spec.from_file:
            Localization.load(spec.from_file).check_model(hm)
    # Everything that can be checked is checked before anything is written.
    # Knowing a fact is judged among its own options, before a new edit target (e.g. golf)
    # joins them: the target would take probability from the true answer.
    known_path = partial / "known_facts.json"
    if resume and known_path.is_file():
        known_ids = set(_read_json(known_path))
    elif config.facts.known_only:
        scored = known_records(hm, records, config.facts.known_threshold, progress=progress)
        known_ids = {r.id for r in scored}
    else:
        known_ids = {r.id for r in records}
    # Localization looks at the facts as the model knows them, among their own options.
    known_as_is = [r for r in records if r.id in known_ids]
    records = add_options(records, extra_options(config))
    known = [r for r in records if r.id in known_ids]
    log(f"{len(known)} of {len(records)} facts known")
    facts = split_experiment_facts(known, config.facts)
    seed_sets = {seed: _prepare_sets(config, facts.for_seed(seed), seed) for seed in config.seeds}
    for sets in seed_sets.values():
        train_data(config, sets, text_train)
    loc_facts = localization_facts(
        hm, known_as_is, config.facts.n_localize, config.localize_options.seed
    )

    if partial.exists() and not resume:
        shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    clock = RunClock(partial)
    clock.started = started  # the time spent loading the model and finding known facts counts
    atomic_write_yaml(partial / "config.yaml", config.model_dump(mode="json"))
    atomic_write_json(known_path, sorted(r.id for r in known))
    saved = {
        spec.name: partial / "localizations" / f"{spec.name}.json" for spec in config.localizations
    }
    if resume and all(path.is_file() for path in saved.values()):
        # the run's own localizations, so a resumed run edits exactly what it started with
        locs = {name: Localization.load(path) for name, path in saved.items()}
        log("localizations: from the interrupted run")
    else:
        locs = compute_localizations(
            hm,
            config.model,
            config.localizations,
            loc_facts,
            config.localize_options.model_copy(update={"progress": progress}),
            use_cache=use_cache,
            log=log,
        )
        for name, path in saved.items():
            locs[name].save(path)
    for loc in locs.values():
        loc.check_model(hm)

    validation = _prepare_sets(
        config,
        FactSets(
            facts.validation.forget,
            facts.for_seed(config.seeds[0]).retain_train,
            facts.validation.retain_eval,
        ),
        seed=config.sweep.seed if config.sweep else 0,
    )
    clock.save()
    hparams = _choose_hparams(hm, config, locs, validation, text_train, partial, log, clock)

    probe_reserve = list(facts.validation.forget)  # never a seed's forget or retain fact
    todo = [
        (seed, spec.name)
        for seed in seed_sets
        for spec in config.localizations
        if not (partial / "results" / spec.name / f"seed{seed}.json").is_file()
    ]
    eta = RemainingTime(len(todo))
    for seed, sets in seed_sets.items():
        atomic_write_json(partial / "facts" / f"seed{seed}.json", sets.to_json())
        base_path = partial / "results" / "base" / f"seed{seed}.json"
        if not base_path.is_file():
            log(f"seed {seed}: base model")
            base = run_battery(
                hm,
                sets,
                config,
                seed,
                general_text_eval=text_eval,
                general_text_train=text_train,
                counterfact_records=counterfact,
                probe_reserve=probe_reserve,
                attacks=False,
                progress=progress,
            )
            atomic_write_json(base_path, {"localization": "base", "seed": seed, **base.to_json()})
            clock.save()
        data = train_data(config, sets, text_train)
        for spec in config.localizations:
            path = partial / "results" / spec.name / f"seed{seed}.json"
            if path.is_file():
                continue
            log(
                f"seed {seed}: {spec.name} (lr {hparams[spec.name].lr:g}, forget_coef "
                f"{hparams[spec.name].forget_coef:g}); {eta.describe()}"
            )
            result = _edit_and_measure(
                hm,
                spec,
                locs[spec.name],
                hparams[spec.name],
                data,
                sets,
                config,
                seed,
                text_eval,
                text_train,
                counterfact,
                partial,
                progress,
                log,
                probe_reserve,
            )
            atomic_write_json(path, result)
            clock.save()
            eta.done_one()

    atomic_write_json(
        partial / "run.json",
        {
            "name": config.name,
            "model": config.model,
            "seconds": round(clock.seconds, 1),
            "mechunlearn": __version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": str(hm.device),
            "python": platform.python_version(),
            "n_known": len(known),
            "localization_facts": [r.id for r in loc_facts],
            "validation": facts.validation.to_json(),
            "hyperparameters": {k: v.model_dump() for k, v in hparams.items()},
        },
    )
    clock.save()
    write_report(partial)
    move_into_place(partial, out)
    return out


def _check_same_config(folder: Path, config: ExperimentConfig) -> None:
    """Resuming is only meaningful with the same experiment (seeds may differ)."""
    saved = ExperimentConfig.model_validate(yaml.safe_load((folder / "config.yaml").read_text()))
    if saved.model_dump(exclude={"seeds"}) != config.model_dump(exclude={"seeds"}):
        raise ConfigError(f"{folder} was run with another config; rerun without --resume")


def _choose_hparams(
    hm,
    config: ExperimentConfig,
    locs,
    validation: FactSets,
    text_train,
    partial: Path,
    log,
    clock: RunClock,
) -> dict[str, Hyperparameters]:
    chosen: dict[str, Hyperparameters] = dict(config.hyperparameters)
    if config.sweep is None:
        return chosen
    base_retain = validation_score(hm, validation, config, base_retain=1.0)["retain_accuracy"]
    data = train_data(config, validation, text_train)
    for spec in config.localizations:
        if spec.name in config.hyperparameters:
            continue
        path = partial / "sweep" / f"{spec.name}.json"
        if path.is_file():
            chosen[spec.name] = Hyperparameters.model_validate(_read_json(path)["chosen"])
            continue
        best, points = sweep_localization(
            hm, spec, locs[spec.name], validation, data, config, base_retain, log
        )
        atomic_write_json(
            path,
            {"chosen": best.model_dump(), "base_retain_accuracy": base_retain, "points": points},
        )
        chosen[spec.name] = best
        clock.save()
    return chosen


def _edit_and_measure(
    hm,
    spec,
    loc,
    hp: Hyperparameters,
    data: TrainData,
    sets: FactSets,
    config: ExperimentConfig,
    seed: int,
    text_eval,
    text_train,
    counterfact,
    partial: Path,
    progress: bool,
    log,
    probe_reserve=(),
) -> dict[str, Any]:
    train_config = with_changes(
        spec.train_config(config.train), lr=hp.lr, forget_coef=hp.forget_coef, seed=seed
    )
    snapshot = WeightSnapshot(s.param for s in hm.parameters_of(loc.selected))
    trainable = make_trainable(hm, spec.trainer, loc.selected)
    try:
        trained = train(
            hm,
            trainable,
            data,
            train_config,
            progress=progress,
            log=log,
            forget_perturbation=forget_perturbation(spec),
        )
        if spec.trainer == "lora":
            trainable.merge()  # the battery's own LoRA attack then sits on plain weights
        battery = run_battery(
            hm,
            sets,
            config,
            seed,
            general_text_eval=text_eval,
            general_text_train=text_train,
            counterfact_records=counterfact,
            probe_reserve=probe_reserve,
            attacks=True,
            progress=progress,
            log=log,
        )
        if config.save_models and seed == config.seeds[0]:
            save_edited(hm, partial / "models" / spec.name)
    finally:
        trainable.restore()
        snapshot.restore()  # the next (localization, seed) starts from the original weights
    return {
        "localization": spec.name,
        "method": loc.method,
        "seed": seed,
        "components": loc.selected,
        "n_params": loc.n_params,
        "trainable_parameters": trainable.n_params,
        "hyperparameters": hp.model_dump(),
        "objective": train_config.objective,
        "latent_adversary": spec.latent_adversary is not None,
        "train": {
            "steps": trained.steps,
            # milliseconds: a tiny model's edit can take well under 0.1 s
            "seconds": round(trained.seconds, 3),
            "final": {k: v[-1] for k, v in trained.history.items() if v},
        },
        **battery.to_json(),
    }
