"""The ``eval`` job: load facts, load a model, evaluate every format, write a run folder.

Input is validated and the data read *before* the model loads, so bad input fails in
seconds; the run folder is assembled in a temporary sibling and moved into place only when
complete, so a failure never leaves partial results.
"""

from __future__ import annotations

import json
import platform
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mechunlearn import __version__
from mechunlearn.evals.harness import EvalResult, evaluate
from mechunlearn.experiments.config import EvalConfig
from mechunlearn.io import atomic_directory, atomic_write_json, atomic_write_text, atomic_write_yaml
from mechunlearn.models.loading import load_model
from mechunlearn.tasks.datasets import load_task
from mechunlearn.tasks.general_text import load_general_text
from mechunlearn.tasks.records import FactRecord


def select_records(config: EvalConfig) -> list[FactRecord]:
    records = load_task(config.task, config.data)
    if config.limit is not None and config.limit < len(records):
        records = sorted(
            random.Random(config.seed).sample(records, config.limit), key=lambda r: r.id
        )
    return records


def run_eval(
    config: EvalConfig,
    out: str | Path,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> EvalResult:
    records = select_records(config)
    texts = load_general_text()[: config.lm_texts] if config.lm_loss else None
    started = time.time()
    hm = load_model(
        config.model,
        device=config.device,
        dtype=config.dtype,
        device_map=config.device_map,
        log=log,
    )
    log(
        f"loaded {config.model} ({hm.model.config.model_type}, {hm.dims.n_layers} layers) on {hm.device}"
    )
    result = evaluate(
        hm,
        records,
        config.formats,
        seed=config.seed,
        batch_size=config.batch_size,
        format_options=config.format_options,
        known_threshold=config.known_threshold,
        general_text=texts,
        progress=progress,
    )
    result.extra["run"] = {
        "model": config.model,
        "task": config.task,
        "n_facts": len(records),
        "seconds": round(time.time() - started, 1),
        "mechunlearn": __version__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(hm.device),
        "dtype": config.dtype,
        "python": platform.python_version(),
    }
    write_run(out, config, result)
    return result


def write_run(out: str | Path, config: EvalConfig, result: EvalResult) -> Path:
    """config.yaml (resolved), metrics.json, items.jsonl, known_facts.json - all or nothing."""
    with atomic_directory(out) as tmp:
        atomic_write_yaml(tmp / "config.yaml", config.model_dump(mode="json"))
        metrics: dict[str, Any] = result.to_json()
        if metrics.get("known"):
            atomic_write_json(tmp / "known_facts.json", metrics["known"])
            metrics["known"] = {k: v for k, v in metrics["known"].items() if k != "known_ids"}
        atomic_write_json(tmp / "metrics.json", metrics)
        atomic_write_text(
            tmp / "items.jsonl", "".join(json.dumps(row) + "\n" for row in result.item_rows())
        )
    return Path(out)
