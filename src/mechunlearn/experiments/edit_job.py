"""``mechunlearn run CONFIG``: the Mechanistic Unlearning comparison end to end.

known facts -> validation / per-seed fact sets -> localizations at equal budget -> per
localization a hyper-parameter sweep on the validation split (or, for a ``match_forgetting``
row, a calibration of its learning rate to another row's validation forgetting:
``experiments.forget_match``) -> for every (localization, seed):
train only the localized weights, run the robustness battery, restore the weights -> report.

After a short plan made in this process (known facts, localization facts, the base model's
validation score: ``plan.json``), the run is a graph of units (``plan_units``): one per
localization and sweep point; per (localization, seed) one edit (training; the edited weights
saved as a safetensors file of the trained components) and one unit per battery part
(``experiments.battery.battery_parts``: formats and probes, relearning, soft prompt, ...), each
run on the swapped-in edited weights; and one base-model battery per seed. ``assemble_results`` merges an
edit's units into ``results/<localization>/seed<k>.json`` and deletes its weights.
``run_units`` executes them here (``workers=1``) or in worker processes, each unit's file
written atomically in ``OUT.partial`` as soon as it is done, so an interrupted run resumes
(``resume=True``) with every finished unit kept. Only a complete run is moved to ``OUT``: the
final folder never holds partial results. ``resume=True`` on a finished ``OUT`` extends it
(e.g. from one seed to all seeds). Input (config, data, localization files) is validated
before the model loads.
"""

from __future__ import annotations

import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mechunlearn import __version__
from mechunlearn.edit.data import TrainData, fact_pairs
from mechunlearn.edit.engine import with_changes
from mechunlearn.edit.export import save_edited
from mechunlearn.edit.parametrization import editing, save_weights, swapped_in
from mechunlearn.edit.trainer import train
from mechunlearn.errors import DataError
from mechunlearn.evals.harness import known_records
from mechunlearn.experiments.battery import (
    BatteryResult,
    battery_parts,
    merge_batteries,
    run_battery,
)
from mechunlearn.experiments.edit_config import ExperimentConfig, Hyperparameters
from mechunlearn.experiments.fact_sets import (
    FactSets,
    add_options,
    extra_options,
    split_experiment_facts,
    with_targets,
)
from mechunlearn.experiments.forget_match import match_forgetting, reference_forgetting
from mechunlearn.experiments.localizations import (
    BUDGET_METHOD,
    localization_facts,
    reselect,
    run_cached,
    takes_budget,
)
from mechunlearn.experiments.measurements import MEASUREMENTS
from mechunlearn.experiments.run_folder import RunFolder
from mechunlearn.experiments.sweep import (
    MATCH_FOLDER,
    chosen_hyperparameters,
    forget_perturbation,
    rung_survivors,
    sweep_grid,
    sweep_point,
    sweep_rungs,
    validation_score,
    write_sweep_summaries,
)
from mechunlearn.experiments.workers import Unit, record_part, run_units
from mechunlearn.io import atomic_write_json, read_json
from mechunlearn.localize import Localization
from mechunlearn.localize.prompts import subject_aligned
from mechunlearn.models.loading import load_model
from mechunlearn.report.experiment import write_report
from mechunlearn.tasks.counterfact import load_counterfact
from mechunlearn.tasks.datasets import load_task
from mechunlearn.tasks.general_text import load_general_text
from mechunlearn.tasks.records import FactRecord


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


SWEEP_CHECKPOINTS = Path("units") / "sweep-checkpoints"
"""Where a successive-halving point's checkpoint waits for its next rung."""

UNIT_PRIORITY = ("localize", "sweep", "match", "edit", "measure", "base")
"""Ready units are taken in this order: localizations unblock sweeps, sweeps unblock edits and
calibrations to a row's forgetting (which unblock their rows' edits), edits unblock their
battery's parts, and the base model's batteries (no dependencies) fill the
gaps."""


@dataclass
class EditContext:
    """A process's view of a run: the model (loaded once per process), the config, the facts."""

    folder: Path
    config: ExperimentConfig
    hm: Any
    known: list[FactRecord]
    loc_facts: list[FactRecord]
    facts: Any
    seed_sets: dict[int, FactSets]
    validation: FactSets
    base_retain: float | None
    counterfact: list[FactRecord]
    text_eval: list[str]
    text_train: list[str]
    use_cache: bool = True
    progress: bool = False
    log: Callable[[str], None] = lambda _: None


def _texts(config: ExperimentConfig) -> tuple[list[str], list[str]]:
    texts = load_general_text()
    n_eval = min(config.evaluation.lm_texts, len(texts) // 2)
    return texts[:n_eval], texts[n_eval:]


def _fact_views(config: ExperimentConfig, records, known_ids):
    """The run's facts from the known ids: every seed's sets and the validation split."""
    records = add_options(records, extra_options(config))
    known = [r for r in records if r.id in known_ids]
    facts = split_experiment_facts(known, config.facts)
    seed_sets = {seed: _prepare_sets(config, facts.for_seed(seed), seed) for seed in config.seeds}
    validation = _prepare_sets(
        config,
        FactSets(
            facts.validation.forget,
            facts.for_seed(config.seeds[0]).retain_train,
            facts.validation.retain_eval,
        ),
        seed=config.sweep.seed if config.sweep else 0,
    )
    return known, facts, seed_sets, validation


def build_context(
    folder: Path,
    hm=None,
    *,
    progress: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> EditContext:
    """Everything a unit needs, read from the run folder (a worker passes ``hm=None`` and loads
    the model itself, once)."""
    folder = Path(folder)
    config = ExperimentConfig.model_validate(yaml.safe_load((folder / "config.yaml").read_text()))
    plan = read_json(folder / "plan.json")
    records, counterfact = check_inputs(config)
    by_id = {r.id: r for r in records}
    loc_facts = [by_id[i] for i in plan["localization_facts"]]
    known, facts, seed_sets, validation = _fact_views(config, records, set(plan["known"]))
    text_eval, text_train = _texts(config)
    if hm is None:
        hm = load_model(config.model, device=config.device, dtype=config.dtype)
    return EditContext(
        folder, config, hm, known, loc_facts, facts, seed_sets, validation,
        plan["base_retain_accuracy"], counterfact, text_eval, text_train,
        use_cache=plan.get("use_cache", True), progress=progress, log=log,
    )  # fmt: skip


def worker_context(folder: Path) -> EditContext:
    """A worker process's context (module level, so spawned processes can unpickle it)."""
    return build_context(folder)


def plan_units(config: ExperimentConfig) -> list[Unit]:
    """The run as a graph of units (see ``experiments.workers``)."""
    units: list[Unit] = []
    specs = list(config.localizations)
    needs_budget = config.localize_options.budget is None and any(
        takes_budget(s.method) and not s.from_file for s in specs
    )
    budget_key = "localize/_budget"
    if needs_budget:
        units.append(Unit(budget_key, "localize", "localizations/_budget/fact_lookup.json"))
    first_of_method: dict[str, str] = {}
    for spec in specs:
        deps: list[str] = []
        if not spec.from_file:
            if needs_budget and (takes_budget(spec.method) or spec.method == BUDGET_METHOD):
                deps.append(budget_key)
            if spec.method in first_of_method and takes_budget(spec.method):
                deps.append(f"localize/{first_of_method[spec.method]}")
            first_of_method.setdefault(spec.method, spec.name)
        units.append(
            Unit(f"localize/{spec.name}", "localize", f"localizations/{spec.name}.json",
                 {"name": spec.name}, tuple(deps))
        )  # fmt: skip
    chosen_from: dict[str, tuple[str, ...]] = {}
    for spec in specs:
        if spec.name in config.hyperparameters or config.sweep is None:
            chosen_from[spec.name] = ()
            continue
        if spec.hyperparameters_from is not None or spec.match_forgetting is not None:
            continue  # the row it takes them from is swept; a matched row is calibrated (below)
        n_points = len(sweep_grid(config.sweep))
        previous: tuple[str, ...] = ()
        steps = config.row_train(spec.name).steps
        for rung in range(len(sweep_rungs(config.sweep, n_points, steps))):
            keys = tuple(f"sweep/{spec.name}/r{rung}p{i}" for i in range(n_points))
            for i, key in enumerate(keys):
                units.append(
                    Unit(key, "sweep", f"{key}.json", {"name": spec.name, "rung": rung, "point": i},
                         (f"localize/{spec.name}", *previous))
                )  # fmt: skip
            previous = keys
        chosen_from[spec.name] = previous
    for spec in specs:  # a twin waits for the sweep of the row it takes its choice from
        if spec.name not in chosen_from and spec.hyperparameters_from is not None:
            chosen_from[spec.name] = chosen_from[spec.hyperparameters_from]
    for spec in specs:  # a matched row waits for its calibration, which waits for its target
        if spec.match_forgetting is None:
            continue
        row = spec.match_forgetting.row
        reference = f"{MATCH_FOLDER}/reference/{row}"
        if not any(u.key == reference for u in units):
            units.append(
                Unit(reference, "match", f"{reference}.json", {"reference": row},
                     (f"localize/{row}", *chosen_from[row]))
            )  # fmt: skip
        key = f"{MATCH_FOLDER}/{spec.name}"
        units.append(
            Unit(key, "match", f"{key}.json", {"name": spec.name},
                 (f"localize/{spec.name}", reference))
        )  # fmt: skip
        chosen_from[spec.name] = (key,)
    # the attacks train longest: started first, they leave the short parts to fill the end
    parts = sorted(battery_parts(config), key=lambda p: p == "formats")
    for seed in config.seeds:
        units.append(
            Unit(f"base/seed{seed}", "base", f"results/base/seed{seed}.json", {"seed": seed})
        )
        for spec in specs:
            edit = f"edit/{spec.name}/seed{seed}"
            params = {"name": spec.name, "seed": seed}
            units.append(
                Unit(edit, "edit", f"units/{edit}.json", params,
                     (f"localize/{spec.name}", *chosen_from[spec.name]))
            )  # fmt: skip
            for part in parts:
                key = f"measure/{spec.name}/seed{seed}/{part}"
                units.append(
                    Unit(key, "measure", f"units/{key}.json", {**params, "part": part}, (edit,))
                )
    return units


def _weights_file(folder: Path, name: str, seed: int) -> Path:
    """The edited weights of (localization, seed), read by its battery's parts."""
    return folder / "units" / "weights" / name / f"seed{seed}.safetensors"


def _result_file(folder: Path, name: str, seed: int) -> Path:
    return folder / "results" / name / f"seed{seed}.json"


def retrain_edits_without_weights(folder: Path, units: list[Unit]) -> list[str]:
    """Mark for training again every finished edit whose battery is not done but whose
    edited weights file is gone (a finished run deletes them all, so an edit of a run stopped
    and then finished with fewer seeds could never be measured), by removing its unit file.
    Returns the edits' keys."""
    retrain = []
    for unit in units:
        if unit.kind != "edit" or not (folder / unit.path).is_file():
            continue
        weights = _weights_file(folder, unit.params["name"], unit.params["seed"])
        pending = any(
            u.kind == "measure" and unit.key in u.deps and not (folder / u.path).is_file()
            for u in units
        )
        if pending and not weights.is_file():
            (folder / unit.path).unlink()
            retrain.append(unit.key)
    return retrain


def _assembled(folder: Path, unit: Unit) -> bool:
    if unit.kind not in ("edit", "measure"):
        return False
    return _result_file(folder, unit.params["name"], unit.params["seed"]).is_file()


def assemble_results(folder: Path, config: ExperimentConfig) -> int:
    """``results/<localization>/seed<k>.json`` from its edit unit and battery parts, for every
    (localization, seed) whose units are all done; the edited weights are deleted once the
    result is written. Returns how many results were written."""
    written = 0
    for seed in config.seeds:
        for spec in config.localizations:
            target = _result_file(folder, spec.name, seed)
            edit = folder / "units" / "edit" / spec.name / f"seed{seed}.json"
            measures = folder / "units" / "measure" / spec.name / f"seed{seed}"
            files = {p: measures / f"{p}.json" for p in battery_parts(config)}
            if target.is_file() or not edit.is_file():
                continue
            if not all(f.is_file() for f in files.values()):
                continue
            battery = merge_batteries(
                {p: BatteryResult.from_json(read_json(f)) for p, f in files.items()}
            )
            atomic_write_json(target, {**read_json(edit), **battery.to_json()})
            _weights_file(folder, spec.name, seed).unlink(missing_ok=True)
            written += 1
    return written


def execute_unit(ctx: EditContext, unit: Unit) -> dict[str, Any]:
    """Compute one unit (the same in this process and in a worker)."""
    if unit.kind == "localize":
        return _localize_unit(ctx, unit).model_dump(mode="json")
    if unit.kind == "sweep":
        return _sweep_unit(ctx, unit)
    if unit.kind == "match":
        return _match_unit(ctx, unit)
    seed = unit.params["seed"]
    if unit.kind == "base":
        ctx.log(f"seed {seed}: base model")
        base = _battery(ctx, seed, attacks=False)
        return {"localization": "base", "seed": seed, **base.to_json()}
    name = unit.params["name"]
    weights = _weights_file(ctx.folder, name, seed)
    if unit.kind == "measure":
        part = unit.params["part"]
        ctx.log(f"seed {seed}: {name} battery: {part}")
        with swapped_in(ctx.hm, weights):
            return _battery(ctx, seed, attacks=True, parts=[part]).to_json()
    spec = next(s for s in ctx.config.localizations if s.name == name)
    loc = Localization.load(ctx.folder / "localizations" / f"{name}.json")
    loc.check_model(ctx.hm)
    hp = chosen_hyperparameters(ctx.folder, ctx.config, name)
    ctx.log(f"seed {seed}: {name} (lr {hp.lr:g}, forget_coef {hp.forget_coef:g})")
    data = train_data(ctx.config, ctx.seed_sets[seed], ctx.text_train)
    return _edit(ctx, spec, loc, hp, data, seed, weights)


def _battery(ctx: EditContext, seed: int, attacks: bool, parts=None):
    """The battery (or some of its ``parts``) on the model as it is now, on seed's facts."""
    return run_battery(
        ctx.hm, ctx.seed_sets[seed], ctx.config, seed,
        general_text_eval=ctx.text_eval, general_text_train=ctx.text_train,
        counterfact_records=ctx.counterfact,
        probe_reserve=list(ctx.facts.validation.forget),  # never a seed's forget or retain fact
        attacks=attacks, parts=parts, progress=ctx.progress, log=ctx.log,
    )  # fmt: skip


def _localize_unit(ctx: EditContext, unit: Unit) -> Localization:
    """One spec's localization: methods that rank components at fact lookup's parameter count,
    a method seen before re-selected from its scores."""
    config, hm = ctx.config, ctx.hm
    options = config.localize_options.model_copy(update={"progress": ctx.progress})

    def run(method: str, updates: dict[str, Any]) -> Localization:
        return run_cached(
            hm, config.model, ctx.loc_facts, method, options.model_copy(update=updates),
            config.method_options.get(method), ctx.use_cache, ctx.log,
        )  # fmt: skip

    if unit.key == "localize/_budget":
        flu = run(BUDGET_METHOD, {})
        if flu.n_params == 0:
            raise DataError("fact_lookup selected nothing on these facts, so it gives no budget")
        ctx.log(f"parameter budget {flu.n_params:,} (fact lookup: {', '.join(flu.selected)})")
        return flu
    spec = next(s for s in config.localizations if s.name == unit.params["name"])
    if spec.from_file:
        loc = Localization.load(spec.from_file)
        loc.check_model(hm)
        return loc
    budget = options.budget
    budget_file = ctx.folder / "localizations" / "_budget" / "fact_lookup.json"
    flu = Localization.load(budget_file) if budget_file.is_file() else None
    if budget is None and flu is not None:
        budget = flu.n_params
    spec_budget = budget if takes_budget(spec.method) else None
    if spec.method == BUDGET_METHOD and spec.restrict_to == "all" and flu is not None:
        return flu
    first = next(s for s in config.localizations if s.method == spec.method and not s.from_file)
    if first.name != spec.name and takes_budget(spec.method):
        base = Localization.load(ctx.folder / "localizations" / f"{first.name}.json")
        return reselect(hm, base, spec.restrict_to, spec_budget)
    loc = run(spec.method, {"budget": spec_budget, "restrict_to": spec.restrict_to})
    ctx.log(
        f"localization {spec.name}: {len(loc.selected)} components, {loc.n_params:,} parameters"
    )
    return loc


def _sweep_unit(ctx: EditContext, unit: Unit) -> dict[str, Any]:
    name, rung, index = unit.params["name"], unit.params["rung"], unit.params["point"]
    sweep = ctx.config.sweep
    points = sweep_grid(sweep)
    lr, coef = points[index]
    rungs = sweep_rungs(sweep, len(points), ctx.config.row_train(name).steps)
    # a point's checkpoint carries it from one rung to the next (only between rungs)
    checkpoints = ctx.folder / SWEEP_CHECKPOINTS / name / f"p{index}" if len(rungs) > 1 else None
    if rung > 0 and index not in rung_survivors(ctx.folder, name, rung, sweep):
        shutil.rmtree(checkpoints, ignore_errors=True)
        return {"lr": lr, "forget_coef": coef, "rung": rung, "eliminated": True}
    spec = next(s for s in ctx.config.localizations if s.name == name)
    loc = Localization.load(ctx.folder / "localizations" / f"{name}.json")
    steps, last = rungs[rung], rung == len(rungs) - 1
    data = train_data(ctx.config, ctx.validation, ctx.text_train)
    numbers = sweep_point(
        ctx.hm, spec, loc, ctx.validation, data, ctx.config, ctx.base_retain, lr, coef, steps,
        checkpoint_dir=checkpoints, keep_checkpoint=not last,
    )  # fmt: skip
    if last and checkpoints is not None:
        shutil.rmtree(checkpoints, ignore_errors=True)
    ctx.log(
        f"sweep {name}: lr={lr:g} forget_coef={coef:g} ({steps} steps) -> score "
        f"{numbers['score']:.3f} (forget {numbers['forget_effect']:.2f}, retain "
        f"{numbers['retain_accuracy']:.2f})"
    )
    return {**numbers, "rung": rung, "steps": steps}


def _match_unit(ctx: EditContext, unit: Unit) -> dict[str, Any]:
    """A matched row's calibration, or the reference row's validation forgetting it targets."""
    config = ctx.config
    name = unit.params.get("name") or unit.params["reference"]
    spec = next(s for s in config.localizations if s.name == name)
    loc = Localization.load(ctx.folder / "localizations" / f"{name}.json")
    data = train_data(config, ctx.validation, ctx.text_train)

    def point(lr: float, coef: float) -> dict[str, Any]:
        return sweep_point(
            ctx.hm, spec, loc, ctx.validation, data, config, ctx.base_retain, lr, coef
        )

    if "reference" in unit.params:
        chosen = chosen_hyperparameters(ctx.folder, config, name)
        record = reference_forgetting(name, point, chosen, len(ctx.validation.forget))
        ctx.log(
            f"{name}: validation forget effect {record['forget_effect']:.2f} at lr "
            f"{chosen.lr:g} (the target of the rows matched to it)"
        )
        return record
    row = spec.match_forgetting.row
    reference = read_json(ctx.folder / MATCH_FOLDER / "reference" / f"{row}.json")
    trials = ctx.folder / "units" / MATCH_FOLDER / f"{name}.trials.json"
    default_lr = config.sweep.lr if config.sweep else []
    record = match_forgetting(spec, point, reference, default_lr, trials, ctx.log)
    ctx.log(
        f"{name}: lr {record['chosen']['lr']:g} forgets {record['chosen_forget_effect']:.2f} "
        f"of the validation facts ({row}: {record['target']:.2f})"
    )
    return record


def run_experiment(
    config: ExperimentConfig,
    out: str | Path,
    *,
    resume: bool = False,
    use_cache: bool = True,
    progress: bool = True,
    workers: int = 1,
    log: Callable[[str], None] = lambda _: None,
) -> Path:
    """Run ``config``; see the module docstring. Returns the final run folder.

    ``workers``: processes running the units (1: every unit in this process)."""
    records, _ = check_inputs(config)
    run = RunFolder(out, config, resume=resume, ignore=frozenset({"seeds"}))
    run.check()
    started = time.time()
    hm = load_model(config.model, device=config.device, dtype=config.dtype, log=log)
    for spec in config.localizations:
        if spec.from_file:
            Localization.load(spec.from_file).check_model(hm)
    # Everything that can be checked is checked before anything is written.
    saved_plan = None
    for folder in (run.partial, run.out):
        if resume and (folder / "plan.json").is_file():
            saved_plan = read_json(folder / "plan.json")
            break
    if saved_plan is not None:
        known_ids = set(saved_plan["known"])
    elif config.facts.known_only:
        # Knowing a fact is judged among its own options, before a new edit target (e.g. golf)
        # joins them: the target would take probability from the true answer.
        scored = known_records(hm, records, config.facts.known_threshold, progress=progress)
        known_ids = {r.id for r in scored}
    else:
        known_ids = {r.id for r in records}
    if saved_plan is None:
        known_ids = _subject_aligned_ids(hm, [r for r in records if r.id in known_ids], log)
    known, facts, seed_sets, validation = _fact_views(config, records, known_ids)
    log(f"{len(known)} of {len(records)} facts known")
    text_eval, text_train = _texts(config)
    for sets in seed_sets.values():
        train_data(config, sets, text_train)
    plan = saved_plan
    if plan is None:
        # Localization looks at the facts as the model knows them, among their own options.
        known_as_is = [r for r in records if r.id in known_ids]
        loc_facts = localization_facts(
            hm, known_as_is, config.facts.n_localize, config.localize_options.seed
        )
        base_retain = None
        if config.sweep is not None:
            scores = validation_score(hm, validation, config, base_retain=1.0)
            base_retain = scores["retain_accuracy"]
        plan = {
            "known": sorted(r.id for r in known),
            "localization_facts": [r.id for r in loc_facts],
            "base_retain_accuracy": base_retain,
            "use_cache": use_cache,
        }

    partial = run.open(started)
    atomic_write_json(partial / "known_facts.json", plan["known"])
    atomic_write_json(partial / "plan.json", plan)
    for seed, sets in seed_sets.items():
        atomic_write_json(partial / "facts" / f"seed{seed}.json", sets.to_json())
    run.save_clock()

    # (localization, seed) results of an earlier run (e.g. one being extended to more seeds)
    # are kept as they are, however they were made
    units = [u for u in plan_units(config) if not _assembled(partial, u)]
    for key in retrain_edits_without_weights(partial, units):
        log(f"{key}: its edited weights are gone and its battery is not done; training it again")
    context = None
    if workers <= 1:
        context = build_context(partial, hm, progress=progress, log=log)
    device = str(hm.device)
    del hm  # workers load their own copies
    timing = run_units(
        partial, units, make_context=worker_context, executor=execute_unit, workers=workers,
        priority=UNIT_PRIORITY, context=context, log=log, on_done=lambda *_: run.save_clock(),
    )  # fmt: skip
    assemble_results(partial, config)
    shutil.rmtree(partial / "units" / "weights", ignore_errors=True)  # every result is written
    shutil.rmtree(partial / SWEEP_CHECKPOINTS, ignore_errors=True)
    write_sweep_summaries(partial, config, plan["base_retain_accuracy"])
    parts = record_part(partial, workers, timing, units)

    hparams = {
        spec.name: chosen_hyperparameters(partial, config, spec.name)
        for spec in config.localizations
    }
    seconds = run.save_clock()
    atomic_write_json(
        partial / "run.json",
        {
            "name": config.name,
            "model": config.model,
            "seconds": seconds,
            "mechunlearn": __version__,
            "torch": torch.__version__,
            "threads": 1 if workers > 1 else torch.get_num_threads(),
            "workers": workers,
            "device": device,
            "python": platform.python_version(),
            "n_known": len(known),
            "localization_facts": plan["localization_facts"],
            "validation": facts.validation.to_json(),
            "hyperparameters": {k: v.model_dump() for k, v in hparams.items()},
            "sweep_selection": config.sweep.selection if config.sweep else None,
            "phases": parts[-1]["phases"],
            "parts": parts,
        },
    )
    write_report(partial, MEASUREMENTS.columns())
    return run.finalise()


def _subject_aligned_ids(hm, records: list[FactRecord], log: Callable[[str], None]) -> set[str]:
    """The facts whose subject falls on token boundaries (localization, probes and patching
    read the subject's tokens); the others are left out of every split, and said so."""
    kept = {r.id for r in records if subject_aligned(hm, r)}
    left_out = [r for r in records if r.id not in kept]
    if left_out:
        log(
            f"{len(left_out)} known facts left out: their subject does not fall on token "
            f"boundaries (e.g. {left_out[0].subject!r} in {left_out[0].prompt()!r})"
        )
    return kept


def _edit(ctx: EditContext, spec, loc, hp: Hyperparameters, data: TrainData, seed, weights):
    """Train (localization, seed) and save the edited weights for its battery's parts."""
    config = ctx.config
    train_config = with_changes(
        spec.train_config(config.train), lr=hp.lr, forget_coef=hp.forget_coef, seed=seed
    )
    with editing(ctx.hm, spec.trainer, loc.selected) as trainable:
        trained = train(
            ctx.hm,
            trainable,
            data,
            train_config,
            progress=ctx.progress,
            log=ctx.log,
            forget_perturbation=forget_perturbation(spec),
        )
        if spec.trainer == "lora":
            trainable.merge()  # the battery's own LoRA attack then sits on plain weights
        save_weights(ctx.hm, loc.selected, weights)
        if config.save_models and seed == config.seeds[0]:
            save_edited(ctx.hm, ctx.folder / "models" / spec.name)
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
            "adversary": trained.info.get("adversary"),
        },
    }
