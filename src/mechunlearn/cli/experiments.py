"""Experiment commands: ``run`` (editing/unlearning or LAT, by the YAML's ``kind``) and ``report``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mechunlearn.cli.common import (
    DataOpt,
    DeviceOpt,
    ModelOpt,
    QuietOpt,
    app,
    console,
    make_log,
    show_progress,
    user_errors,
)


@app.command("run")
@user_errors
def run_command(
    config: Annotated[
        str,
        typer.Argument(
            help="experiment YAML, or a shipped config name (sports-athlete-edit-16, ...)"
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="run folder (built in OUT.partial, moved when complete)")
    ] = Path("runs/experiment"),
    seeds: Annotated[
        int | None, typer.Option(help="use only the first N seeds of the config (quick: 1)")
    ] = None,
    full: Annotated[
        bool,
        typer.Option(
            "--full", help="every seed in the config, overriding --seeds (e.g. the quickstart's)"
        ),
    ] = False,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="override a config value, KEY.PATH=VALUE (YAML value; repeatable), e.g. "
            "--set train.steps=40 --set localizations.0.train.steps=60",
        ),
    ] = None,
    model: ModelOpt = None,
    data: DataOpt = None,
    device: DeviceOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue OUT.partial from an interrupted run")
    ] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="recompute localizations even if cached")
    ] = False,
    save_models: Annotated[
        bool,
        typer.Option(
            "--save-models", help="save each edited model (first seed) with save_pretrained"
        ),
    ] = False,
    counterfact: Annotated[
        str | None,
        typer.Option(
            help="CounterFact JSON: its neighbourhood score as a side effect of every edit"
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="worker processes for independent units (one torch thread each); default: "
            "the idle cores",
        ),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Run an experiment: editing/unlearning (localize, edit, attack, report), targeted LAT
    (``kind: lat``: train, attack, report) or path-finding training (``kind: tree``); the
    YAML's ``kind`` selects the config schema it is validated against."""
    from mechunlearn.errors import ConfigError
    from mechunlearn.experiments.config import apply_overrides, read_yaml_mapping, validate_config
    from mechunlearn.experiments.edit_config import ExperimentConfig, resolve_config
    from mechunlearn.experiments.experiment_file import validate_experiment
    from mechunlearn.experiments.lat_config import LatExperimentConfig

    path = resolve_config(config)
    cfg = validate_experiment(apply_overrides(read_yaml_mapping(path), overrides or []), str(path))
    if full:
        seeds = None  # every seed, whatever --seeds said
    if seeds is not None and seeds < 1:
        raise typer.BadParameter("--seeds must be at least 1")
    log = make_log(quiet)
    given = {
        "--no-cache": no_cache,
        "--save-models": save_models,
        "--counterfact": counterfact is not None,
        "--workers": workers is not None,
        "--model": model is not None,
        "--data": data is not None,
        "--device": device is not None,
        "--seeds": seeds is not None,
    }
    supported = {
        ExperimentConfig: set(given),
        LatExperimentConfig: {"--model", "--data", "--device", "--seeds", "--workers"},
    }.get(type(cfg), set())
    unused = [flag for flag, on in given.items() if on and flag not in supported]
    if unused:
        label = {"lat": "LAT", "tree": "tree-training"}.get(cfg.kind, cfg.kind)
        raise ConfigError(f"{', '.join(unused)}: not used by {label} experiments ({config})")
    if cfg.kind == "tree":
        from mechunlearn.experiments.tree_job import run_tree_experiment

        folder = run_tree_experiment(
            cfg, out, resume=resume, progress=show_progress(quiet), log=log
        )
        console.print(f"run folder: {folder}", markup=False)
        return
    updates: dict[str, Any] = {
        k: v for k, v in {"model": model, "data": data, "device": device}.items() if v is not None
    }
    if seeds is not None:
        updates["seeds"] = cfg.seeds[:seeds]
    from mechunlearn.experiments.workers import idle_cores

    if cfg.kind == "lat":
        from mechunlearn.experiments.lat_job import run_lat_experiment as run_job

        cfg = validate_config(LatExperimentConfig, cfg.model_dump() | updates, str(config))
        options = {}
    else:
        from mechunlearn.experiments.edit_job import run_experiment as run_job

        if save_models:
            updates["save_models"] = True
        if counterfact is not None:
            updates["evaluation"] = cfg.evaluation.model_dump() | {
                "counterfact_side_effects": counterfact
            }
        cfg = validate_config(ExperimentConfig, cfg.model_dump() | updates, str(config))
        options = {"use_cache": not no_cache}
    workers = workers if workers is not None else idle_cores()
    log(f"{workers} worker process(es)")
    folder = run_job(
        cfg,
        out,
        resume=resume,
        progress=show_progress(quiet) and workers == 1,
        workers=workers,
        log=log,
        **options,
    )
    console.print((folder / "results.md").read_text(), markup=False, highlight=False)
    console.print(f"results: {folder}/results.md, summary.json, figures/", markup=False)


@app.command("report")
@user_errors
def report_command(
    run: Annotated[Path, typer.Argument(help="a finished (or partial) experiment folder")],
) -> None:
    """Re-render results.md, summary.json and figures/ from an experiment's saved results
    (editing and targeted-LAT runs alike)."""
    from mechunlearn.experiments.measurements import MEASUREMENTS
    from mechunlearn.report.experiment import write_report

    if not run.is_dir():
        from mechunlearn.errors import DataError

        raise DataError(f"run folder {run} does not exist")
    write_report(run, MEASUREMENTS.columns())
    console.print((run / "results.md").read_text(), markup=False, highlight=False)


@app.command("derive")
@user_errors
def derive_command(
    name: Annotated[str, typer.Argument(help="derived model to build (gemma3-270m-mcq)")],
    data: Annotated[
        Path,
        typer.Option(
            help="athletes CSV (athlete,sport); its athletes outside the shipped set are trained on"
        ),
    ],
    steps: Annotated[
        int | None, typer.Option(help="training steps (default: the recipe's)")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate (default: the recipe's)")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Build a derived model into the cache by its recorded recipe (e.g. Gemma 3 270M
    format-tuned on letter MCQ); afterwards ``--model NAME`` loads it anywhere."""
    import json

    from mechunlearn.experiments.derive_job import RECIPES, FormatTuneRecipe, derive_model

    if name not in RECIPES:
        from mechunlearn.errors import ConfigError

        raise ConfigError(f"unknown derived model {name!r}; known: {', '.join(sorted(RECIPES))}")
    recipe = RECIPES[name]
    changes = {k: v for k, v in {"steps": steps, "lr": lr}.items() if v is not None}
    recipe = FormatTuneRecipe.model_validate({**recipe.model_dump(), **changes})
    out = derive_model(
        name, data, recipe=recipe, progress=show_progress(quiet), log=make_log(quiet)
    )
    saved = json.loads((out / "recipe.json").read_text())
    after = saved["validation_after"]
    console.print(
        f"{name}: letter MCQ {100 * after['mcq_accuracy']:.1f}% (chance "
        f"{100 * after['chance']:.1f}%), completion {100 * after['completion_accuracy']:.1f}% on "
        f"{after['n_facts']} held-out known athletes; letters chosen "
        + ", ".join(f"{k} {100 * v:.0f}%" for k, v in after["letter_share"].items())
        + f"; MCQ-capable: {saved['mcq_capable']}; saved in {out}",
        markup=False,
        highlight=False,
    )
