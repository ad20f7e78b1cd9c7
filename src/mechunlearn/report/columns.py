"""Headline columns of a report, declared by the measurements that produce the metrics.

Each measurement (``experiments.measurements``) registers its columns with its run function,
so a new measurement reaches the report's headline table and bar figure without editing the
report. Columns are ordered by ``SECTIONS`` first, then in the order they were registered; a
column applies to some kinds of run only (``runs``: ``edit`` or ``unlearn`` for editing
experiments, the application for targeted LAT, e.g. ``refusal``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

SECTIONS = ("target", "attack", "latent", "side_effect")
"""Table order: what the training was for (the edit, refusal, ...), attacks that try to undo
it, latent knowledge, then side effects on everything else."""

EDITING = ("edit", "unlearn")
"""The kinds of an editing experiment's run (``mode``)."""

EVAL_SECONDS = "compute.eval_seconds"
"""Prefix of the metrics holding each measurement's wall seconds (``<prefix>.<name>``)."""

TableColumn = tuple[str, str, bool | None]
"""(metric key, title, lower is better) as ``results.markdown_table`` reads it."""


@dataclass(frozen=True)
class Column:
    """A headline metric. ``key`` may hold ``*`` (e.g. ``relearn@*.completion.accuracy``):
    one column per matching metric, ``{part}`` in ``label`` standing for the metric's first
    dotted segment. ``lower``: lower is better (``None``: no desired direction)."""

    key: str
    label: str
    lower: bool | None
    section: str
    runs: tuple[str, ...] = EDITING

    def __post_init__(self) -> None:
        if self.section not in SECTIONS:
            raise ValueError(f"column {self.key!r}: section {self.section!r} not in {SECTIONS}")

    def expand(self, keys: Iterable[str]) -> list[TableColumn]:
        """This column's ``(key, title, lower)`` rows for a run with metrics ``keys``."""
        if "*" not in self.key:
            return [(self.key, self.label, self.lower)]
        found = sorted(k for k in set(keys) if fnmatchcase(k, self.key))
        return [(k, self.label.format(part=k.split(".")[0]), self.lower) for k in found]


def ordered(columns: Sequence[Column]) -> list[Column]:
    """``columns`` in table order: by section, then as given (registration order)."""
    return sorted(columns, key=lambda c: SECTIONS.index(c.section))


def table_columns(columns: Sequence[Column], run: str, keys: Iterable[str]) -> list[TableColumn]:
    """The headline table's columns for a run of kind ``run`` whose metrics are ``keys``."""
    keys = set(keys)
    return [row for c in ordered(columns) if run in c.runs for row in c.expand(keys)]
