"""General text used to check that an edit leaves ordinary language modelling intact."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from mechunlearn.errors import DataError

SHIPPED_NAME = "general_text.txt"


def load_general_text(path: str | Path | None = None) -> list[str]:
    """Non-blank lines (one sentence each) of ``path``, or of the shipped file when ``None``."""
    if path is not None:
        return _read_lines(Path(path), str(path))
    shipped = resources.files("mechunlearn.tasks").joinpath("data", SHIPPED_NAME)
    with resources.as_file(shipped) as local:
        return _read_lines(local, f"shipped data file {local}")


def _read_lines(path: Path, label: str) -> list[str]:
    if not path.is_file():
        raise DataError(f"{label}: general text file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{label}: not UTF-8 text ({exc})") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{label}: general text file is empty")
    return lines
