"""Training checkpoints: enough state to continue a run exactly where it stopped.

A checkpoint is a folder ``step-NNNNNN`` written atomically (a crash leaves the previous one
intact) holding the trained parameters (``params.safetensors``), optimizer and scheduler state
and the batch streams' generator states (``*.pt``, read back with ``weights_only=True``), and
``state.json`` (step, history, run description). Only the newest checkpoint is kept.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mechunlearn.errors import DataError
from mechunlearn.io import atomic_directory, atomic_write_json

_STEP_RE = re.compile(r"^step-(\d{6,})$")


@dataclass
class Checkpoint:
    step: int
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    streams: dict[str, Any]
    history: dict[str, list[float]]
    meta: dict[str, Any]
    path: Path


def save_checkpoint(
    directory: str | Path,
    step: int,
    params: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    scheduler: dict[str, Any],
    streams: dict[str, Any],
    history: dict[str, list[float]],
    meta: dict[str, Any],
) -> Path:
    """Write ``directory/step-NNNNNN`` atomically, then delete older checkpoints."""
    directory = Path(directory)
    final = directory / f"step-{step:06d}"
    with atomic_directory(final) as tmp:
        save_file(
            {name: t.detach().to("cpu").contiguous().clone() for name, t in params.items()},
            str(tmp / "params.safetensors"),
        )
        torch.save(optimizer, tmp / "optimizer.pt")
        torch.save(scheduler, tmp / "scheduler.pt")
        torch.save(streams, tmp / "streams.pt")
        atomic_write_json(tmp / "state.json", {"step": step, "history": history, "meta": meta})
    for old in directory.iterdir():
        match = _STEP_RE.match(old.name)
        if match and int(match.group(1)) < step and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest complete checkpoint folder in ``directory``, or None."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in directory.iterdir()
        if (m := _STEP_RE.match(p.name)) and (p / "state.json").is_file()
    ]
    return max(found)[1] if found else None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint folder (tensors via safetensors / ``weights_only`` loads only)."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        return Checkpoint(
            step=int(state["step"]),
            params=load_file(str(path / "params.safetensors")),
            optimizer=torch.load(path / "optimizer.pt", weights_only=True),
            scheduler=torch.load(path / "scheduler.pt", weights_only=True),
            streams=torch.load(path / "streams.pt", weights_only=True),
            history=state["history"],
            meta=state["meta"],
            path=path,
        )
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(f"checkpoint {path} is unreadable: {exc}") from None
