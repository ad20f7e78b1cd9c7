"""Paired bootstrap differences (report.paired) and the claim verdicts built on them."""

from __future__ import annotations

import numpy as np
import pytest

from mechunlearn.errors import DataError
from mechunlearn.report.claims import fact_values, format_baselines
from mechunlearn.report.paired import (
    PairedDifference,
    bootstrap_mean,
    paired_difference,
    paired_values,
    verdict,
)


def test_constant_differences_give_a_point_interval():
    mean, low, high = bootstrap_mean([[0.25] * 10, [0.25] * 7], n_resamples=500)
    assert mean == low == high == pytest.approx(0.25)


def test_estimate_is_the_mean_of_seed_means_and_the_interval_widens_with_spread():
    mean, low, high = bootstrap_mean([[0.0] * 10, [1.0] * 2], n_resamples=2000)
    assert mean == pytest.approx(0.5)  # not the pooled mean 1/6: seeds weigh equally
    assert low == pytest.approx(0.0) and high == pytest.approx(1.0)  # seeds resampled
    rng = np.random.default_rng(1)
    noisy = [list(0.3 + 0.2 * rng.standard_normal(64)) for _ in range(5)]
    mean, low, high = bootstrap_mean(noisy)
    assert low < 0.3 < high and low > 0.2 and high < 0.4
    one_seed = bootstrap_mean(noisy[:1])
    assert one_seed[1] < one_seed[0] < one_seed[2]  # facts alone are still resampled


def test_pairs_only_shared_seeds_and_facts():
    a = {0: {"x": 1.0, "y": 0.0, "z": 1.0}, 1: {"x": 1.0}, 2: {"x": 0.0}}
    b = {0: {"x": 0.0, "y": 0.0}, 1: {"w": 1.0}, 3: {"x": 1.0}}
    assert paired_values(a, b) == {0: [1.0, 0.0]}
    diff = paired_difference(a, b, n_resamples=500)
    assert diff.n_seeds == 1 and diff.n_facts == 2 and diff.mean == pytest.approx(0.5)
    with pytest.raises(DataError, match="share no"):
        paired_difference({0: {"x": 1.0}}, {1: {"x": 1.0}})
    with pytest.raises(DataError, match="every seed is empty"):
        bootstrap_mean([[], []])


def test_verdicts_follow_the_interval_and_the_direction():
    lower = PairedDifference(-0.3, -0.5, -0.1, 5, 160)
    assert verdict(lower, lower_is_better=True) == "FLU better"
    assert verdict(lower, lower_is_better=False) == "FLU worse"
    assert verdict(PairedDifference(0.2, 0.05, 0.3, 5, 160), True) == "FLU worse"
    assert verdict(PairedDifference(0.1, -0.05, 0.3, 5, 160), True) == "no decidable difference"


def test_relearning_fact_values_before_and_at_the_best_step():
    run = {
        "per_fact": {"relearn.completion.accuracy": {"a": 1.0, "b": 0.0}},
        "curves": {
            "relearn": {
                "curve": [
                    {"step": 0, "completion.accuracy": 0.0},
                    {"step": 5, "completion.accuracy": 1.0},
                    {"step": 10, "completion.accuracy": 0.5},
                ],
                "curve_per_fact": [
                    {"completion.accuracy": {"a": 0.0, "b": 0.0}},
                    {"completion.accuracy": {"a": 1.0, "b": 1.0}},
                    {"completion.accuracy": {"a": 1.0, "b": 0.0}},
                ],
            }
        },
    }
    assert fact_values(run, "relearn.completion.accuracy") == {"a": 1.0, "b": 0.0}
    assert fact_values(run, "relearn.before.completion.accuracy") == {"a": 0.0, "b": 0.0}
    assert fact_values(run, "relearn.peak.completion.accuracy") == {"a": 1.0, "b": 1.0}
    assert fact_values(run, "relearn.after.completion.accuracy") is None


def test_a_format_at_chance_is_not_used():
    facts = {f"f{i}": float(i % 3 == 0) for i in range(60)}  # 33% correct, chance 1/3
    known = {f"f{i}": 1.0 for i in range(60)}
    base = [
        {
            "seed": s,
            "metrics": {"forget.mcq.chance": 1 / 3, "forget.completion.chance": 1 / 3},
            "per_fact": {
                "forget.mcq.original_accuracy": facts,
                "forget.completion.original_accuracy": known,
            },
        }
        for s in range(3)
    ]
    rows = {row["format"]: row for row in format_baselines({"base": base})}
    assert not rows["mcq"]["usable"] and rows["completion"]["usable"]
    assert rows["mcq"]["n"] == 180


def _row(seed: int, edited: dict[str, float], p_original: dict[str, float]) -> dict:
    return {
        "seed": seed,
        "metrics": {},
        "per_fact": {
            "forget.completion.edit_success": edited,
            "probe.forget_accuracy_layer_mean": p_original,
        },
    }


def test_claims_pair_every_fact_or_only_the_facts_both_rows_edited():
    from mechunlearn.report.claims import claim_rows

    facts = [f"f{i}" for i in range(8)]
    flu = [_row(s, dict.fromkeys(facts, 1.0), dict.fromkeys(facts, 0.0)) for s in range(2)]
    # causal tracing edited only half the facts; the probe still finds every original answer
    half = {f: float(i < 4) for i, f in enumerate(facts)}
    ct = [_row(s, half, dict.fromkeys(facts, 1.0)) for s in range(2)]
    results = {"fact_lookup": flu, "causal_tracing": ct}
    every = {r["key"]: r for r in claim_rows(results)}
    edited = {r["key"]: r for r in claim_rows(results, both_edited=True)}
    probe = "probe.forget_accuracy_layer_mean"
    assert every[probe]["n_pairs"] == 16 and edited[probe]["n_pairs"] == 8
    assert every[probe]["verdict"] == edited[probe]["verdict"] == "FLU better"
    assert every["forget.completion.edit_success"]["difference"] == pytest.approx(0.5)
    assert every["forget.completion.edit_success"]["verdict"] == "FLU better"  # higher is better
    assert edited["forget.completion.edit_success"]["difference"] == pytest.approx(0.0)
    assert edited[probe]["facts"] == "both rows edited" and every[probe]["facts"] == "all"


def test_counterfact_scores_are_claims_where_higher_is_better():
    from mechunlearn.report.claims import claim_rows

    facts = [f"cf:{i}" for i in range(8)]

    def run(seed, paraphrase):
        return {
            "seed": seed,
            "metrics": {},
            "per_fact": {
                "counterfact.efficacy_score": dict.fromkeys(facts, 1.0),
                "counterfact.paraphrase_score": dict.fromkeys(facts, paraphrase),
                "counterfact.neighborhood_score": dict.fromkeys(facts, 0.9),
            },
        }

    results = {
        "fact_lookup": [run(s, 0.8) for s in range(2)],
        "causal_tracing": [run(s, 0.3) for s in range(2)],
    }
    rows = {r["key"]: r for r in claim_rows(results)}
    assert rows["counterfact.paraphrase_score"]["verdict"] == "FLU better"
    assert rows["counterfact.paraphrase_score"]["difference"] == pytest.approx(0.5)
    assert rows["counterfact.neighborhood_score"]["verdict"] == "no decidable difference"
    assert rows["counterfact.efficacy_score"]["n_pairs"] == 16


def test_the_papers_number_sits_only_beside_the_letter_mcq():
    from mechunlearn.report.claims import claim_rows

    facts = [f"f{i}" for i in range(6)]

    def run(seed, p):
        return {
            "seed": seed,
            "metrics": {"forget.mcq.chance": 1 / 3, "forget.completion.chance": 1 / 3},
            "per_fact": {
                "forget.mcq.original_accuracy": dict.fromkeys(facts, 1.0),
                "forget.completion.original_accuracy": dict.fromkeys(facts, 1.0),
                "forget.mcq.p_original": dict.fromkeys(facts, p),
                "forget.completion.p_original": dict.fromkeys(facts, p),
            },
        }

    results = {
        "base": [run(s, 0.9) for s in range(2)],
        "fact_lookup": [run(s, 0.1) for s in range(2)],
        "causal_tracing": [run(s, 0.8) for s in range(2)],
    }
    rows = {r["key"]: r for r in claim_rows(results)}
    assert rows["forget.mcq.p_original"]["paper_reference"] == 0.013
    assert rows["forget.completion.p_original"]["paper_reference"] is None
    # a CounterFact edit (ROME's efficacy stored per fact) is not set against the athletes
    for runs in results.values():
        for r in runs:
            r["per_fact"]["counterfact.efficacy_score"] = dict.fromkeys(facts, 1.0)
    rows = {r["key"]: r for r in claim_rows(results)}
    assert rows["forget.mcq.p_original"]["paper_reference"] is None


def test_twins_are_compared_with_the_row_whose_learning_rate_they_share():
    from mechunlearn.report.claims import twin_rows, twins_markdown

    facts = [f"f{i}" for i in range(8)]
    plain = [_row(s, dict.fromkeys(facts, 1.0), dict.fromkeys(facts, 0.6)) for s in range(2)]
    lat = [_row(s, dict.fromkeys(facts, 1.0), dict.fromkeys(facts, 0.2)) for s in range(2)]
    results = {"GA": plain, "GA_LAT": lat, "RMU": plain}
    rows = {r["key"]: r for r in twin_rows(results, {"GA_LAT": "GA", "RMU_LAT": "RMU"})}
    probe = rows["probe.forget_accuracy_layer_mean"]
    assert probe["twin"] == "GA_LAT" and probe["other"] == "GA"  # RMU_LAT has no results
    assert probe["difference"] == pytest.approx(-0.4) and probe["verdict"] == "GA_LAT better"
    assert "| GA_LAT | GA |" in twins_markdown(results, {"GA_LAT": "GA"})
    assert twins_markdown(results, {}) == ""


def test_lat_twin_rows_pair_each_method_with_its_twin_request_by_request():
    """LAT refuses 4 more of 10 requests than its twin in every seed: the difference is +40
    points with an interval above zero; a metric without per-request values, a column without
    a direction and a method without a twin give no row."""
    from mechunlearn.report.lat_twins import lat_twin_rows, lat_twins_markdown

    def run(seed: int, refused: list[int], baseline: str | None) -> dict:
        values = {str(i): float(v) for i, v in enumerate(refused)}
        return {"seed": seed, "baseline": baseline, "per_request": {"refusal.rate": values}}

    plain = [1, 1, 0, 0, 0, 0, 0, 0, 1, 0]
    lat = [1, 1, 1, 1, 1, 1, 0, 0, 1, 0]
    results = {
        "base": [run(s, plain, None) for s in range(5)],
        "RT": [run(s, plain, None) for s in range(5)],
        "LAT": [run(s, lat, "RT") for s in range(5)],
    }
    columns = [
        ("refusal.rate", "refusal rate", False),
        ("prefill.success", "compliance under prefilling", True),
        ("benign.loss", "benign loss", None),
    ]
    rows = lat_twin_rows(results, columns)
    assert [(r["method"], r["twin"], r["metric"]) for r in rows] == [("LAT", "RT", "refusal.rate")]
    row = rows[0]
    assert row["difference"] == pytest.approx(0.4)
    assert 0 < row["low"] <= 0.4 <= row["high"] and row["verdict"] == "LAT better"
    assert row["seeds"] == 5 and row["pairs"] == 50
    assert "| LAT | RT | refusal rate | +40.0 [" in "\n".join(lat_twins_markdown(rows))
    assert lat_twins_markdown([]) == []
