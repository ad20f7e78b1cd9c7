"""The localization protocol: a method scores components; the framework does the rest once.

A method is a function ``score(hm, records, options, method_options) -> Scores``. Everything
after scoring is the same for every method and lives here: validating the method's own options
against its schema, refusing a method that needs a budget without one, restricting selection to
the allowed component kinds, selecting under the parameter budget (Mechanistic Unlearning's
equal-budget comparison, Guo et al. 2024 Sec. 4) or taking the method's own selection, and
packaging a ``Localization`` with its provenance.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from mechunlearn.errors import ConfigError
from mechunlearn.localize.options import LocalizeOptions, MethodOptions
from mechunlearn.localize.result import Localization, make_localization, select_under_budget
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.records import FactRecord


@dataclass
class Scores:
    """What a method computes.

    ``candidates``: the components selection may choose among and their selection scores, where
    they differ from ``scores`` (e.g. heads but not the attention layers they overlap; heads
    folded into their layer where heads have no parameters of their own). ``selected``: the
    method's own choice, used when no budget or ``top_k`` is given (fact lookup's threshold rule,
    an EAP circuit) and always for a scope-defined method. ``n_facts``: facts actually used
    (a method may skip facts without a corrupting partner).
    """

    scores: dict[str, float]
    candidates: dict[str, float] | None = None
    selected: list[str] | None = None
    position_scores: dict[str, list[list[float]]] = field(default_factory=dict)
    position_labels: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)
    n_facts: int | None = None


Scorer = Callable[..., Scores]


def component_kind(component: str) -> str:
    """``blocks.3.mlp`` -> ``mlp``; ``blocks.3.attn`` / ``blocks.3.attn.head2`` -> ``attn``."""
    return component.split(".")[2]


def restrict(scores: Mapping[str, float], restrict_to: str) -> dict[str, float]:
    """Only the attention and MLP components ``restrict_to`` allows selection from."""
    allowed = {"all": ("mlp", "attn"), "mlp": ("mlp",), "attn": ("attn",)}[restrict_to]
    return {c: s for c, s in scores.items() if component_kind(c) in allowed}


@dataclass(frozen=True)
class LocalizationMethod:
    """A registered method: its scorer, its options schema and what the framework must know.

    ``needs_pairs``: it patches between subject-corrupted facts of equal token layout, so facts
    must be drawn in pairs. ``needs_budget``: it only ranks (random baselines), so a budget or
    ``top_k`` must say how much to select. ``scope_defined``: its selection is its definition
    (every MLP, the final block), so budget, ``top_k`` and ``restrict_to`` do not apply.
    """

    name: str
    score: Scorer
    options: type[MethodOptions] = MethodOptions
    needs_pairs: bool = False
    needs_budget: bool = False
    scope_defined: bool = False
    description: str = ""

    def parse_options(self, given: MethodOptions | Mapping[str, Any] | None) -> MethodOptions:
        """``given`` validated against this method's schema (``None``: the defaults)."""
        if given is None:
            return self.options()
        if isinstance(given, self.options):
            return given
        if isinstance(given, MethodOptions):
            given = given.model_dump()
        try:
            return self.options.model_validate(dict(given))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "options"
            known = ", ".join(self.options.model_fields) or "none"
            raise ConfigError(
                f"{self.name} options: {where}: {first['msg']} (its options: {known})"
            ) from None

    def __call__(
        self,
        hm: HookedModel,
        records: Sequence[FactRecord],
        options: LocalizeOptions | None = None,
        method_options: MethodOptions | Mapping[str, Any] | None = None,
        **inputs: Any,
    ) -> Localization:
        """Score, restrict, select and package. ``inputs``: extra inputs the scorer accepts
        (activation patching's explicit ``corrupted`` partners)."""
        options = options or LocalizeOptions()
        own = self.parse_options(method_options)
        budgeted = options.budget is not None or options.top_k is not None
        if self.needs_budget and not budgeted:
            raise ConfigError(
                f"{self.name} needs a parameter budget (or top_k) to know how much to select"
            )
        scored = self.score(hm, list(records), options, own, **inputs)
        return make_localization(
            hm,
            self.name,
            scored.scores,
            budget=None if self.scope_defined else options.budget,
            selected=self.select(hm, scored, options),
            selection_scores=scored.candidates,
            position_scores=scored.position_scores,
            position_labels=scored.position_labels,
            evidence={**scored.evidence, "method_options": own.model_dump(mode="json")},
            n_facts=len(records) if scored.n_facts is None else scored.n_facts,
            seed=options.seed,
            task=options.task,
        )

    def select(self, hm: HookedModel, scored: Scores, options: LocalizeOptions) -> list[str]:
        """The components a trainer will update, chosen from ``scored`` by ``options``."""
        if self.scope_defined:
            if scored.selected is None:
                raise TypeError(f"scope-defined method {self.name} returned no selection")
            return list(scored.selected)
        pool = restrict(
            scored.scores if scored.candidates is None else scored.candidates, options.restrict_to
        )
        if not pool:
            raise ConfigError(
                f"{self.name} scores no {options.restrict_to} components, so restrict_to="
                f"{options.restrict_to!r} selects nothing"
            )
        if options.budget is None and options.top_k is None and scored.selected is not None:
            allowed = restrict(dict.fromkeys(scored.selected, 0.0), options.restrict_to)
            return [c for c in scored.selected if c in allowed]
        return select_under_budget(hm, pool, options.budget, options.top_k)


__all__ = ["LocalizationMethod", "Scorer", "Scores", "component_kind", "restrict"]
