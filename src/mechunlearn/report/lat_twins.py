"""LAT minus its non-LAT twin, paired by request, with bootstrap 95% intervals.

Sheshadri et al. (2024, "Targeted Latent Adversarial Training", Tables 1-3) compare each
defence with and without the latent adversary (RT vs RT-LAT, DPO vs DPO-LAT, ...). Both rows
of a seed are scored on the same held-out requests, so the difference is taken request by
request within each seed and its interval comes from the seeds-then-requests bootstrap of
``report.paired``. A method's twin is its ``baseline`` (the same training without an
adversary, ``LatExperimentConfig.baseline_of``); the verdict names the LAT method only when the
interval excludes zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mechunlearn.errors import DataError
from mechunlearn.report.columns import TableColumn
from mechunlearn.report.paired import paired_difference, verdict


def _per_request(runs: Sequence[dict[str, Any]], key: str) -> dict[int, dict[str, float]]:
    return {
        run["seed"]: run["per_request"][key] for run in runs if key in run.get("per_request", {})
    }


def lat_twin_rows(
    results: dict[str, list[dict[str, Any]]],
    columns: Sequence[TableColumn],
    order: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """For each method with a twin (``baseline``), in ``order`` (default: ``results``'), and
    each headline column with a desired direction and per-request values in both rows: the
    paired difference method - twin."""
    rows = []
    for name in order if order is not None else list(results):
        runs = results.get(name) or [{}]
        twin = runs[0].get("baseline")
        if not twin or twin == name or twin not in results:
            continue
        for key, label, lower in columns:
            if lower is None:
                continue
            ours, theirs = _per_request(runs, key), _per_request(results[twin], key)
            try:
                diff = paired_difference(ours, theirs)
            except DataError:  # no seed with this metric in both rows
                continue
            rows.append(
                {
                    "method": name,
                    "twin": twin,
                    "metric": key,
                    "label": label,
                    "lower_is_better": lower,
                    "difference": diff.mean,
                    "low": diff.low,
                    "high": diff.high,
                    "seeds": diff.n_seeds,
                    "pairs": diff.n_facts,
                    "verdict": verdict(diff, lower, name),
                }
            )
    return rows


def lat_twins_markdown(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The rows of ``lat_twin_rows`` as a report section (no lines without rows)."""
    if not rows:
        return []
    lines = [
        "## Each method minus its twin without the adversary",
        "",
        "Percentage points, paired by seed and held-out request; 95% bootstrap interval over "
        "seeds, then requests within each seed. The verdict names the method only when the "
        "interval excludes zero.",
        "",
        "| method | twin | metric | method - twin [95% CI] | seeds | pairs | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {row['twin']} | {row['label']} | "
            f"{100 * row['difference']:+.1f} [{100 * row['low']:+.1f}, "
            f"{100 * row['high']:+.1f}] | {row['seeds']} | {row['pairs']} | {row['verdict']} |"
        )
    return ["", *lines]
