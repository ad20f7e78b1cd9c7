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
    full: Annotated[bool, typer.Option("--full", help="every seed in the config")] = False,
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
    """Run an experiment: editing/unlearning (localize, edit, attack, report), or targeted LAT
    (``kind: lat`` in the YAML: train, attack, report)."""
    from mechunlearn.experiments.config import load_yaml_config, validate_config
    from mechunlearn.experiments.edit_config import ExperimentConfig, resolve_config
    from mechunlearn.experiments.edit_job import run_experiment

    config = resolve_config(config)
    if seeds is not None and full:
        raise typer.BadParameter("give --seeds N or --full, not both")
    if seeds is not None and seeds < 1:
        raise typer.BadParameter("--seeds must be at least 1")
    if _config_kind(config) == "lat":
        unused = [
            flag
            for flag, given in (
                ("--no-cache", no_cache),
                ("--save-models", save_models),
                ("--counterfact", counterfact is not None),
            )
            if given
        ]
        if unused:
            from mechunlearn.errors import ConfigError

            raise ConfigError(f"{', '.join(unused)}: not used by LAT experiments ({config})")
        folder = _run_lat(config, out, seeds, model, data, device, resume, quiet)
        console.print((folder / "results.md").read_text(), markup=False, highlight=False)
        console.print(f"results: {folder}/results.md, summary.json, figures/")
        return
    cfg = load_yaml_config(ExperimentConfig, config)
    updates: dict[str, Any] = {
        k: v for k, v in {"model": model, "data": data, "device": device}.items() if v is not None
    }
    if save_models:
        updates["save_models"] = True
    if counterfact is not None:
        evaluation = cfg.evaluation.model_dump() | {"counterfact_side_effects": counterfact}
        updates["evaluation"] = evaluation
    if seeds is not None:
        updates["seeds"] = cfg.seeds[:seeds]
    cfg = validate_config(ExperimentConfig, cfg.model_dump() | updates, str(config))
    if workers is None:
        from mechunlearn.experiments.workers import idle_cores

        workers = idle_cores()
    log = make_log(quiet)
    log(f"{workers} worker process(es)")
    folder = run_experiment(
        cfg,
        out,
        resume=resume,
        use_cache=not no_cache,
        progress=show_progress(quiet) and workers == 1,
        workers=workers,
        log=log,
    )
    console.print((folder / "results.md").read_text(), markup=False, highlight=False)
    console.print(f"results: {folder}/results.md, summary.json, figures/")


def _config_kind(path: str) -> str:
    """The ``kind`` key of an experiment YAML (``edit`` when absent or unreadable: the
    editing config's own validation then reports the problem)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return "edit"
    return str(data.get("kind", "edit")) if isinstance(data, dict) else "edit"


def _run_lat(
    config: str,
    out: Path,
    seeds: int | None,
    model: str | None,
    data: str | None,
    device: str | None,
    resume: bool,
    quiet: bool,
) -> Path:
    from mechunlearn.experiments.config import load_yaml_config, validate_config
    from mechunlearn.experiments.lat_config import LatExperimentConfig
    from mechunlearn.experiments.lat_job import run_lat_experiment

    cfg = load_yaml_config(LatExperimentConfig, config)
    updates: dict[str, Any] = {
        k: v for k, v in {"model": model, "data": data, "device": device}.items() if v is not None
    }
    if seeds is not None:
        updates["seeds"] = cfg.seeds[:seeds]
    cfg = validate_config(LatExperimentConfig, cfg.model_dump() | updates, str(config))
    return run_lat_experiment(
        cfg, out, resume=resume, progress=show_progress(quiet), log=make_log(quiet)
    )


@app.command("report")
@user_errors
def report_command(
    run: Annotated[Path, typer.Argument(help="a finished (or partial) experiment folder")],
) -> None:
    """Re-render results.md, summary.json and figures/ from an experiment's saved results
    (editing and targeted-LAT runs alike)."""
    from mechunlearn.report.experiment import write_report

    if not run.is_dir():
        from mechunlearn.errors import DataError

        raise DataError(f"run folder {run} does not exist")
    write_report(run)
    console.print((run / "results.md").read_text(), markup=False, highlight=False)
