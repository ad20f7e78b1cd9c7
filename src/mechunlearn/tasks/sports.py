"""The sports-facts task: athlete -> sport (baseball, basketball or football).

This is the fact set of Nanda et al. (2023) and Guo et al. (2024), where a whole sport can be
forgotten while the others are retained. The CSV format is the published one (``athlete,sport``).
"""

from __future__ import annotations

import csv
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from mechunlearn.errors import DataError
from mechunlearn.tasks.formats import fill
from mechunlearn.tasks.records import FactRecord

SPORTS = ("baseball", "basketball", "football")
REQUIRED_COLUMNS = ("athlete", "sport")
TEMPLATE = "Fact: {subject} plays the sport of"
QUESTION = "What sport does {subject} play?"
PARAPHRASE_TEMPLATES = (
    "{subject} is a professional athlete who plays",
    "The sport played by {subject} is",
    "{subject} is best known for playing",
)
SHIPPED_NAME = "athletes.csv"


def make_record(athlete: str, sport: str) -> FactRecord:
    """The fact record for one athlete; options are all sports in a fixed order."""
    return FactRecord(
        id=f"sports:{athlete}",
        subject=athlete,
        template=TEMPLATE,
        answer=sport,
        options=SPORTS,
        relation="sport",
        question=QUESTION,
        paraphrases=tuple(fill(t, athlete) for t in PARAPHRASE_TEMPLATES),
    )


def load_sports(path: str | Path | None = None) -> list[FactRecord]:
    """Load athlete facts from ``path`` or, when ``None``, from the shipped data file.

    Sport names are matched case-insensitively; repeated identical rows are kept once.
    """
    if path is not None:
        return _read_file(Path(path), str(path))
    shipped = resources.files("mechunlearn.tasks").joinpath("data", SHIPPED_NAME)
    with resources.as_file(shipped) as local:
        return _read_file(local, f"shipped data file {local}")


def _read_file(path: Path, label: str) -> list[FactRecord]:
    if not path.is_file():
        raise DataError(f"{label}: sports data file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            return _parse(csv.DictReader(handle), label)
    except UnicodeDecodeError as exc:
        raise DataError(f"{label}: not UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise DataError(f"{label}: malformed CSV ({exc})") from None


def _check_header(reader: csv.DictReader, label: str) -> None:
    if reader.fieldnames is None:
        raise DataError(f"{label}: file is empty (expected a header 'athlete,sport')")
    found = [name.strip() for name in reader.fieldnames if name is not None]
    missing = [c for c in REQUIRED_COLUMNS if c not in found]
    if missing:
        raise DataError(
            f"{label}: missing required column(s) {', '.join(missing)}; "
            f"needs {', '.join(REQUIRED_COLUMNS)}, found {', '.join(found) or '(none)'}"
        )
    reader.fieldnames = found  # tolerate spaces around header names


def _parse(reader: csv.DictReader, label: str) -> list[FactRecord]:
    _check_header(reader, label)
    seen: dict[str, tuple[str, int]] = {}
    records: list[FactRecord] = []
    for row in reader:
        line = reader.line_num
        athlete, sport = _row_fact(row, label, line)
        if athlete in seen:
            _check_duplicate(athlete, sport, seen[athlete], label, line)
            continue
        seen[athlete] = (sport, line)
        records.append(_record(athlete, sport, label, line))
    if not records:
        raise DataError(f"{label}: no data rows after the header")
    return records


def _row_fact(row: dict[str, str | None], label: str, line: int) -> tuple[str, str]:
    athlete = (row.get("athlete") or "").strip()
    sport = (row.get("sport") or "").strip().lower()
    if not athlete:
        raise DataError(f"{label}, line {line}: athlete is blank")
    if sport not in SPORTS:
        raise DataError(
            f"{label}, line {line}: sport {sport!r} for {athlete!r} is not one of "
            f"{', '.join(SPORTS)}"
        )
    return athlete, sport


def _check_duplicate(
    athlete: str, sport: str, first: tuple[str, int], label: str, line: int
) -> None:
    """Exact repeats are harmless; a conflicting sport means the data cannot be trusted."""
    first_sport, first_line = first
    if sport != first_sport:
        raise DataError(
            f"{label}, line {line}: athlete {athlete!r} is listed as {sport!r} "
            f"but as {first_sport!r} on line {first_line}"
        )


def _record(athlete: str, sport: str, label: str, line: int) -> FactRecord:
    try:
        return make_record(athlete, sport)
    except ValidationError as exc:
        raise DataError(f"{label}, line {line}: invalid record ({_reasons(exc)})") from None


def _reasons(exc: ValidationError) -> str:
    """Pydantic's reasons on one line, so the CLI can print a single clear message."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in exc.errors()
    )
