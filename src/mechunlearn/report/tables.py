"""Rich tables of results, printed by the CLI and re-rendered from saved metrics."""

from __future__ import annotations

import math
from typing import Any

from rich.table import Table


def _pct(stat: dict[str, float]) -> str:
    mean, sem = stat["mean"], stat["sem"]
    if math.isnan(mean):
        return "-"
    return f"{100 * mean:.1f}" + ("" if math.isnan(sem) else f" ± {100 * sem:.1f}")


def eval_table(metrics: dict[str, Any], title: str) -> Table:
    """Formats as rows: accuracy, renormalised and full-vocabulary P(correct), in percent."""
    table = Table(title=title)
    for column in (
        "format",
        "facts",
        "prompts",
        "chance %",
        "accuracy %",
        "P(correct | options) %",
        "P(correct) full vocab %",
    ):
        table.add_column(column, justify="left" if column == "format" else "right")
    for name, row in metrics["formats"].items():
        table.add_row(
            name,
            str(row["n_records"]),
            str(row["n_items"]),
            f"{100 * row['chance']:.1f}",
            _pct(row["accuracy"]),
            _pct(row["prob_renorm"]),
            _pct(row["prob_full"]),
        )
    return table


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    lines = []
    known = metrics.get("known")
    if known:
        lines.append(
            f"known facts: {known['n_known']} / {known['n_total']} "
            f"(P(true | options) >= {known['threshold']} in the {known['format']} format)"
        )
    cf = metrics.get("counterfact")
    if cf:
        parts = ", ".join(f"{fmt} {100 * v:.1f}%" for fmt, v in cf.items())
        lines.append(f"CounterFact P(true) > P(new) (mean per-token NLL, as ROME): {parts}")
    lm = metrics.get("lm_loss")
    if lm:
        lines.append(
            f"LM loss on general text: {lm['loss']:.3f} nats/token (perplexity {lm['perplexity']:.1f}, {lm['tokens']} tokens)"
        )
    return lines
