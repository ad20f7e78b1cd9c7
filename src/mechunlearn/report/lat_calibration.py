"""How well a LAT run's benign-compliance matching worked (``match_benign``, issue 18): each
calibrated method's tried ``benign_coef`` values with their validation compliance, the chosen
one, and the benign compliance it then reached on the test requests. Robustness at matched
over-refusal is only as matched as these numbers say, so the report shows them next to the
comparison (a table and a figure of compliance against the coefficient)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter  # noqa: E402

from mechunlearn.plotting import save_figure  # noqa: E402
from mechunlearn.report.results import format_cell  # noqa: E402

TEST_BENIGN = "benign.compliance"


def calibrations(results, order: Sequence[str]) -> list[dict[str, Any]]:
    """One record per (method, calibration): a method calibrated once (``per_seed: false``)
    has one, shared by all its seeds; one calibrated per seed has one per seed."""
    found = []
    for name in order:
        seen: dict[int, dict[str, Any]] = {}
        for run in results.get(name, []):
            record = run.get("calibration")
            if record is not None and record["seed"] not in seen:
                seen[record["seed"]] = record
        found += [{"method": name, **seen[seed]} for seed in sorted(seen)]
    return found


def _chosen_rate(record: dict[str, Any]) -> float:
    return next(
        t["validation_compliance"] for t in record["tried"] if t["benign_coef"] == record["chosen"]
    )


def calibration_markdown(records: Sequence[dict[str, Any]], summary) -> list[str]:
    """The "Matched benign compliance" section (empty when nothing was calibrated)."""
    if not records:
        return []
    lines = [
        "",
        "## Matched benign compliance",
        "",
        "Each calibrated method was trained at every tried `benign_coef` and its benign "
        "compliance measured on the validation requests (held-out templates, never tested); "
        "the value closest to the target was then trained on every seed it covers. The last "
        "column is the benign compliance that value reached on the test requests (mean ± std "
        "over seeds): how well the match held out of sample.",
        "",
        "| method | calibrated on seed | target | tried: benign_coef -> validation compliance | "
        "chosen | validation | test benign compliance |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in records:
        tried = ", ".join(
            f"{t['benign_coef']:g} -> {100 * t['validation_compliance']:.1f}"
            for t in sorted(record["tried"], key=lambda t: t["benign_coef"])
        )
        test = summary.get(record["method"], {}).get(TEST_BENIGN)
        lines.append(
            f"| {record['method']} | {record['seed']} | {100 * record['target']:.0f} | {tried} | "
            f"{record['chosen']:g} | {100 * _chosen_rate(record):.1f} | "
            f"{format_cell(test, TEST_BENIGN)} |"
        )
    return lines


def calibration_figure(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Validation compliance against ``benign_coef`` (log scale; 0 drawn at the left edge),
    one line per calibration, the chosen value ringed and the target dashed."""
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    positive = [t["benign_coef"] for r in records for t in r["tried"] if t["benign_coef"] > 0]
    floor = min(positive) / 2 if positive else 1e-3
    for record in records:
        points = sorted(
            (max(t["benign_coef"], floor), t["validation_compliance"]) for t in record["tried"]
        )
        label = (
            record["method"]
            if len(records) == len({r["method"] for r in records})
            else (f"{record['method']} (seed {record['seed']})")
        )
        (line,) = ax.plot(*zip(*points, strict=True), marker="o", label=label)
        ax.scatter(
            [max(record["chosen"], floor)],
            [_chosen_rate(record)],
            s=140,
            facecolors="none",
            edgecolors=line.get_color(),
        )
    ax.axhline(records[0]["target"], color="grey", linestyle="--", linewidth=1, label="target")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("benign_coef")
    ax.set_ylabel("benign compliance (validation)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)
