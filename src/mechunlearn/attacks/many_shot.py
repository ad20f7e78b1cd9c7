"""Many-shot jailbreaking: an input-space attack on refusal without optimisation (Anil et al.
2024, "Many-shot jailbreaking"). The target request is preceded, in the same conversation, by
``shots`` earlier turns in which the assistant complied with other harmful requests; in-context
learning then pulls the model toward complying again.

For each harmful request the shots are other requests of the same set (never the request
itself, drawn with a seeded generator) with their compliant answers. Scoring is the prefilling
attack's preference test: a request counts as complied with when the compliant answer's mean
per-token log-prob exceeds the refusal's after the many-shot prompt; the same test on the plain
prompt is the baseline.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

from mechunlearn.errors import DataError
from mechunlearn.evals.refusal import attack_compliance
from mechunlearn.models.handle import HookedModel
from mechunlearn.schema import STRICT_CONFIG
from mechunlearn.tasks.preference import LatData, LatExample
from mechunlearn.tasks.refusal import ChatItem, format_completion, format_prompt


class ManyShotConfig(BaseModel):
    """Many-shot settings: ``shots`` earlier compliant turns per request."""

    model_config = STRICT_CONFIG

    shots: int = Field(8, ge=1)
    batch_size: int = Field(8, ge=1)
    seed: int = 0


def many_shot_examples(
    tokenizer: Any, items: Sequence[ChatItem], config: ManyShotConfig | None = None
) -> tuple[LatData, list[list[int]]]:
    """Prompt = ``shots`` compliant turns on other requests + the request; desired = its
    refusal, unwanted = its compliant answer. Also returns each request's shot indices."""
    config = config or ManyShotConfig()
    if len(items) < config.shots + 1:
        raise DataError(
            f"{config.shots} shots need at least {config.shots + 1} requests, got {len(items)}"
        )
    rng = random.Random(config.seed)
    examples, chosen = [], []
    for i, item in enumerate(items):
        shots = rng.sample([j for j in range(len(items)) if j != i], config.shots)
        history = [(items[j].request, items[j].unwanted) for j in shots]
        examples.append(
            LatExample(
                format_prompt(tokenizer, item.request, history=history),
                format_completion(tokenizer, item.desired),
                format_completion(tokenizer, item.unwanted),
            )
        )
        chosen.append(shots)
    data = LatData(examples)
    data.validate()
    return data, chosen


@dataclass
class ManyShotResult:
    """``compliance`` after the many-shot prompt and ``baseline`` without it (rate, sem, n);
    ``margins``: compliant minus refusal mean log-prob per request; ``shots``: the indices of
    the requests each one's shots came from."""

    config: dict[str, Any]
    compliance: dict[str, float]
    baseline: dict[str, float]
    margins: list[float]
    shots: list[list[int]]

    def to_json(self) -> dict[str, Any]:
        return {
            "compliance_rate": self.compliance["rate"],
            "compliance": self.compliance,
            "baseline": self.baseline,
            "margins": self.margins,
            "shots": self.shots,
            "config": self.config,
        }


def many_shot_attack(
    hm: HookedModel, items: Sequence[ChatItem], config: ManyShotConfig | None = None
) -> ManyShotResult:
    """Run the many-shot attack on harmful ``items`` (request, refusal, compliant answer)."""
    config = config or ManyShotConfig()
    data, shots = many_shot_examples(hm.tokenizer, items, config)
    attack = attack_compliance(hm, data, items, config.batch_size)
    return ManyShotResult(
        config=config.model_dump(mode="json"),
        compliance=attack.compliance,
        baseline=attack.baseline,
        margins=attack.margins,
        shots=shots,
    )
