"""CounterFact edit metrics as defined by ROME (Meng et al. 2022, "Locating and Editing Factual
Associations in GPT", Sec. 3.2 / Table 4; MEMIT, Meng et al. 2023, reports the same summary).

Every prompt is scored by the mean per-token negative log-likelihood of the two targets after
it, ``nll(o) = -(1/|o|) sum_i log p(o_i | prompt, o_<i)`` (the ``" " + target`` continuation),
and the "probability" of a target is ``P(o) = exp(-nll(o))``. Per record, with ``new`` the
counterfactual target and ``true`` the original one:

- efficacy (rewrite prompt ``record.prompt()``): success ``P(new) > P(true)``, magnitude
  ``P(new) - P(true)``;
- paraphrase (``record.paraphrases``): the same, averaged over the record's paraphrases;
- neighbourhood (``record.neighborhood``: other subjects whose true answer is the record's
  ``answer``): success ``P(true) > P(new)``, magnitude ``P(true) - P(new)``, averaged over the
  record's neighbourhood prompts.

Each is then averaged over records (ES/EM, PS/PM, NS/NM), and the score ``S`` is the harmonic
mean of ES, PS and NS. Comparisons are strict, so ties count as failures on both sides, as in
ROME's summary.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

from mechunlearn.errors import DataError
from mechunlearn.evals.scoring import ItemScore, score_items
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.records import FactRecord, PromptItem

KINDS = ("efficacy", "paraphrase", "neighborhood")
"""Prompt kinds, in ROME's order: rewrite, paraphrase, neighbourhood prompts."""

TRUE, NEW = 0, 1  # option order in every item built here


def _check(records: Sequence[FactRecord]) -> None:
    if not records:
        raise DataError("no CounterFact records to evaluate: the record list is empty")
    missing = [r.id for r in records if r.new_answer is None]
    if missing:
        raise DataError(
            f"{len(missing)} records have no new_answer (CounterFact's target_new), e.g. "
            f"{missing[0]}; ROME metrics compare P(new) with P(true)"
        )
    same = [r.id for r in records if r.new_answer == r.answer]
    if same:
        raise DataError(f"record {same[0]} has new_answer equal to its true answer")
    for kind, attr in (("paraphrase", "paraphrases"), ("neighbourhood", "neighborhood")):
        if not any(getattr(r, attr) for r in records):
            raise DataError(
                f"none of the {len(records)} records has {kind} prompts ({attr}); the ROME "
                "score needs rewrite, paraphrase and neighbourhood prompts"
            )


def _item(record: FactRecord, kind: str, prompt: str) -> PromptItem:
    """One prompt with option 0 = the true target and option 1 = the new target."""
    assert record.new_answer is not None
    return PromptItem(
        record_id=record.id,
        format=kind,
        prompt=prompt,
        continuations=(" " + record.answer, " " + record.new_answer),
        correct=TRUE,
        labels=(record.answer, record.new_answer),
    )


def rome_items(records: Sequence[FactRecord]) -> list[PromptItem]:
    """Every prompt ROME scores for ``records``: rewrite, paraphrase and neighbourhood prompts."""
    _check(records)
    items = []
    for record in records:
        items.append(_item(record, "efficacy", record.prompt()))
        items += [_item(record, "paraphrase", p) for p in record.paraphrases]
        items += [_item(record, "neighborhood", p) for p in record.neighborhood]
    return items


def prompt_probs(score: ItemScore) -> tuple[float, float]:
    """``(P(true), P(new))`` as ROME defines them: ``exp(-mean per-token NLL)``."""
    return math.exp(-score.mean_nll(TRUE)), math.exp(-score.mean_nll(NEW))


def _success_and_margin(score: ItemScore) -> tuple[float, float]:
    """Per prompt: did the wanted target win (strictly), and by how much probability."""
    nll_true, nll_new = score.mean_nll(TRUE), score.mean_nll(NEW)
    p_true, p_new = prompt_probs(score)
    if score.item.format == "neighborhood":
        return float(nll_true < nll_new), p_true - p_new
    return float(nll_new < nll_true), p_new - p_true


def _harmonic_mean(values: Sequence[float]) -> float:
    if any(math.isnan(v) for v in values):
        return math.nan
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1 / v for v in values)


def per_record_scores(scores: Sequence[ItemScore]) -> dict[str, dict[str, float]]:
    """Per kind, each record's success and magnitude averaged over its prompts:
    ``{"<kind>_score": {record: value}, "<kind>_magnitude": {...}}`` (a record without
    prompts of a kind is absent from it). The per-fact values a paired comparison needs."""
    per_record: dict[str, dict[str, list[tuple[float, float]]]] = {
        kind: defaultdict(list) for kind in KINDS
    }
    for score in scores:
        if score.item.format not in per_record:
            raise DataError(f"unexpected prompt kind {score.item.format!r} in ROME scores")
        per_record[score.item.format][score.item.record_id].append(_success_and_margin(score))
    out: dict[str, dict[str, float]] = {}
    for kind in KINDS:
        records = per_record[kind]
        if not records:
            raise DataError(f"no {kind} prompts were scored")
        out[f"{kind}_score"] = {r: sum(s for s, _ in v) / len(v) for r, v in records.items()}
        out[f"{kind}_magnitude"] = {r: sum(m for _, m in v) / len(v) for r, v in records.items()}
    return out


def summarize_records(per_record: dict[str, dict[str, float]]) -> dict[str, float]:
    """ROME's summary from :func:`per_record_scores` (see the module docstring)."""
    out: dict[str, float] = {}
    for kind in KINDS:
        success = per_record[f"{kind}_score"]
        out[f"{kind}_score"] = sum(success.values()) / len(success)
        margin = per_record[f"{kind}_magnitude"]
        out[f"{kind}_magnitude"] = sum(margin.values()) / len(margin)
        out[f"{kind}_n_records"] = float(len(success))
    out["score"] = _harmonic_mean([out[f"{kind}_score"] for kind in KINDS])
    return out


def summarize_scores(scores: Sequence[ItemScore]) -> dict[str, float]:
    """ROME's summary of per-prompt scores (see the module docstring).

    Per kind, values are averaged over a record's prompts first, then over records, so a
    record with ten paraphrases counts as much as one with two.
    """
    return summarize_records(per_record_scores(scores))


def rome_metrics(
    hm: HookedModel, records: Sequence[FactRecord], batch_size: int = 16
) -> dict[str, float]:
    """ROME's CounterFact metrics of ``hm`` on ``records`` (efficacy, paraphrase and
    neighbourhood score and magnitude, ``score`` = harmonic mean of the three scores).

    Records without paraphrases or neighbourhood prompts are left out of that kind's average
    (``<kind>_n_records`` says how many records each average covers).
    """
    items = rome_items(records)
    return summarize_scores(score_items(hm, items, batch_size=batch_size))


def rome_per_record(
    hm: HookedModel, records: Sequence[FactRecord], batch_size: int = 16
) -> dict[str, dict[str, float]]:
    """:func:`per_record_scores` of ``hm`` on ``records`` (the scores behind
    :func:`rome_metrics`, per record)."""
    return per_record_scores(score_items(hm, rome_items(records), batch_size=batch_size))
