"""Preference examples for targeted latent adversarial training and the latent adversary
(Sheshadri et al. 2024, arXiv:2407.15549): a prompt, the completion we want (``desired``) and
the one we do not (``unwanted``). Pure data; their tokenized batches are
``models.batches.LatBatch``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mechunlearn.errors import DataError

KINDS = ("unwanted", "desired")


@dataclass(frozen=True)
class LatExample:
    """One targeted-LAT example: a prompt, the completion we want, the one we do not."""

    prompt: str
    desired: str
    unwanted: str


COLUMNS = ("prompt", "desired", "unwanted")


@dataclass
class LatData:
    """Examples for the latent adversary and the LAT trainer; ``validate()`` before use."""

    examples: list[LatExample] = field(default_factory=list)

    @classmethod
    def from_rows(
        cls,
        rows: Sequence[Mapping[str, Any]],
        prompt: str = "prompt",
        desired: str = "desired",
        unwanted: str = "unwanted",
    ) -> LatData:
        """From table rows (e.g. JSONL records); the column names are configurable."""
        names = {"prompt": prompt, "desired": desired, "unwanted": unwanted}
        examples = []
        for index, row in enumerate(rows):
            missing = [col for col in names.values() if col not in row]
            if missing:
                raise DataError(
                    f"row {index} lacks column(s) {', '.join(map(repr, missing))} "
                    f"(has: {', '.join(map(repr, row))})"
                )
            examples.append(LatExample(**{k: row[c] for k, c in names.items()}))
        data = cls(examples)
        data.validate()
        return data

    def validate(self) -> None:
        if not self.examples:
            raise DataError("no LAT examples (each needs a prompt, a desired and an unwanted text)")
        for index, ex in enumerate(self.examples):
            if not isinstance(ex, LatExample):
                raise DataError(f"example {index} is a {type(ex).__name__}, not a LatExample")
            for column in COLUMNS:
                value = getattr(ex, column)
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f"example {index}: {column!r} is missing or empty ({value!r})")
            if ex.desired == ex.unwanted:
                raise DataError(
                    f"example {index}: desired and unwanted completions are the same "
                    f"({ex.desired!r})"
                )

    def __len__(self) -> int:
        return len(self.examples)
