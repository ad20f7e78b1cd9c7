"""Format shift and LM loss (``formats`` part): every prompt format on the forget facts (edit
success / original answer) and on held-out retain facts (side effects), from one scoring pass,
plus the LM loss on held-out general text (Guo et al. 2024, Sec. 5)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from mechunlearn.evals.edit_metrics import edit_metrics_per_record
from mechunlearn.evals.harness import evaluate, summarise_format
from mechunlearn.evals.metrics import per_record
from mechunlearn.experiments.edit_config import ExperimentConfig
from mechunlearn.experiments.measurements.context import BatteryContext
from mechunlearn.experiments.measurements.registry import (
    MEASUREMENTS,
    BatteryResult,
    NoOptions,
)
from mechunlearn.models.handle import HookedModel
from mechunlearn.report.columns import Column
from mechunlearn.tasks.records import FactRecord


def _target(key: str, label: str, lower: bool, mode: str) -> Column:
    return Column(key, label, lower, "target", (mode,))


def _retain(key: str, label: str, lower: bool) -> Column:
    return Column(key, label, lower, "side_effect")


COLUMNS = (
    _target("forget.completion.edit_success", "edit success: completion", False, "edit"),
    _target("forget.question.edit_success", "edit success: question", False, "edit"),
    _target("forget.paraphrase.edit_success", "edit success: paraphrase", False, "edit"),
    _target("forget.mcq.edit_success", "edit success: MCQ", False, "edit"),
    _target("forget.options_word.edit_success", "edit success: options word", False, "edit"),
    _target("forget.capitalized.edit_success", "edit success: capitalized", False, "edit"),
    _target("forget.dashed.edit_success", "edit success: dashed", False, "edit"),
    _target("forget.completion.p_original", "P(original): completion", True, "edit"),
    _target("forget.mcq.p_original", "P(original): MCQ", True, "edit"),
    _target("forget.options_word.p_original", "P(original): options word", True, "edit"),
    _target("forget.completion.original_accuracy", "forget acc: completion", True, "unlearn"),
    _target("forget.question.original_accuracy", "forget acc: question", True, "unlearn"),
    _target("forget.paraphrase.original_accuracy", "forget acc: paraphrase", True, "unlearn"),
    _target("forget.mcq.original_accuracy", "forget acc: MCQ", True, "unlearn"),
    _target("forget.completion.p_original", "P(original): completion", True, "unlearn"),
    _target("forget.mcq.p_original", "P(original): MCQ", True, "unlearn"),
    _retain("retain.completion.accuracy", "retain acc: completion", False),
    _retain("retain.question.accuracy", "retain acc: question", False),
    _retain("retain.paraphrase.accuracy", "retain acc: paraphrase", False),
    _retain("retain.mcq.accuracy", "retain acc: MCQ", False),
    _retain("lm_loss_delta", "LM loss change (nats)", True),  # the report's change from base
)


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


@MEASUREMENTS.register("formats", config=NoOptions, columns=COLUMNS)
def measure_formats(ctx: BatteryContext, options: NoOptions, name: str) -> BatteryResult:
    """The battery's formats (``evaluation.formats``, ``format_options``, ``batch_size``)."""
    sets = ctx.sets
    ctx.log(f"prompt formats on {len(sets.forget)} forget and {len(sets.retain_eval)} retain facts")
    metrics, per_fact = format_metrics(
        ctx.hm, sets.forget, sets.retain_eval, ctx.config, ctx.seed, ctx.text_eval, ctx.progress
    )
    return BatteryResult(metrics=metrics, per_fact=per_fact)
