"""Cells and tables of experiment reports: units per metric kind, arrows only where a metric
has a desired direction."""

import math

from mechunlearn.report.results import format_cell, markdown_table


def stat(mean: float, std: float = math.nan) -> dict[str, float]:
    return {"mean": mean, "std": std, "n": 1 if math.isnan(std) else 2}


def test_cells_use_each_metric_kinds_unit():
    assert format_cell(stat(0.5, 0.125), "forget.completion.edit_success") == "50.0 ± 12.5"
    assert format_cell(stat(-0.2104), "lm_loss_delta") == "-0.210"
    assert format_cell(stat(263.74, 10.0), "train_seconds") == "263.7 ± 10.0"
    assert format_cell(stat(1.2345), "benign.loss") == "1.234"  # nats
    assert format_cell(stat(-1.8041, 0.275), "refusal.margin") == "-1.804 ± 0.275"
    assert format_cell(stat(810.66, 3.4), "compute.train_seconds") == "810.7 ± 3.4"
    assert format_cell(stat(192.0, 0.0), "compute.fwd_bwd_passes") == "192 ± 0"
    assert format_cell(stat(64.0, 0.0), "counterfact.efficacy_n_records") == "64 ± 0"
    assert format_cell(None, "anything") == "-"


def test_table_arrows_follow_the_desired_direction():
    summary = {"base": {"a": stat(0.1), "b": stat(0.2)}, "m": {"a": stat(0.3)}}
    table = markdown_table(summary, ["base", "m"], [("a", "A", True), ("b", "B", None)])
    head, rule, base, m = table.split("\n")
    assert head == "| localization | A ↓ | B |"
    assert rule == "|---|---|---|"
    assert base == "| base | 10.0 | 20.0 |" and m == "| m | 30.0 | - |"
    assert markdown_table(summary, ["base"], [("missing", "X", False)]) == ""
