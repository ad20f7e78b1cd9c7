"""Atomic file output: a crash or a bad input never leaves a half-written result behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file name beside ``path`` for a writer that takes a file name (e.g.
    safetensors); on success it replaces ``path``, on any exception it is deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """A JSON file this package wrote (run folders); user files get their own checked readers."""
    return json.loads(Path(path).read_text())


def atomic_write_yaml(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


@contextmanager
def atomic_directory(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final`` whole.

    On any exception the temporary folder is deleted and ``final`` is left untouched, so a
    results folder is either complete or absent.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, final)


def move_into_place(finished: str | Path, final: str | Path) -> None:
    """Put a finished folder at ``final``, replacing what is there only at the last moment."""
    finished, final = Path(finished), Path(final)
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, backup)
        os.replace(finished, final)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(finished, final)


class RunClock:
    """Wall time of a run summed over its interrupted and resumed parts (``time.json``), so the
    reported time of a run that took several sessions is still its total."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "time.json"
        self.before = json.loads(self.path.read_text())["seconds"] if self.path.is_file() else 0.0
        self.started = time.time()

    @property
    def seconds(self) -> float:
        return self.before + time.time() - self.started

    def save(self) -> None:
        atomic_write_json(self.path, {"seconds": round(self.seconds, 1)})
