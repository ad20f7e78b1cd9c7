"""One run folder for every experiment (editing, LAT, tree training): built in ``OUT.partial``,
resumable, refused when resumed with another config, timed across resumed parts, and moved to
``OUT`` only when complete, so ``OUT`` never holds partial results.

Every result inside is written atomically (``write_json``), one file per unit of work, so a run
killed at any moment (even by SIGKILL) resumes with no lost or half-written unit.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from mechunlearn.errors import ConfigError
from mechunlearn.io import RunClock, atomic_write_json, atomic_write_yaml, move_into_place


class RunFolder:
    """``OUT.partial`` while running, ``OUT`` when finalised.

    A folder's saved config is the same experiment when it validates, as ``config``'s class,
    to the same values apart from the fields in ``ignore`` (e.g. the seeds, so a one-seed run
    can be extended to all seeds).
    """

    def __init__(
        self,
        out: str | Path,
        config: BaseModel,
        *,
        resume: bool,
        ignore: frozenset[str] = frozenset(),
    ) -> None:
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.config = config
        self.resume = resume
        self.ignore = set(ignore)
        self.clock: RunClock | None = None

    def _same(self, saved: dict[str, Any]) -> bool:
        saved_config = type(self.config).model_validate(saved)
        return saved_config.model_dump(exclude=self.ignore) == self.config.model_dump(
            exclude=self.ignore
        )

    def check(self) -> None:
        """Refuse to resume another experiment's folder (before anything is written)."""
        for folder in (self.partial, self.out):
            if self.resume and (folder / "config.yaml").is_file():
                saved = yaml.safe_load((folder / "config.yaml").read_text())
                if not self._same(saved):
                    raise ConfigError(
                        f"{folder} was run with another config; rerun without --resume"
                    )
                return

    def open(self, started: float | None = None) -> Path:
        """Create (or, resuming, reuse) the partial folder; a finished run being extended moves
        back to it. ``started``: when the run's work began (model loading counts)."""
        self.check()
        if self.resume and not self.partial.exists() and (self.out / "config.yaml").is_file():
            os.replace(self.out, self.partial)
        if self.partial.exists() and not self.resume:
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        atomic_write_yaml(self.partial / "config.yaml", self.config.model_dump(mode="json"))
        self.clock = RunClock(self.partial)
        if started is not None:
            self.clock.started = started
        return self.partial

    def path(self, relative: str | Path) -> Path:
        return self.partial / relative

    def has(self, relative: str | Path) -> bool:
        return (self.partial / relative).is_file()

    def read_json(self, relative: str | Path) -> Any:
        return json.loads((self.partial / relative).read_text())

    def write_json(self, relative: str | Path, data: Any) -> Path:
        return atomic_write_json(self.partial / relative, data)

    def save_clock(self) -> float:
        """Save the run's total wall time (``time.json``) and return the seconds saved."""
        if self.clock is None:
            return 0.0
        self.clock.save()
        return json.loads(self.clock.path.read_text())["seconds"]

    @property
    def seconds(self) -> float:
        return self.clock.seconds if self.clock is not None else 0.0

    def finalise(self) -> Path:
        """Move the complete run to ``OUT`` (replacing an older one only at the last moment).
        The clock was saved with the run's record; rendering the report is not counted."""
        move_into_place(self.partial, self.out)
        return self.out
