"""Options of a localization run: the framework's, shared by every method, and each method's own.

``LocalizeOptions`` holds what the framework does with any method's scores (restriction,
budgeting, seeding, batching). A method's own knobs live in its ``MethodOptions`` subclass,
registered with the method and validated against it, so a misspelt or foreign option (a noise
scale given to attribution patching) is an error naming the method, not a silently unused field.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field

from mechunlearn.localize.readouts import READOUTS
from mechunlearn.schema import STRICT_CONFIG


class LocalizeOptions(BaseModel):
    """What every localization run is given; methods read ``seed`` and ``batch_size``, the
    framework applies ``restrict_to``, ``budget`` and ``top_k`` to the method's scores."""

    model_config = STRICT_CONFIG

    seed: int = 0
    budget: int | None = Field(
        default=None, ge=1, description="trainable-parameter budget for selection"
    )
    top_k: int | None = Field(default=None, ge=1, description="select at most this many components")
    batch_size: int = Field(default=16, ge=1)
    restrict_to: Literal["all", "mlp", "attn"] = Field(
        default="all", description="which component kinds selection may choose from"
    )
    progress: bool = True
    task: str = ""


class MethodOptions(BaseModel):
    """A method's own options (none by default); subclass and register with the method."""

    model_config = STRICT_CONFIG


def _known_readout(name: str) -> str:
    READOUTS.get(name)  # ConfigError listing the known readouts
    return name


ReadoutName = Annotated[str, AfterValidator(_known_readout)]


class ReadoutOptions(MethodOptions):
    """Options of a method that compares runs through a readout metric at the final position."""

    metric: ReadoutName = Field(
        default="logit_diff",
        description="readout at the final position: " + ", ".join(READOUTS.names()),
    )


__all__ = ["LocalizeOptions", "MethodOptions", "ReadoutName", "ReadoutOptions"]
