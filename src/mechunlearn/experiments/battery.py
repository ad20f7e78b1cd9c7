"""The robustness battery run on every edited model (Guo et al. 2024, Sec. 5-6).

One call measures, for one (localization, seed):

- format shift: every prompt format on forget facts (edit success / original answer) and on
  held-out retain facts (side effects), from one scoring pass;
- LM loss on held-out general text;
- latent knowledge: linear probes for the original answer fitted on retain facts, applied to
  forget facts;
- the relearning attack (LoRA on half the forget facts with the true answers), at the
  config's strength and at each of ``relearn_variants`` (e.g. the paper's rank-512 attack),
  and the soft-prompt attack, each restoring the model afterwards;
- CounterFact: ROME's efficacy / paraphrase / neighbourhood scores for CounterFact edits, or
  ROME's neighbourhood score on unrelated CounterFact facts as a side effect of other edits.

Everything is returned as a flat ``metrics`` dict (names like ``forget.mcq.p_original``) plus
curves for the plots, so the report aggregates any experiment the same way, and ``per_fact``:
the same metrics per forget fact (``{metric: {fact id: value}}``), which paired comparisons of
two localizations resample (``report.paired``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mechunlearn.attacks.relearn import relearn_attack
from mechunlearn.attacks.soft_prompt import soft_prompt_attack
from mechunlearn.errors import DataError
from mechunlearn.evals.counterfact_metrics import rome_metrics, rome_per_record, summarize_records
from mechunlearn.evals.edit_metrics import edit_metrics_per_record
from mechunlearn.evals.harness import evaluate, summarise_format
from mechunlearn.evals.latent_probes import latent_probe_accuracy
from mechunlearn.evals.metrics import per_record
from mechunlearn.experiments.edit_config import ExperimentConfig
from mechunlearn.experiments.fact_sets import FactSets
from mechunlearn.localize import LOCALIZERS, READOUTS, LocalizeOptions
from mechunlearn.localize.prompts import choose_pairable_facts
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.records import FactRecord


@dataclass
class BatteryResult:
    metrics: dict[str, float] = field(default_factory=dict)
    curves: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    per_fact: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "metrics": self.metrics,
            "curves": self.curves,
            "notes": self.notes,
            "per_fact": self.per_fact,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BatteryResult:
        return cls(
            dict(data["metrics"]),
            dict(data["curves"]),
            list(data["notes"]),
            {k: dict(v) for k, v in data.get("per_fact", {}).items()},
        )


def _finite(value: float) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def format_metrics(
    hm: HookedModel,
    forget: Sequence[FactRecord],
    retain: Sequence[FactRecord],
    config: ExperimentConfig,
    seed: int,
    general_text: Sequence[str] | None,
    progress: bool,
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Forget and retain facts in every format (one scoring pass), plus LM loss: the metrics
    and, per forget fact, the same forget metrics (``{metric: {fact id: value}}``)."""
    battery = config.evaluation
    result = evaluate(
        hm,
        list(forget) + list(retain),
        battery.formats,
        seed=seed,
        batch_size=battery.batch_size,
        format_options=battery.format_options,
        known_threshold=None,
        general_text=general_text,
        progress=progress,
    )
    forget_ids = {r.id for r in forget}
    metrics: dict[str, float] = {}
    per_fact: dict[str, dict[str, float]] = {}
    by_format: dict[str, tuple[list, list]] = {}
    for score in result.scores:
        side = 0 if score.item.record_id in forget_ids else 1
        by_format.setdefault(score.item.format, ([], []))[side].append(score)
    for fmt, (forget_scores, retain_scores) in by_format.items():
        if forget_scores:
            summary = summarise_format(fmt, forget_scores, ("accuracy", "prob_renorm"))
            metrics[f"forget.{fmt}.original_accuracy"] = summary.metrics["accuracy"]["mean"]
            metrics[f"forget.{fmt}.p_original"] = summary.metrics["prob_renorm"]["mean"]
            metrics[f"forget.{fmt}.chance"] = summary.chance
            per_fact[f"forget.{fmt}.original_accuracy"] = per_record(forget_scores, "accuracy")
            per_fact[f"forget.{fmt}.p_original"] = per_record(forget_scores, "prob_renorm")
        if retain_scores:
            summary = summarise_format(fmt, retain_scores, ("accuracy", "prob_renorm")).metrics
            metrics[f"retain.{fmt}.accuracy"] = summary["accuracy"]["mean"]
            metrics[f"retain.{fmt}.p_true"] = summary["prob_renorm"]["mean"]
    if config.mode == "edit":
        targets = {r.id: (r.answer, r.new_answer) for r in forget}
        for fmt, values in edit_metrics_per_record(result.scores, targets).items():
            for metric in ("edit_success", "p_new"):
                metrics[f"forget.{fmt}.{metric}"] = statistics.fmean(values[metric].values())
                per_fact[f"forget.{fmt}.{metric}"] = values[metric]
    if result.lm is not None:
        metrics["lm_loss"] = result.lm["loss"]
    return metrics, per_fact


def counterfact_side_effect(
    hm: HookedModel, records: Sequence[FactRecord], batch_size: int
) -> float:
    """ROME's neighbourhood score on unrelated CounterFact facts: the share of their
    neighbourhood prompts where P(true) > P(new). An edit of other facts should not move it."""
    return rome_metrics(hm, records, batch_size=batch_size)["neighborhood_score"]


PARTS = ("formats", "relocalize", "relearn", "soft_prompt")
"""The battery's independent parts, in the order their metrics are reported: ``formats``
(every format, LM loss, CounterFact scores, latent probes: no training), ``relocalize``
(localization methods run again on this model: no training, so the base model gets it too),
then the attacks (each trains and restores the model): relearning, each relearning variant
(``relearn@<name>``, reported right after ``relearn``), the soft prompt. Parts of one edit can
run in different processes."""

VARIANT = "relearn@"
"""Prefix of a relearning variant's part name, metric names and curve (``relearn@paper``)."""


def battery_parts(config: ExperimentConfig, attacks: bool = True) -> list[str]:
    """The parts ``config`` asks for (``attacks=False``: the base model, no attacks)."""
    battery = config.evaluation
    parts = ["formats"]
    if battery.relocalize is not None:
        parts.append("relocalize")
    if attacks and battery.relearn is not None:
        parts.append("relearn")
    if attacks:
        parts += [VARIANT + name for name in battery.relearn_variants]
    if attacks and battery.soft_prompt is not None:
        parts.append("soft_prompt")
    return parts


def _part_rank(name: str) -> tuple[int, str]:
    if name.startswith(VARIANT):
        return PARTS.index("relearn"), name
    if name not in PARTS:
        raise DataError(
            f"unknown battery part {name!r}; known: {', '.join(PARTS)}, {VARIANT}<name>"
        )
    return PARTS.index(name), ""


def merge_batteries(parts: dict[str, BatteryResult]) -> BatteryResult:
    """One battery from its parts, in ``PARTS`` order whatever order they ran in."""
    out = BatteryResult()
    for name in sorted(parts, key=_part_rank):
        out.metrics.update(parts[name].metrics)
        out.curves.update(parts[name].curves)
        out.notes.extend(parts[name].notes)
        out.per_fact.update(parts[name].per_fact)
    return out


def run_battery(
    hm: HookedModel,
    sets: FactSets,
    config: ExperimentConfig,
    seed: int,
    *,
    general_text_eval: Sequence[str],
    general_text_train: Sequence[str],
    counterfact_records: Sequence[FactRecord] = (),
    probe_reserve: Sequence[FactRecord] = (),
    attacks: bool = True,
    parts: Sequence[str] | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> BatteryResult:
    """Measure the current model; ``attacks=False`` skips relearning and soft prompts (base
    model); ``parts``: only these of ``battery_parts(config, attacks)`` (default: all).

    ``probe_reserve``: facts outside every forget and retain set (the validation forget facts).
    When the retain facts lack an answer the forget facts have (a whole group edited, e.g. every
    basketball player), reserve facts with that answer join the probe's training facts, so the
    original answer can still be probed for."""
    available = battery_parts(config, attacks)
    chosen = available if parts is None else list(parts)
    missing = [p for p in chosen if p not in available]
    if missing:
        raise DataError(f"battery parts {missing} are not configured; configured: {available}")
    results: dict[str, BatteryResult] = {}
    if "formats" in chosen:
        results["formats"] = _formats_part(
            hm, sets, config, seed, general_text_eval, counterfact_records, probe_reserve,
            progress, log,
        )  # fmt: skip
    if "relocalize" in chosen:
        results["relocalize"] = _relocalize_part(hm, sets, config, seed, progress, log)
    for part in chosen:
        if part == "relearn" or part.startswith(VARIANT):
            results[part] = _relearn_part(
                hm, sets, config, seed, general_text_train, progress, log, part
            )
    if "soft_prompt" in chosen:
        results["soft_prompt"] = _soft_prompt_part(hm, sets, config, seed, progress, log)
    out = merge_batteries(results)
    out.metrics = {k: v for k, v in out.metrics.items() if _finite(v) is not None}
    out.per_fact = {
        k: {fact: v for fact, v in values.items() if _finite(v) is not None}
        for k, values in out.per_fact.items()
    }
    return out


def _formats_part(
    hm, sets, config, seed, general_text_eval, counterfact_records, probe_reserve, progress, log
) -> BatteryResult:
    battery = config.evaluation
    out = BatteryResult()
    log(f"prompt formats on {len(sets.forget)} forget and {len(sets.retain_eval)} retain facts")
    metrics, per_fact = format_metrics(
        hm, sets.forget, sets.retain_eval, config, seed, general_text_eval, progress
    )
    out.metrics.update(metrics)
    out.per_fact.update(per_fact)
    if config.task == "counterfact" and config.mode == "edit":
        per_record = rome_per_record(hm, sets.forget, batch_size=battery.batch_size)
        for key, value in summarize_records(per_record).items():
            out.metrics[f"counterfact.{key}"] = value
        for key, values in per_record.items():
            out.per_fact[f"counterfact.{key}"] = values
    if counterfact_records:
        out.metrics["side_effects.counterfact_neighborhood"] = counterfact_side_effect(
            hm, counterfact_records, battery.batch_size
        )
    if battery.probes:
        log("latent probes")
        _probe_metrics(hm, sets, config, seed, probe_reserve, out)
    return out


def _probe_metrics(hm, sets, config, seed, probe_reserve, out: BatteryResult) -> None:
    battery = config.evaluation
    probe_facts = list(sets.retain_train) + list(sets.retain_eval)
    missing = {r.answer for r in sets.forget} - {r.answer for r in probe_facts}
    taken = {r.id for r in sets.forget} | {r.id for r in probe_facts}
    extra = [r for r in probe_reserve if r.answer in missing and r.id not in taken]
    if extra:
        out.notes.append(
            f"latent probes: {len(extra)} validation facts answering "
            f"{', '.join(sorted({r.answer for r in extra}))} (no retain fact does) joined "
            "the probe's training facts"
        )
    try:
        probes = latent_probe_accuracy(
            hm,
            sets.forget,
            probe_facts + extra,
            position=battery.probe_position,
            seed=seed,
            batch_size=battery.batch_size,
        ).to_json()
    except DataError as exc:  # e.g. CounterFact answers are too varied for one probe
        out.notes.append(f"latent probes skipped: {exc}")
        return
    out.curves["probes"] = probes
    reference = probes["retain_heldout_accuracy"]
    best = max(range(len(reference)), key=lambda i: reference[i])
    out.metrics["probe.forget_accuracy"] = probes["forget_accuracy"][best]
    out.metrics["probe.forget_accuracy_max"] = max(probes["forget_accuracy"])
    out.metrics["probe.retain_accuracy"] = reference[best]
    out.metrics["probe.chance"] = probes["chance"]
    # as the paper reports it: accuracy on forget facts averaged over the residual layers
    # (embeddings excluded: nothing about the subject's sport is computed there), and at the
    # last layer; per fact, so two localizations can be compared fact by fact
    correct = probes["forget_correct"]  # [layer][fact], the embedding row first
    ids = probes["forget_ids"]
    layers = correct[1:]
    out.metrics["probe.forget_accuracy_layer_mean"] = statistics.fmean(
        statistics.fmean(row) for row in layers
    )
    out.metrics["probe.forget_accuracy_last"] = statistics.fmean(correct[-1])
    out.metrics["probe.retain_accuracy_layer_mean"] = statistics.fmean(reference[1:])
    out.per_fact["probe.forget_accuracy"] = dict(zip(ids, map(float, correct[best]), strict=True))
    out.per_fact["probe.forget_accuracy_last"] = dict(
        zip(ids, map(float, correct[-1]), strict=True)
    )
    out.per_fact["probe.forget_accuracy_layer_mean"] = {
        fact: statistics.fmean(row[i] for row in layers) for i, fact in enumerate(ids)
    }


def _relocalize_part(hm, sets, config, seed, progress, log) -> BatteryResult:
    """Each ``relocalize`` method on this model for a pairable subset of the forget facts, with
    their original answers: the component scores, and for fact lookup the clean logit
    difference, the raw enrichment per MLP layer and the subject-position probe accuracy."""
    settings = config.evaluation.relocalize
    out = BatteryResult()
    facts = choose_pairable_facts(hm, list(sets.forget), settings.n_facts, seed)
    if len(facts) < 2:
        out.notes.append(f"relocalize skipped: only {len(facts)} forget facts can be paired")
        return out
    # localized for the ORIGINAL answer (new_answer dropped), as before the edit
    originals = [r.model_copy(update={"new_answer": None}) for r in facts]
    found: dict[str, Any] = {"facts": [r.id for r in facts]}
    for method in settings.methods:
        log(f"relocalize: {method} on {len(facts)} forget facts")
        options = LocalizeOptions(seed=seed, top_k=1, progress=progress)
        loc = LOCALIZERS.get(method)(hm, originals, options, config.method_options.get(method))
        entry: dict[str, Any] = {"scores": dict(loc.scores)}
        if method == "fact_lookup":
            evidence = loc.evidence
            entry["logit_diff_clean"] = evidence["logit_diff"]["clean"]
            entry["mlp_enrichment_heads"] = evidence["mlp_enrichment_heads"]
            entry["mlp_layers_patched"] = evidence["mlp_layers_patched"]
            entry["probe_last_subject"] = evidence["probe"]["last_subject"]["test_accuracy"]
            out.metrics["relocalize.fact_lookup.logit_diff_clean"] = entry["logit_diff_clean"]
            out.metrics["relocalize.fact_lookup.probe_best"] = max(entry["probe_last_subject"][1:])
        if method == "causal_tracing":
            readout = READOUTS.get(loc.evidence["metric"])
            key = f"relocalize.causal_tracing.{readout.short}_clean"
            out.metrics[key] = loc.evidence["mean_metric_clean"]
        found[method] = entry
    out.curves["relocalize"] = found
    return out


def _relearn_part(
    hm, sets, config, seed, general_text_train, progress, log, part: str = "relearn"
) -> BatteryResult:
    """The relearning attack at the config's strength (``relearn``) or at one of its
    ``relearn_variants`` (``relearn@<name>``); metrics and curve under the part's name."""
    battery = config.evaluation
    settings = (
        battery.relearn if part == "relearn" else battery.relearn_variants[part[len(VARIANT) :]]
    )
    out = BatteryResult()
    log(f"relearning attack ({part})")
    relearn = relearn_attack(
        hm,
        sets.forget,
        sets.retain_train,
        list(general_text_train),
        settings,
        seed=seed,
        progress=progress,
    ).to_json()
    out.curves[part] = relearn
    for key, value in relearn["final"].items():
        if isinstance(value, int | float):
            out.metrics[f"{part}.{key}"] = value
    for key, values in relearn["final_per_fact"].items():
        out.per_fact[f"{part}.{key}"] = values
    return out


def _soft_prompt_part(hm, sets, config, seed, progress, log) -> BatteryResult:
    out = BatteryResult()
    log("soft-prompt attack")
    soft = soft_prompt_attack(
        hm, sets.forget, config.evaluation.soft_prompt, seed=seed, progress=progress
    ).to_json()
    out.curves["soft_prompt"] = soft
    for key in ("accuracy_before", "accuracy_after", "p_true_before", "p_true_after"):
        if key in soft:
            out.metrics[f"soft_prompt.{key}"] = soft[key]
    return out
