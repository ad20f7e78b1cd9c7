"""Localizations for an experiment, at equal parameter budget (Guo et al. 2024, Sec. 4).

Every method is run once per experiment on the same known facts (drawn in same-layout pairs so
the patching methods are defined), and every method that ranks components gets fact lookup's
parameter count (``takes_budget``: not fact lookup itself, which sets the budget, nor a method
whose selection is its scope). A spec that differs from another only by ``restrict_to`` reuses
that method's scores and just re-selects (causal tracing restricted to MLPs is the same trace,
selected among MLPs). Results are cached on disk by model, facts, method and options, so reruns
skip the tracing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mechunlearn.errors import DataError
from mechunlearn.localize import LOCALIZERS, Localization, LocalizeOptions, Scores
from mechunlearn.localize.prompts import choose_pairable_facts
from mechunlearn.models.components import count_parameters
from mechunlearn.models.embedded import cache_root
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.records import FactRecord

BUDGET_METHOD = "fact_lookup"
"""The method whose parameter count is every ranking method's budget (the paper's FLU)."""


def takes_budget(method: str) -> bool:
    """Whether an experiment gives ``method`` fact lookup's parameter budget: every method that
    ranks components, not fact lookup itself nor a method defined by its scope."""
    return method != BUDGET_METHOD and not LOCALIZERS.get(method).scope_defined


def localization_facts(
    hm: HookedModel, known: Sequence[FactRecord], n: int, seed: int
) -> list[FactRecord]:
    facts = choose_pairable_facts(hm, list(known), n, seed)
    if len(facts) < 2:
        raise DataError(f"only {len(facts)} known facts can be paired; localization needs 2+")
    return facts


def _cache_path(
    model: str,
    facts: Sequence[FactRecord],
    method: str,
    options: LocalizeOptions,
    method_options: Mapping[str, Any],
) -> Path:
    key = json.dumps(
        {
            "model": model,
            "facts": [r.id for r in facts],
            "answers": [r.answer for r in facts],
            "fact_options": [list(r.options) for r in facts],  # they shape the one-shot prompt
            "method": method,
            "options": options.model_dump(mode="json", exclude={"progress"}),
            "method_options": dict(method_options),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_root() / "localizations" / f"{method}-{digest}.json"


def run_cached(
    hm: HookedModel,
    model_name: str,
    facts: Sequence[FactRecord],
    method: str,
    options: LocalizeOptions,
    method_options: Mapping[str, Any] | None,
    use_cache: bool,
    log: Callable[[str], None],
) -> Localization:
    """``method`` on ``facts`` (its options validated by its schema), from the cache if there."""
    entry = LOCALIZERS.get(method)
    own = entry.parse_options(method_options).model_dump(mode="json")
    path = _cache_path(model_name, facts, method, options, own)
    if use_cache and path.is_file():
        log(f"localization {method}: cached ({path})")
        return Localization.load(path)
    loc = entry(hm, list(facts), options, own)
    loc = loc.model_copy(update={"model": model_name, "n_facts": len(facts)})
    if use_cache:
        loc.save(path)
    return loc


def reselect(
    hm: HookedModel, loc: Localization, restrict_to: str, budget: int | None
) -> Localization:
    """The same scores, selected under ``budget`` among ``restrict_to`` components, as the
    method itself selects (among its own candidates, e.g. heads but not attention layers)."""
    options = LocalizeOptions(budget=budget, restrict_to=restrict_to)
    scored = Scores(dict(loc.scores), candidates=loc.selection_scores)
    selected = LOCALIZERS.get(loc.method).select(hm, scored, options)
    return loc.model_copy(
        update={
            "selected": selected,
            "n_params": count_parameters(hm.parameters_of(selected)),
            "budget": budget,
            "evidence": {**loc.evidence, "restrict_to": restrict_to},
        }
    )
