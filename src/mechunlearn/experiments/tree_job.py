"""``mechunlearn run CONFIG`` with ``kind: tree``: train the path-finding transformer of
Brinkmann et al. (2024) in the shared run folder (``experiments.run_folder``).

The training state (``state/``, written every ``checkpoint_every`` steps) lives in
``OUT.partial`` while the run is unfinished, so ``--resume`` continues it exactly; the folder
moves to ``OUT`` (``model/``, ``metrics.json``, ``run.json``) only when training and the final
evaluation are done.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from mechunlearn import __version__
from mechunlearn.experiments.run_folder import RunFolder
from mechunlearn.io import atomic_write_json
from mechunlearn.reasoning.train import TreeTrainConfig, train_tree_model
from mechunlearn.schema import STRICT_CONFIG


class TreeExperimentConfig(BaseModel):
    """``kind: tree``: one training recipe (``train``: a ``TreeTrainConfig``)."""

    model_config = STRICT_CONFIG

    kind: Literal["tree"]
    name: str = "tree"
    description: str = ""
    train: TreeTrainConfig = Field(default_factory=TreeTrainConfig)


def run_tree_experiment(
    config: TreeExperimentConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
    until: int | None = None,
) -> Path:
    """Train ``config.train`` (see the module docstring). Returns the folder holding the run:
    ``OUT`` when finished, ``OUT.partial`` when stopped early by ``until``."""
    run = RunFolder(out, config, resume=resume)
    partial = run.open(time.time())
    result = train_tree_model(
        config.train, partial, resume=resume, progress=progress, log=log, until=until
    )
    seconds = run.save_clock()
    if result.accuracy is None:
        log(f"stopped at step {result.steps} of {config.train.steps}; continue with --resume")
        return partial
    atomic_write_json(
        partial / "run.json",
        {
            "kind": "tree",
            "name": config.name,
            "seconds": seconds,
            "steps": result.steps,
            "mechunlearn": __version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
    )
    return run.finalise()
