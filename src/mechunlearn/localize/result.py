"""The shared result of every localization method, and selection under a parameter budget.

Mechanistic Unlearning compares localizations at *equal numbers of trainable parameters*
(every method gets FLU's budget), so selection is part of the result: scores per component
(and per layer x position where the method has them), the chosen components, and exactly the
parameters a trainer will update.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.io import atomic_write_json
from mechunlearn.models.components import count_parameters
from mechunlearn.models.handle import HookedModel


class Localization(BaseModel):
    """Scores, selection and parameter count of one localization run."""

    # a result, not a config: a method may score a component NaN (e.g. no gradient)
    model_config = ConfigDict(extra="forbid")

    method: str
    model: str
    model_type: str
    n_layers: int
    task: str = ""
    scores: dict[str, float] = Field(
        description="component -> importance (higher = more important)"
    )
    position_scores: dict[str, list[list[float]]] = Field(
        default_factory=dict,
        description="site kind -> [layer][position] scores (e.g. causal tracing)",
    )
    position_labels: list[str] = Field(default_factory=list)
    selection_scores: dict[str, float] | None = Field(
        default=None,
        description="the components selection chose among and their scores, where they "
        "differ from scores (e.g. heads but not the attention layers they overlap)",
    )
    selected: list[str]
    n_params: int
    budget: int | None = None
    evidence: dict[str, Any] = Field(default_factory=dict)
    n_facts: int = 0
    seed: int = 0

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.model_dump(mode="json"))

    @classmethod
    def load(cls, path: str | Path) -> Localization:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"localization file {path} does not exist")
        try:
            return cls.model_validate(json.loads(path.read_text()))
        except (json.JSONDecodeError, ValidationError) as exc:
            raise DataError(
                f"{path} is not a valid localization: {str(exc).splitlines()[0]}"
            ) from None

    def check_model(self, hm: HookedModel) -> None:
        """A localization is only meaningful for the model it was computed on."""
        if self.model_type != hm.model.config.model_type or self.n_layers != hm.dims.n_layers:
            raise ConfigError(
                f"localization was computed on {self.model} ({self.model_type}, {self.n_layers} layers), "
                f"not on {hm.name or 'this model'} ({hm.model.config.model_type}, {hm.dims.n_layers} layers)"
            )


def component_sizes(hm: HookedModel, components: Iterable[str]) -> dict[str, int]:
    return {c: count_parameters(hm.parameters_of([c])) for c in components}


def select_under_budget(
    hm: HookedModel, scores: Mapping[str, float], budget: int | None, top_k: int | None = None
) -> list[str]:
    """Highest-scoring components whose parameters fit in ``budget`` (greedy, by score).

    ``budget=None`` with ``top_k`` takes the ``top_k`` best; both ``None`` takes every
    component with a positive score.
    """
    ranked = sorted(scores, key=lambda c: scores[c], reverse=True)
    if budget is None:
        if top_k is not None:
            return ranked[:top_k]
        return [c for c in ranked if scores[c] > 0]
    sizes = component_sizes(hm, ranked)
    smallest = min(sizes.values())
    if budget < smallest:
        raise ConfigError(
            f"parameter budget {budget:,} is smaller than the smallest component ({smallest:,} parameters)"
        )
    chosen, used = [], 0
    for component in ranked:
        if used + sizes[component] <= budget:
            chosen.append(component)
            used += sizes[component]
        if top_k is not None and len(chosen) >= top_k:
            break
    return chosen


def make_localization(
    hm: HookedModel,
    method: str,
    scores: Mapping[str, float],
    *,
    selected: list[str],
    budget: int | None = None,
    selection_scores: Mapping[str, float] | None = None,
    **fields: Any,
) -> Localization:
    """Package a ``Localization`` of the ``selected`` components (selection itself is the
    protocol's: ``LocalizationMethod.select``)."""
    return Localization(
        method=method,
        model=hm.name,
        model_type=hm.model.config.model_type,
        n_layers=hm.dims.n_layers,
        scores=dict(scores),
        selection_scores=None if selection_scores is None else dict(selection_scores),
        selected=selected,
        n_params=count_parameters(hm.parameters_of(selected)),
        budget=budget,
        **fields,
    )
