"""Localization methods registered by name.

A method is a function ``(hm, records, options) -> Localization``; ``options`` is the
method's validated options object (``LocalizeOptions``). Register a new one with
``@LOCALIZERS.register("name")``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from pydantic import BaseModel, Field

from mechunlearn.localize.result import Localization
from mechunlearn.models.handle import HookedModel
from mechunlearn.registry import Registry
from mechunlearn.schema import STRICT_CONFIG
from mechunlearn.tasks.records import FactRecord


class LocalizeOptions(BaseModel):
    """Options shared by every method; methods read what they need."""

    model_config = STRICT_CONFIG

    seed: int = 0
    budget: int | None = Field(
        default=None, ge=1, description="trainable-parameter budget for selection"
    )
    top_k: int | None = Field(default=None, ge=1)
    batch_size: int = Field(default=16, ge=1)
    noise_scale: float = Field(
        default=3.0, gt=0, description="causal tracing: noise std in units of the embedding std"
    )
    n_noise_samples: int = Field(default=1, ge=1)
    probe_split: float = Field(
        default=0.5, gt=0, lt=1, description="fact_lookup: fraction of facts to train probes"
    )
    restrict_to: Literal["all", "mlp", "attn"] = Field(
        default="all", description="which component kinds selection may choose from"
    )
    window: int = Field(
        default=1, ge=1, description="causal tracing: restore this many consecutive layers"
    )
    trace_cells: Literal["all", "scored"] = Field(
        default="all",
        description="causal tracing: 'all' restores every (kind, layer, position) cell for the "
        "heatmaps; 'scored' only those the component scores read (MLP outputs at subject "
        "tokens, attention outputs everywhere): about half the work, the same scores",
    )
    progress: bool = True
    task: str = ""


Localizer = Callable[[HookedModel, Sequence[FactRecord], LocalizeOptions], Localization]
LOCALIZERS: Registry[Localizer] = Registry("localization method")
