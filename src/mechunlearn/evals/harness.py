"""The evaluation harness: facts x formats -> trustworthy numbers.

Reports, per prompt format, argmax accuracy among the options, the correct option's
probability renormalised over the options, and its full-vocabulary probability, each as a mean
over records with its standard error; how many facts the model knows; CounterFact's
P(true) > P(new) rate; and LM loss on general text as the side-effect measure. Per-item scores
are kept so every aggregate can be traced back to prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mechunlearn.errors import DataError
from mechunlearn.evals.lm_loss import lm_loss
from mechunlearn.evals.metrics import DEFAULT_METRICS, mean_and_sem, per_record
from mechunlearn.evals.scoring import ItemScore, count_units, score_items
from mechunlearn.models.handle import HookedModel
from mechunlearn.progress import progress_bar
from mechunlearn.tasks.formats import format_records
from mechunlearn.tasks.records import FactRecord

KNOWN_FORMAT = "completion"


@dataclass
class FormatResult:
    format: str
    n_records: int
    n_items: int
    chance: float
    metrics: dict[str, dict[str, float]]  # metric -> {"mean", "sem"}


@dataclass
class EvalResult:
    formats: dict[str, FormatResult]
    scores: list[ItemScore]
    known: dict[str, Any] | None = None
    counterfact: dict[str, float] | None = None
    lm: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "formats": {
                name: {
                    "n_records": r.n_records,
                    "n_items": r.n_items,
                    "chance": r.chance,
                    **r.metrics,
                }
                for name, r in self.formats.items()
            },
            "known": self.known,
            "counterfact": self.counterfact,
            "lm_loss": self.lm,
            **self.extra,
        }

    def item_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "record_id": s.item.record_id,
                "format": s.item.format,
                "prompt": s.item.prompt,
                "labels": list(s.item.labels),
                "correct": s.correct,
                "logprobs": [round(v, 6) for v in s.logprobs],
                "n_tokens": list(s.n_tokens),
                "prob_renorm": round(s.prob_renorm, 6),
            }
            for s in self.scores
        ]


def summarise_format(
    name: str, scores: Sequence[ItemScore], metrics: Sequence[str]
) -> FormatResult:
    records = {s.item.record_id for s in scores}
    summary = {}
    for metric in metrics:
        mean, sem = mean_and_sem(list(per_record(scores, metric).values()))
        summary[metric] = {"mean": mean, "sem": sem}
    chance = sum(1 / len(s.logprobs) for s in scores) / len(scores)
    return FormatResult(name, len(records), len(scores), chance, summary)


def known_facts(scores: Sequence[ItemScore], threshold: float) -> dict[str, Any]:
    """Facts whose completion-format probability of the true answer (renormalised over the
    options) is at least ``threshold``: the known-facts filter of Mechanistic Unlearning."""
    probs = per_record([s for s in scores if s.item.format == KNOWN_FORMAT], "prob_renorm")
    known = sorted(r for r, p in probs.items() if p >= threshold)
    return {
        "threshold": threshold,
        "format": KNOWN_FORMAT,
        "n_known": len(known),
        "n_total": len(probs),
        "known_ids": known,
    }


def evaluate(
    hm: HookedModel,
    records: Sequence[FactRecord],
    formats: Sequence[str],
    *,
    seed: int = 0,
    batch_size: int = 16,
    format_options: dict[str, dict[str, Any]] | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    known_threshold: float | None = 0.5,
    general_text: Sequence[str] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Score ``records`` in each of ``formats``; see the module docstring for what is reported."""
    if not records:
        raise DataError("no facts to evaluate: the record list is empty")
    items = format_records(records, formats, seed=seed, options=format_options)
    if not items:
        raise DataError(
            f"formats {', '.join(formats)} produced no prompts for these {len(records)} facts"
        )
    with progress_bar(count_units(hm, items), f"scoring {len(items)} prompts", progress) as advance:
        scores = score_items(hm, items, batch_size=batch_size, advance=advance)
    by_format: dict[str, list[ItemScore]] = {}
    for s in scores:
        by_format.setdefault(s.item.format, []).append(s)
    result = EvalResult(
        {name: summarise_format(name, s, metrics) for name, s in by_format.items()}, scores
    )
    if known_threshold is not None and KNOWN_FORMAT in by_format:
        result.known = known_facts(scores, known_threshold)
    if any(r.new_answer is not None for r in records):
        result.counterfact = {
            name: mean_and_sem(list(per_record(s, "true_beats_new").values()))[0]
            for name, s in by_format.items()
            if name != "mcq"
        }
    if general_text:
        with progress_bar(len(general_text), "LM loss on general text", progress) as advance:
            result.lm = lm_loss(
                hm, general_text, batch_size=max(1, batch_size // 2), advance=advance
            )
    return result


def evaluate_split(
    hm: HookedModel,
    forget: Sequence[FactRecord],
    retain: Sequence[FactRecord],
    formats: Sequence[str],
    **kwargs: Any,
) -> dict[str, EvalResult]:
    """Evaluate forget and retain facts separately (retain accuracy is the side effect that
    shows an edit was specific); LM loss, if requested, is computed once, with the retain set."""
    general_text = kwargs.pop("general_text", None)
    overlap = {r.id for r in forget} & {r.id for r in retain}
    if overlap:
        raise DataError(
            f"{len(overlap)} facts are in both the forget and the retain set, e.g. {sorted(overlap)[0]}"
        )
    return {
        "forget": evaluate(hm, forget, formats, **kwargs),
        "retain": evaluate(hm, retain, formats, general_text=general_text, **kwargs),
    }


def known_records(
    hm: HookedModel,
    records: Sequence[FactRecord],
    threshold: float = 0.5,
    batch_size: int = 16,
    progress: bool = False,
) -> list[FactRecord]:
    """The facts the model knows: completion-format P(true | options) >= ``threshold``."""
    from mechunlearn.tasks.splits import filter_known

    items = format_records(records, [KNOWN_FORMAT])
    with progress_bar(count_units(hm, items), "finding known facts", progress) as advance:
        scores = score_items(hm, items, batch_size=batch_size, advance=advance)
    return filter_known(records, per_record(scores, "prob_renorm"), threshold)
