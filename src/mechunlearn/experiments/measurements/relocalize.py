"""Localize again after the edit (``relocalize`` part, ``evaluation.relocalize``): does what the
localization methods find before the edit still carry the old answer afterwards? No training,
so the base model gets it too."""

from __future__ import annotations

from typing import Any

from mechunlearn.experiments.edit_config import RelocalizeConfig
from mechunlearn.experiments.measurements.context import BatteryContext
from mechunlearn.experiments.measurements.registry import MEASUREMENTS, BatteryResult
from mechunlearn.localize import LOCALIZERS, READOUTS, LocalizeOptions
from mechunlearn.localize.prompts import choose_pairable_facts


@MEASUREMENTS.register("relocalize", config=RelocalizeConfig)
def measure_relocalize(ctx: BatteryContext, options: RelocalizeConfig, name: str) -> BatteryResult:
    """Each method on this model for a pairable subset of the forget facts, with their original
    answers: the component scores, and for fact lookup the clean logit difference, the raw
    enrichment per MLP layer and the subject-position probe accuracy."""
    out = BatteryResult()
    facts = choose_pairable_facts(ctx.hm, list(ctx.sets.forget), options.n_facts, ctx.seed)
    if len(facts) < 2:
        out.notes.append(f"relocalize skipped: only {len(facts)} forget facts can be paired")
        return out
    # localized for the ORIGINAL answer (new_answer dropped), as before the edit
    originals = [r.model_copy(update={"new_answer": None}) for r in facts]
    found: dict[str, Any] = {"facts": [r.id for r in facts]}
    for method in options.methods:
        ctx.log(f"relocalize: {method} on {len(facts)} forget facts")
        settings = LocalizeOptions(seed=ctx.seed, top_k=1, progress=ctx.progress)
        own = ctx.config.method_options.get(method)  # the experiment's (scored cells for tracing)
        loc = LOCALIZERS.get(method)(ctx.hm, originals, settings, own)
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
            readout = READOUTS.get(loc.evidence["metric"])  # "p" for ROME's answer probability
            key = f"relocalize.causal_tracing.{readout.short}_clean"
            out.metrics[key] = loc.evidence["mean_metric_clean"]
        found[method] = entry
    out.curves["relocalize"] = found
    return out
