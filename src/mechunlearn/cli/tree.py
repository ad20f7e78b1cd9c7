"""The ``tree`` command group: train, evaluate and analyze the path-finding transformer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from mechunlearn.cli.common import (
    ConfigOpt,
    DeviceOpt,
    QuietOpt,
    SeedOpt,
    app,
    build_config,
    console,
    make_log,
    show_progress,
    user_errors,
)

CheckpointOpt = Annotated[
    str,
    typer.Option(
        help="a saved tree model folder (or a tree train --out folder), or the name of a "
        "checkpoint that comes with the package ('shipped', the n = 8 model; others are "
        "listed when a name is unknown)"
    ),
]

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
@user_errors
def tree_train(
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML recipe, 'shipped' (the shipped checkpoint's) or a shipped recipe's name "
            "(depth-n8-6layers, paper-n16, ...); command-line options override it"
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="run folder: state/ (resume), model/ (checkpoint), metrics.json")
    ] = Path("runs/tree"),
    preset: Annotated[
        str | None,
        typer.Option(help="model preset: paper | cpu (default: the config's model)"),
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
    extend: Annotated[
        bool,
        typer.Option(
            "--extend",
            help="with --resume: continue with a larger --steps (the schedule is stretched)",
        ),
    ] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train the path-finding model on fresh trees; writes OUT/model and OUT/metrics.json."""
    from mechunlearn.reasoning.shipped_recipes import resolve_recipe
    from mechunlearn.reasoning.train import TreeTrainConfig, train_tree_model

    values = {
        "model": preset,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "precision": precision,
        "compile": True if compile else None,
        "device": device,
    }
    if config is not None:
        config = resolve_recipe(config)
    cfg = build_config(TreeTrainConfig, config, values)
    result = train_tree_model(
        cfg,
        out,
        resume=resume,
        progress=show_progress(quiet),
        log=make_log(quiet),
        until=until,
        extend=extend,
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


@tree_app.command("export")
@user_errors
def tree_export(
    run: Annotated[Path, typer.Option(help="a tree train --out folder (finished or not)")],
    out: Annotated[Path, typer.Option(help="checkpoint folder to write (replaced)")],
    per_length: Annotated[int, typer.Option(help="held-out trees per path length")] = 500,
) -> None:
    """Export a run's newest training state as a checkpoint (with its held-out accuracy), so a
    long run can be evaluated, analysed or shipped before its last step."""
    from mechunlearn.errors import ConfigError
    from mechunlearn.reasoning.model import load_tree_model
    from mechunlearn.reasoning.train import export_state
    from mechunlearn.runtime import configure_threads

    if per_length < 1:
        raise ConfigError("--per-length must be at least 1")
    configure_threads()
    folder = export_state(run, out, per_length)
    loaded = load_tree_model(folder)
    accuracy = loaded.meta["accuracy"]
    console.print(_accuracy_table(accuracy, f"{folder} (step {loaded.meta['step']})"))


@tree_app.command("eval")
@user_errors
def tree_eval(
    checkpoint: CheckpointOpt = "shipped",
    per_length: Annotated[int, typer.Option(help="held-out trees per path length")] = 500,
    seed: Annotated[int, typer.Option(help="seed of the evaluation stream")] = 0,
    edge_order: Annotated[
        str | None, typer.Option(help="mixed | backward | random | forward (default: the task's)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="trees per forward pass")] = 1024,
    device: DeviceOpt = None,
    out: Annotated[
        Path | None,
        typer.Option(help="also write the accuracy, with what was evaluated, to this JSON file"),
    ] = None,
) -> None:
    """Whole-path accuracy of a tree model by path length on held-out trees."""
    from mechunlearn.errors import ConfigError
    from mechunlearn.io import atomic_write_json
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
    distinct = trees.distinct_by_length()
    console.print(
        "distinct trees (structure and goal) by path length: "
        + ", ".join(f"{length}: {count}" for length, count in distinct.items())
    )
    if out is not None:
        record = {
            "checkpoint": str(loaded.path),
            "per_length": per_length,
            "seed": seed,
            "edge_order": edge_order or loaded.task.edge_order,
            "accuracy": accuracy,
            "distinct_trees": distinct,
        }
        atomic_write_json(out, record)
        console.print(f"written: {out}")


@tree_app.command("analyze")
@user_errors
def tree_analyze(
    checkpoint: CheckpointOpt = "shipped",
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
    cfg = build_config(TreeAnalysisConfig, config, values)
    analysis = analyze_checkpoint(
        checkpoint,
        out,
        cfg,
        device=device,
        expect=expect,
        progress=show_progress(quiet),
        log=make_log(quiet),
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
    console.print(analysis.sample.markdown().replace("**", "").strip(), markup=False)
    console.print(
        f"results: {out}/results.json, {out}/summary.md, figures in {out}/figures", markup=False
    )


@tree_app.command("compare")
@user_errors
def tree_compare(
    analyses: Annotated[
        list[Path], typer.Argument(help="`tree analyze --out` folders, shallowest model first")
    ],
    out: Annotated[
        Path, typer.Option(help="folder for comparison.md, comparison.json, figures/depth.png")
    ] = Path("runs/tree-depth"),
    label: Annotated[
        list[str] | None, typer.Option(help="a name per analysis folder, in order (repeat)")
    ] = None,
) -> None:
    """Mechanism verdicts of several analysed tree models side by side, against depth relative
    to path length (issue 17's depth question)."""
    from mechunlearn.report.tree_depth import depth_markdown, write_depth_comparison

    models = write_depth_comparison(list(analyses), out, label)
    console.print(depth_markdown(models), markup=False, highlight=False)
    console.print(f"written: {out}/comparison.md, {out}/comparison.json, {out}/figures/depth.png")
