"""Localizations for an experiment, at equal parameter budget (Guo et al. 2024, Sec. 4).

Every method is run once per experiment on the same known facts (drawn in same-layout pairs so
the patching methods are defined), and every budgeted method gets fact lookup's parameter count.
A spec that differs from another only by ``restrict_to`` reuses that method's scores and just
re-selects (causal tracing restricted to MLPs is the same trace, selected among MLPs).
Results are cached on disk by model, facts, method and options, so reruns skip the tracing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from mechunlearn.errors import DataError
from mechunlearn.experiments.edit_config import LocalizationSpec
from mechunlearn.localize import LOCALIZERS, Localization, LocalizeOptions
from mechunlearn.localize.common import select_restricted
from mechunlearn.localize.prompts import choose_pairable_facts
from mechunlearn.models.components import count_parameters
from mechunlearn.models.embedded import cache_root
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.records import FactRecord

SCOPED = {"fact_lookup", "all_mlps", "nonlocalized", "last_layer"}
"""Methods whose size is their definition; every other method gets a budget."""


def localization_facts(
    hm: HookedModel, known: Sequence[FactRecord], n: int, seed: int
) -> list[FactRecord]:
    facts = choose_pairable_facts(hm, list(known), n, seed)
    if len(facts) < 2:
        raise DataError(f"only {len(facts)} known facts can be paired; localization needs 2+")
    return facts


def _cache_path(
    model: str, facts: Sequence[FactRecord], method: str, options: LocalizeOptions
) -> Path:
    key = json.dumps(
        {
            "model": model,
            "facts": [r.id for r in facts],
            "answers": [r.answer for r in facts],
            "fact_options": [list(r.options) for r in facts],  # they shape the one-shot prompt
            "method": method,
            "options": options.model_dump(mode="json", exclude={"progress"}),
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return cache_root() / "localizations" / f"{method}-{digest}.json"


def _run_cached(
    hm: HookedModel,
    model_name: str,
    facts: Sequence[FactRecord],
    method: str,
    options: LocalizeOptions,
    use_cache: bool,
    log: Callable[[str], None],
) -> Localization:
    path = _cache_path(model_name, facts, method, options)
    if use_cache and path.is_file():
        log(f"localization {method}: cached ({path})")
        return Localization.load(path)
    loc = LOCALIZERS.get(method)(hm, list(facts), options)
    loc = loc.model_copy(update={"model": model_name, "n_facts": len(facts)})
    if use_cache:
        loc.save(path)
    return loc


def reselect(
    hm: HookedModel, loc: Localization, restrict_to: str, budget: int | None
) -> Localization:
    """The same scores, selected under ``budget`` among ``restrict_to`` components."""
    options = LocalizeOptions(budget=budget, restrict_to=restrict_to)
    selected = select_restricted(hm, dict(loc.scores), options)
    return loc.model_copy(
        update={
            "selected": selected,
            "n_params": count_parameters(hm.parameters_of(selected)),
            "budget": budget,
            "evidence": {**loc.evidence, "restrict_to": restrict_to},
        }
    )


def compute_localizations(
    hm: HookedModel,
    model_name: str,
    specs: Sequence[LocalizationSpec],
    facts: Sequence[FactRecord],
    options: LocalizeOptions,
    *,
    use_cache: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Localization]:
    """One ``Localization`` per spec name, budgeted methods at fact lookup's parameter count."""
    from_file = {}
    for spec in specs:
        if spec.from_file:
            loc = Localization.load(spec.from_file)
            loc.check_model(hm)
            from_file[spec.name] = loc
    budget = options.budget
    computed: dict[tuple[str, str], Localization] = {}
    needs_budget = any(s.method not in SCOPED and s.name not in from_file for s in specs)
    if budget is None and needs_budget:
        flu = _run_cached(hm, model_name, facts, "fact_lookup", options, use_cache, log)
        if flu.n_params == 0:
            raise DataError("fact_lookup selected nothing on these facts, so it gives no budget")
        computed[("fact_lookup", "all")] = flu
        budget = flu.n_params
        log(f"parameter budget {budget:,} (fact lookup: {', '.join(flu.selected)})")
    result: dict[str, Localization] = {}
    for spec in specs:
        if spec.name in from_file:
            result[spec.name] = from_file[spec.name]
            continue
        spec_budget = None if spec.method in SCOPED else budget
        key = (spec.method, spec.restrict_to)
        if key not in computed:
            base = next((loc for (m, _), loc in computed.items() if m == spec.method), None)
            if base is not None and spec.method not in SCOPED:
                computed[key] = reselect(hm, base, spec.restrict_to, spec_budget)
            else:
                method_options = options.model_copy(
                    update={"budget": spec_budget, "restrict_to": spec.restrict_to}
                )
                computed[key] = _run_cached(
                    hm, model_name, facts, spec.method, method_options, use_cache, log
                )
        loc = computed[key]
        log(
            f"localization {spec.name}: {len(loc.selected)} components, {loc.n_params:,} parameters"
        )
        result[spec.name] = loc
    return result
