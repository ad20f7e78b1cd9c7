"""The Typer app, the consoles and what every command shares: options, config merging,
logging, and turning user errors into one red line and exit status 2."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from mechunlearn.errors import MechUnlearnError
from mechunlearn.tasks.datasets import TASKS
from mechunlearn.tasks.formats import FORMATS

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Robust knowledge editing and unlearning."
)
# Piped output (logs, CI) gets a fixed width wide enough for the results tables.
console = Console(width=None if sys.stdout.isatty() else 132)
err_console = Console(stderr=True)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MechUnlearnError as exc:
            err_console.print(
                f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(code=2) from None

    return wrapper


ModelOpt = Annotated[
    str | None, typer.Option(help="embedded name, HF folder, .gguf file or hub name")
]
TaskOpt = Annotated[str | None, typer.Option(help=f"fact set: {' | '.join(TASKS.names())}")]
FormatsOpt = Annotated[
    str | None,
    typer.Option(help=f"comma-separated prompt formats, of: {' | '.join(FORMATS.names())}"),
]
LOCALIZATION_METHODS = (
    "activation_patching", "all_mlps", "attribution_patching", "causal_tracing",
    "edge_attribution_patching", "fact_lookup", "last_layer", "nonlocalized", "random",
    "random_mlps",
)  # fmt: skip
"""The localization registry's names, for help text without importing the methods (seconds of
torch and transformers at every ``--help``); a test keeps it equal to ``LOCALIZERS.names()``."""
DataOpt = Annotated[str | None, typer.Option(help="data file (sports CSV or CounterFact JSON)")]
ConfigOpt = Annotated[
    Path | None, typer.Option(help="YAML config; command-line options override it")
]
SeedOpt = Annotated[int | None, typer.Option(help="seed for sampling facts, shuffling and noise")]
DeviceOpt = Annotated[
    str | None, typer.Option(help="cpu, cuda, cuda:1, mps (default: best available)")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", help="no progress bars or log lines")]


def split_formats(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [f.strip() for f in value.split(",") if f.strip()]


def build_config(
    cls,
    config_path: Path | None,
    values: dict[str, Any],
    nested: dict[str, dict[str, Any]] | None = None,
    overrides: list[str] | None = None,
):
    """YAML config (if any) overridden by the command-line values that were given, then by
    ``--set KEY.PATH=VALUE`` assignments (``overrides``)."""
    from mechunlearn.experiments.config import apply_overrides, load_yaml_config, validate_config

    merged = load_yaml_config(cls, config_path).model_dump() if config_path else {}
    merged |= {k: v for k, v in values.items() if v is not None}
    for key, sub in (nested or {}).items():
        merged[key] = dict(merged.get(key) or {}) | {k: v for k, v in sub.items() if v is not None}
    return validate_config(cls, apply_overrides(merged, overrides or []), "from the command line")


def make_log(quiet: bool) -> Callable[[str], None]:
    """Log lines on stderr, each with the time since the command started (long runs are read
    from their logs afterwards: where did the hours go?)."""
    if quiet:
        return lambda _: None
    started = time.monotonic()

    def log(msg: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - started), 60)
        err_console.print(f"[dim]{minutes:4d}:{seconds:02d} {escape(msg)}[/]", highlight=False)

    return log


def show_progress(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()
