"""Latent knowledge (``formats`` part): linear probes for the original answer, fitted on retain
facts and applied to forget facts, layer by layer (Guo et al. 2024, Sec. 6): an edit that only
hides the answer leaves it decodable from the residual stream."""

from __future__ import annotations

import statistics
from typing import Literal

from pydantic import BaseModel

from mechunlearn.errors import DataError
from mechunlearn.evals.latent_probes import latent_probe_accuracy
from mechunlearn.experiments.measurements.context import BatteryContext
from mechunlearn.experiments.measurements.registry import MEASUREMENTS, BatteryResult
from mechunlearn.report.columns import Column
from mechunlearn.schema import STRICT_CONFIG


class ProbeOptions(BaseModel):
    """Set by ``evaluation.probes`` (on or off) and ``evaluation.probe_position``."""

    model_config = STRICT_CONFIG
    position: Literal["last_subject", "final"] = "last_subject"


COLUMNS = (
    Column("probe.forget_accuracy", "latent probe acc on forget", True, "latent"),
    Column(
        "probe.forget_accuracy_layer_mean",
        "latent probe acc on forget, mean over layers",
        True,
        "latent",
    ),
)


@MEASUREMENTS.register("probes", config=ProbeOptions, columns=COLUMNS, part="formats")
def measure_probes(ctx: BatteryContext, options: ProbeOptions, name: str) -> BatteryResult:
    """Probe accuracy on forget facts at the layer best on held-out retain facts, the best
    and last layers, and the mean over layers (as the paper reports it), also per fact.

    When the retain facts lack an answer the forget facts have (a whole group edited, e.g.
    every basketball player), ``ctx.probe_reserve`` facts with that answer join the probe's
    training facts, so the original answer can still be probed for."""
    ctx.log("latent probes")
    sets, out = ctx.sets, BatteryResult()
    probe_facts = list(sets.retain_train) + list(sets.retain_eval)
    missing = {r.answer for r in sets.forget} - {r.answer for r in probe_facts}
    taken = {r.id for r in sets.forget} | {r.id for r in probe_facts}
    extra = [r for r in ctx.probe_reserve if r.answer in missing and r.id not in taken]
    if extra:
        out.notes.append(
            f"latent probes: {len(extra)} validation facts answering "
            f"{', '.join(sorted({r.answer for r in extra}))} (no retain fact does) joined "
            "the probe's training facts"
        )
    try:
        probes = latent_probe_accuracy(
            ctx.hm,
            sets.forget,
            probe_facts + extra,
            position=options.position,
            seed=ctx.seed,
            batch_size=ctx.config.evaluation.batch_size,
        ).to_json()
    except DataError as exc:  # e.g. CounterFact answers are too varied for one probe
        out.notes.append(f"latent probes skipped: {exc}")
        return out
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
    return out
