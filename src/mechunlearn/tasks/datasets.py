"""Fact data sets by name, so configs and the CLI select a task with a string."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mechunlearn.errors import DataError
from mechunlearn.registry import Registry
from mechunlearn.tasks.counterfact import load_counterfact
from mechunlearn.tasks.records import FactRecord
from mechunlearn.tasks.sports import load_sports

TaskLoader = Callable[[str | Path | None], list[FactRecord]]

TASKS: Registry[TaskLoader] = Registry("task")


@TASKS.register("sports")
def _sports(path: str | Path | None) -> list[FactRecord]:
    """Athlete -> sport; the shipped athlete list unless ``path`` is given."""
    return load_sports(path)


@TASKS.register("counterfact")
def _counterfact(path: str | Path | None) -> list[FactRecord]:
    """CounterFact ships no data with the package, so a path is required."""
    if path is None:
        raise DataError(
            "the counterfact task needs a data file in the ROME CounterFact JSON format, "
            "e.g. --data ../shared/data/counterfact_subset.json"
        )
    return load_counterfact(path)


def load_task(name: str, path: str | Path | None = None) -> list[FactRecord]:
    """Load the records of task ``name``; unknown names raise ``ConfigError``."""
    return TASKS.get(name)(path)
