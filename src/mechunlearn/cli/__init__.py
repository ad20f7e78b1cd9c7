"""Command-line interface: ``models``, ``eval``, ``localize``, ``run`` (experiments),
``report`` and the ``tree`` group, one module per group; all register on one Typer ``app``.

Errors the user can fix print one red line and exit with status 2; no traceback, no partial
results.
"""

from mechunlearn.cli import experiments, facts, tree  # noqa: F401  (register the commands)
from mechunlearn.cli.common import app


def main() -> None:  # pragma: no cover - console entry point
    app()


__all__ = ["app", "main"]
