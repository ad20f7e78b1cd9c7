"""Mechanistic Unlearning's claims, decided from an experiment's per-fact results.

Guo et al. (2024) claim that edits localized by fact lookup (FLU) carry over to other prompt
formats, resist relearning and erase the latent knowledge, where edits localized by output
tracing (causal tracing, attribution patching) do not. Each claim is one metric compared
between FLU and each output-tracing row, paired by seed and fact, with a bootstrap 95%
interval (``report.paired``); the verdict is "FLU better / worse" only when the interval
excludes zero. A prompt format the unedited model answers at chance on the forget facts
measures nothing about an edit, so it is reported and left out of the verdicts.

The paper's numbers are the authors' Gemma-7B result files (16 edited athletes;
``results/google_gemma-7b-*-results.json`` in magikarp01/mechanistic-unlearning).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mechunlearn.errors import DataError
from mechunlearn.report.paired import bootstrap_mean, paired_difference, verdict
from mechunlearn.report.results import BASE

REFERENCE = "fact_lookup"
OUTPUT_TRACING = ("causal_tracing", "attribution_patching", "causal_tracing_mlps")
RELEARN_PREFIX = "relearn"

PAPER = {
    "formats": {"fact_lookup": 0.013, "attribution_patching": 0.926, "causal_tracing": 0.888},
    "relearn": {"fact_lookup": 0.405, "attribution_patching": 0.993, "causal_tracing": 0.846},
    "probe": {"fact_lookup": 0.13, "attribution_patching": 0.88, "causal_tracing": 0.86},
}
"""Gemma-7B, after editing 16 athletes: MCQ P(original), accuracy after relearning, probe
accuracy on the forget facts (set beside athlete edits only, not CounterFact's)."""


@dataclass(frozen=True)
class Claim:
    family: str  # which paper number it is set against (PAPER's keys; others have none)
    key: str  # the per-fact metric
    title: str
    lower_is_better: bool = True


def fact_values(run: dict[str, Any], key: str) -> dict[str, float] | None:
    """``{fact: value}`` of one (row, seed) result: a stored per-fact metric, or a relearning
    part's held-out values before the attack (``<part>.before.<fmt>.<metric>``) or at the
    attack's best step for the mean (``<part>.peak.<fmt>.<metric>``)."""
    stored = run.get("per_fact", {})
    if key in stored:
        return stored[key]
    part, _, rest = key.partition(".")
    which, _, metric = rest.partition(".")
    curve = run.get("curves", {}).get(part, {})
    facts, means = curve.get("curve_per_fact") or [], curve.get("curve") or []
    if which not in ("before", "peak") or not facts or len(facts) != len(means):
        return None
    if which == "before":
        return facts[0].get(metric)
    best = max(range(len(means)), key=lambda i: means[i].get(metric, float("-inf")))
    return facts[best].get(metric)


def by_seed(runs: Sequence[dict[str, Any]], key: str) -> dict[int, dict[str, float]]:
    """``{seed: {fact: value}}`` for one row (seeds without the metric left out)."""
    out = {}
    for run in runs:
        values = fact_values(run, key)
        if values:
            out[run["seed"]] = values
    return out


def interval(runs: Sequence[dict[str, Any]], key: str) -> tuple[float, float, float, int] | None:
    """``(mean, low, high, n values)`` of one row's metric, bootstrapped over seeds and facts."""
    values = [list(v.values()) for v in by_seed(runs, key).values()]
    if not values:
        return None
    mean, low, high = bootstrap_mean(values)
    return mean, low, high, sum(len(v) for v in values)


def _per_fact_keys(results: dict[str, list[dict[str, Any]]]) -> set[str]:
    return {k for runs in results.values() for run in runs for k in run.get("per_fact", {})}


def _relearn_parts(keys: set[str]) -> list[str]:
    """The relearning attacks with per-fact results (``relearn``, ``relearn@<name>``)."""
    return sorted({k.split(".")[0] for k in keys if k.startswith(RELEARN_PREFIX)})


def format_baselines(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per prompt format, the unedited model's accuracy on the forget facts (the facts the
    edits are made on, so known in the completion format) with its interval, and whether it
    is above chance (the interval's lower end above chance): only those formats are used."""
    base = results.get(BASE, [])
    keys = sorted(
        {k for run in base for k in run.get("per_fact", {}) if k.endswith(".original_accuracy")}
    )
    rows = []
    for key in keys:
        fmt = key.split(".")[1]
        found = interval(base, key)
        if found is None:
            continue
        mean, low, high, n = found
        chances = [run["metrics"].get(f"forget.{fmt}.chance") for run in base]
        chance = next((c for c in chances if c is not None), None)
        usable = chance is not None and low > chance
        rows.append(
            {"format": fmt, "accuracy": mean, "low": low, "high": high, "n": n,
             "chance": chance, "usable": usable}
        )  # fmt: skip
    return rows


def claims_for(results: dict[str, list[dict[str, Any]]]) -> list[Claim]:
    """The claims this run can test: P(original) in every format above chance, held-out
    accuracy after each relearning attack (final and at its best step), probe accuracy."""
    claims = []
    usable = [row["format"] for row in format_baselines(results) if row["usable"]]
    for fmt in usable:
        # the paper's number is the letter MCQ's; the other formats have none to set against
        family = "formats" if fmt == "mcq" else "formats_other"
        claims.append(
            Claim(family, f"forget.{fmt}.p_original", f"P(original answer) after the edit: {fmt}")
        )
    keys = _per_fact_keys(results)
    for part in _relearn_parts(keys):
        claims.append(
            Claim("relearn", f"{part}.completion.accuracy",
                  f"held-out accuracy after relearning ({part})")
        )  # fmt: skip
        claims.append(
            Claim("relearn", f"{part}.peak.completion.accuracy",
                  f"held-out accuracy at relearning's best step ({part})")
        )  # fmt: skip
    for key, title in (
        ("counterfact.paraphrase_score", "ROME paraphrase score (new answer wins on paraphrases)"),
        ("counterfact.neighborhood_score", "ROME neighbourhood score (neighbours keep theirs)"),
    ):
        if key in keys:
            claims.append(Claim("counterfact", key, title, lower_is_better=False))
    for key, title in (
        ("probe.forget_accuracy_layer_mean", "probe accuracy on forget facts, mean over layers"),
        ("probe.forget_accuracy_last", "probe accuracy on forget facts, last layer"),
        ("probe.forget_accuracy", "probe accuracy on forget facts, best retain layer"),
    ):
        if key in keys:
            claims.append(Claim("probe", key, title))
    return claims


EDITED = "forget.completion.edit_success"
"""Per fact: did the edit install the new answer (completion format)? Conditions the
"facts both rows edited" comparison."""

EFFICACY = "counterfact.efficacy_score"
"""Per CounterFact record: does the new answer beat the true one on the rewrite prompt (ROME's
efficacy): the edit's own success, context beside the claims."""


def _restrict(
    values: dict[int, dict[str, float]], keep: dict[int, set[str]]
) -> dict[int, dict[str, float]]:
    return {
        s: {f: v for f, v in facts.items() if f in keep.get(s, ())} for s, facts in values.items()
    }


def _edited_facts(runs: Sequence[dict[str, Any]]) -> dict[int, set[str]]:
    return {
        s: {f for f, v in facts.items() if v >= 0.5} for s, facts in by_seed(runs, EDITED).items()
    }


def _paired_mean(values: dict[int, dict[str, float]], other: dict[int, dict[str, float]]) -> float:
    means = []
    for seed in sorted(set(values) & set(other)):
        shared = sorted(set(values[seed]) & set(other[seed]))  # a fixed summation order
        if shared:
            means.append(sum(values[seed][f] for f in shared) / len(shared))
    return sum(means) / len(means) if means else float("nan")


def claim_rows(
    results: dict[str, list[dict[str, Any]]],
    reference: str = REFERENCE,
    others: Sequence[str] = OUTPUT_TRACING,
    both_edited: bool = False,
    name: str = "FLU",
) -> list[dict[str, Any]]:
    """One row per (claim, output-tracing localization): both means on the paired facts, the
    paired difference ``reference - other`` with its interval, and the verdict.

    ``both_edited``: only the facts both rows' edits installed (completion edit success), so a
    row whose edit took on fewer facts is not credited or blamed for the facts it never edited
    (a conditional comparison: the facts kept can differ between the two pairings)."""
    if reference not in results:
        raise DataError(f"no {reference!r} row to compare against; rows: {', '.join(results)}")
    # ROME's efficacy is stored only for CounterFact edits: the athletes' numbers do not apply
    athletes = not any(EFFICACY in run.get("per_fact", {}) for run in results[reference])
    rows = []
    claims = [Claim("edit", EDITED, "edit success: completion (context, not a claim)", False)]
    claims.append(Claim("edit", EFFICACY, "ROME efficacy score (context, not a claim)", False))
    for claim in claims + claims_for(results):
        ours = by_seed(results[reference], claim.key)
        if not ours:
            continue
        for other in [o for o in others if o in results]:
            theirs = by_seed(results[other], claim.key)
            mine = ours
            if both_edited:
                a, b = _edited_facts(results[reference]), _edited_facts(results[other])
                keep = {s: a[s] & b[s] for s in set(a) & set(b)}
                mine, theirs = _restrict(ours, keep), _restrict(theirs, keep)
            try:
                diff = paired_difference(mine, theirs)
            except DataError:
                continue
            paper = PAPER.get(claim.family, {}) if athletes else {}
            rows.append(
                {
                    "claim": claim.title,
                    "key": claim.key,
                    "other": other,
                    "facts": "both rows edited" if both_edited else "all",
                    "paper_reference": paper.get(reference),
                    "paper_other": paper.get(other),
                    "reference_mean": _paired_mean(mine, theirs),
                    "other_mean": _paired_mean(theirs, mine),
                    "difference": diff.mean,
                    "low": diff.low,
                    "high": diff.high,
                    "n_seeds": diff.n_seeds,
                    "n_pairs": diff.n_facts,
                    "verdict": verdict(diff, claim.lower_is_better, name=name),
                }
            )
    return rows


def relearn_strength_rows(
    results: dict[str, list[dict[str, Any]]], order: Sequence[str]
) -> list[dict[str, Any]]:
    """Per relearning attack and row: held-out accuracy before and after the attack and what
    the attack restored (after - before, paired by fact), each with its interval. A shallow
    edit (``last_layer``) that the attack does not restore means the attack is too weak."""
    rows = []
    for part in _relearn_parts(_per_fact_keys(results)):
        for name in order:
            if name == BASE or name not in results:
                continue
            before = by_seed(results[name], f"{part}.before.completion.accuracy")
            after = by_seed(results[name], f"{part}.completion.accuracy")
            if not before or not after:
                continue
            restored = paired_difference(after, before)
            rows.append(
                {
                    "attack": part,
                    "row": name,
                    "before": interval(results[name], f"{part}.before.completion.accuracy"),
                    "after": interval(results[name], f"{part}.completion.accuracy"),
                    "restored": (restored.mean, restored.low, restored.high),
                    "n_seeds": restored.n_seeds,
                }
            )
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _ci(mean: float, low: float, high: float, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{100 * mean:{sign}.1f} [{100 * low:{sign}.1f}, {100 * high:{sign}.1f}]"


def _claim_table(rows: list[dict[str, Any]], both_edited: bool) -> list[str]:
    if not rows:
        return []
    title = "on the facts both rows edited" if both_edited else "on every forget fact"
    lines = [
        "",
        f"## Claims: fact lookup (FLU) against output tracing, {title}",
        "",
        "Percent. Difference = FLU - other, paired by seed and fact, with its bootstrap 95% "
        "interval (seeds, then facts within seeds, resampled); lower is better for every claim "
        "(the original answer should be gone) except ROME's scores, higher for them and for the "
        "edit-success context rows. Paper: "
        "Gemma-7B, 16 athletes (MCQ P(original), accuracy after relearning, probe accuracy)."
        + (
            " Only facts whose completion-format edit succeeded in both rows are compared."
            if both_edited
            else ""
        ),
        "",
        "| claim | vs | paper FLU / other | ours FLU | ours other | FLU - other [95% CI] "
        "| seeds | pairs | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['claim']} | {row['other']} | {_pct(row['paper_reference'])} / "
            f"{_pct(row['paper_other'])} | {_pct(row['reference_mean'])} | "
            f"{_pct(row['other_mean'])} | "
            f"{_ci(row['difference'], row['low'], row['high'], signed=True)} | "
            f"{row['n_seeds']} | {row['n_pairs']} | **{row['verdict']}** |"
        )
    return lines


def twin_rows(
    results: dict[str, list[dict[str, Any]]], twins: dict[str, str]
) -> list[dict[str, Any]]:
    """Each twin against the row it takes its learning rate from or is matched to (``twins``:
    twin -> row; e.g. a LAT row and its plain twin, Sheshadri et al.'s comparison): the same
    claims as ``claim_rows``, difference = twin - row, the twin's name in the verdict."""
    rows = []
    for twin, base in twins.items():
        if twin in results and base in results:
            for row in claim_rows(results, reference=twin, others=[base], name=twin):
                rows.append({**row, "twin": twin})
    return rows


def twins_markdown(results: dict[str, list[dict[str, Any]]], twins: dict[str, str]) -> str:
    """The twin comparisons as a table (empty without twins or per-fact results)."""
    rows = twin_rows(results, twins)
    if not rows:
        return ""
    lines = [
        "## Twins: each row minus the row it is compared with",
        "",
        "Percent. Difference = twin - row, paired by seed and fact, with its bootstrap 95% "
        "interval; the same direction conventions as the claims above. A twin trains with its "
        "row's learning rate (e.g. LAT minus its plain twin: the same method, learning rate "
        "and facts, only the adversary added) or, when matched, with the learning rate at "
        "which it forgets as much as its row on the validation facts.",
        "",
        "| claim | twin | row | ours twin | ours row | twin - row [95% CI] | seeds | pairs | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['claim']} | {row['twin']} | {row['other']} | {_pct(row['reference_mean'])} | "
            f"{_pct(row['other_mean'])} | "
            f"{_ci(row['difference'], row['low'], row['high'], signed=True)} | "
            f"{row['n_seeds']} | {row['n_pairs']} | **{row['verdict']}** |"
        )
    return "\n".join(lines)


def claims_markdown(results: dict[str, list[dict[str, Any]]], order: Sequence[str]) -> str:
    """The per-format baseline table, the claim table and the relearning-strength table
    (empty when the run has no per-fact results or no fact-lookup row)."""
    if REFERENCE not in results or not any(
        run.get("per_fact") for runs in results.values() for run in runs
    ):
        return ""
    lines = [
        "## Per-format baseline (unedited model on the forget facts)",
        "",
        "Accuracy in percent with its bootstrap 95% interval over seeds and facts; a format whose "
        "interval does not clear chance measures nothing about an edit and is left out of the "
        "verdicts.",
        "",
        "| format | accuracy | chance | facts x seeds | used |",
        "|---|---|---|---|---|",
    ]
    for row in format_baselines(results):
        lines.append(
            f"| {row['format']} | {_ci(row['accuracy'], row['low'], row['high'])} | "
            f"{_pct(row['chance'])} | {row['n']} | {'yes' if row['usable'] else 'no: at chance'} |"
        )
    for both_edited in (False, True):
        lines += _claim_table(claim_rows(results, both_edited=both_edited), both_edited)
    strength = relearn_strength_rows(results, order)
    if strength:
        lines += [
            "",
            "## Relearning attacks: what each restores",
            "",
            "Held-out forget facts (never trained on by the attack), completion accuracy in "
            "percent with 95% intervals; restored = after - before, paired by fact. The "
            "`last_layer` row is the positive control: a shallow edit any useful attack undoes.",
            "",
            "| attack | row | before | after | restored | seeds |",
            "|---|---|---|---|---|---|",
        ]
        for row in strength:
            before, after = row["before"], row["after"]
            lines.append(
                f"| {row['attack']} | {row['row']} | {_ci(*before[:3])} | {_ci(*after[:3])} | "
                f"{_ci(*row['restored'], signed=True)} | {row['n_seeds']} |"
            )
    return "\n".join(lines)


def _component_sum(entry: dict[str, Any], method: str, components: Sequence[str]) -> float | None:
    """What ``method`` found on ``components``: fact lookup's raw enrichment (the drop of the
    extraction heads' answer contribution when the MLP's subject output is corrupted, summed
    over the row's MLPs), causal tracing's indirect effects summed over the row's components."""
    if method == "fact_lookup":
        layers = entry.get("mlp_layers_patched", [])
        raw = entry.get("mlp_enrichment_heads", [])
        picked = [int(c.split(".")[1]) for c in components if c.endswith(".mlp")]
        values = [raw[layers.index(layer)] for layer in picked if layer in layers]
        return sum(values) if values else None
    scores = entry.get("scores", {})
    values = [scores[c] for c in components if c in scores]
    return sum(values) if values else None


def relocalize_rows(
    results: dict[str, list[dict[str, Any]]], order: Sequence[str]
) -> list[dict[str, Any]]:
    """Per edited row and relocalization method: on the same forget facts (original answers),
    what the method finds on the row's own components before the edit (the base model) and
    after it, and for fact lookup the clean logit difference and the best subject probe."""
    base = {r["seed"]: r.get("curves", {}).get("relocalize") for r in results.get(BASE, [])}
    rows = []
    for name in order:
        if name == BASE or name not in results:
            continue
        per_method: dict[str, dict[str, list[float]]] = {}
        for run in results[name]:
            before, after = base.get(run["seed"]), run.get("curves", {}).get("relocalize")
            if not before or not after or before.get("facts") != after.get("facts"):
                continue
            for method in [m for m in after if m != "facts" and m in before]:
                measures = per_method.setdefault(method, {})
                pairs = [
                    ("on the row's components", _component_sum(before[method], method, run["components"]),
                     _component_sum(after[method], method, run["components"])),
                ]  # fmt: skip
                if method == "fact_lookup":
                    pairs += [
                        ("clean logit difference", before[method]["logit_diff_clean"],
                         after[method]["logit_diff_clean"]),
                        ("best subject-probe accuracy", max(before[method]["probe_last_subject"][1:]),
                         max(after[method]["probe_last_subject"][1:])),
                    ]  # fmt: skip
                for label, b, a in pairs:
                    if b is not None and a is not None:
                        measures.setdefault(label, []).append((b, a))
        for method, measures in per_method.items():
            for label, values in measures.items():
                rows.append(
                    {
                        "row": name, "method": method, "measure": label, "n_seeds": len(values),
                        "before": sum(b for b, _ in values) / len(values),
                        "after": sum(a for _, a in values) / len(values),
                    }
                )  # fmt: skip
    return rows


def relocalize_markdown(results: dict[str, list[dict[str, Any]]], order: Sequence[str]) -> str:
    rows = relocalize_rows(results, order)
    if not rows:
        return ""
    lines = [
        "## Localized again after the edit",
        "",
        "Each method run again on the edited model, on the same forget facts with their "
        "original answers, against the same run on the unedited model (mean over seeds). "
        "Fact lookup: raw enrichment summed over the row's MLPs (how much of the extraction "
        "heads' original-answer signal those MLPs' subject outputs carry), the clean logit "
        "difference and the best subject-probe accuracy; causal tracing: indirect effects "
        "summed over the row's components.",
        "",
        "| row | method | measure | before the edit | after | seeds |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['row']} | {row['method']} | {row['measure']} | {row['before']:.3f} | "
            f"{row['after']:.3f} | {row['n_seeds']} |"
        )
    return "\n".join(lines)
