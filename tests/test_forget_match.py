"""Matched forgetting (``match_forgetting``): a row's learning rate calibrated to another row's
validation forgetting before the two are compared (issue 18)."""

from __future__ import annotations

import json

import pytest

from mechunlearn.errors import ConfigError
from mechunlearn.experiments import forget_match
from mechunlearn.experiments.config import validate_config
from mechunlearn.experiments.edit_config import ExperimentConfig, LocalizationSpec
from mechunlearn.experiments.edit_job import plan_units, run_experiment
from tests.test_experiment_run import tiny_config


def _fake_point(effect):
    """A validation point whose forget effect is ``effect(lr)``, and the learning rates it was
    trained at."""
    calls: list[float] = []

    def point(lr, coef):
        calls.append(lr)
        return {
            "forget_effect": effect(lr),
            "retain_accuracy": 0.9,
            "retain_kept": 0.9,
            "score": 0.5,
            "lr": lr,
            "forget_coef": coef,
            "final_loss": 0.0,
        }

    return point, calls


def _spec(**match) -> LocalizationSpec:
    return LocalizationSpec.model_validate(
        {"name": "twin", "method": "all_mlps", "match_forgetting": {"row": "plain", **match}}
    )


def _match(spec, point, reference, trials=None):
    reference = {"n_validation": 32, **reference}
    return forget_match.match_forgetting(spec, point, reference, [1e-3, 1e-5, 1e-4], trials)


def test_the_learning_rate_is_bisected_toward_the_rows_forgetting(tmp_path):
    point, calls = _fake_point(lambda lr: min(1.0, lr * 1000))
    reference = {"forget_effect": 0.5, "forget_coef": 2.0, "lr": 1e-5}
    record = _match(_spec(refine=2), point, reference, tmp_path / "trials.json")
    # the sweep's grid, smallest first, then two bisections of the bracketing pair
    assert calls == [1e-5, 1e-4, 1e-3, 0.0003162, 0.0005623]
    assert record["chosen"] == {"lr": 0.0005623, "forget_coef": 2.0}
    assert record["chosen_forget_effect"] == pytest.approx(0.5623)
    assert record["target"] == 0.5 and record["row"] == "plain"
    assert [t["lr"] for t in record["tried"]] == sorted(calls)
    # resumed: every logged try is reused, none retrained
    calls.clear()
    again = _match(_spec(refine=2), point, reference, tmp_path / "trials.json")
    assert calls == [] and again["chosen"] == record["chosen"]
    # another target: the log belongs to another calibration and is ignored
    _match(_spec(refine=0), point, {**reference, "forget_effect": 0.05}, tmp_path / "trials.json")
    assert calls == [1e-5, 1e-4, 1e-3]


def test_without_a_bracketing_pair_the_closest_grid_value_is_chosen():
    point, calls = _fake_point(lambda lr: 0.1)  # never forgets enough
    reference = {"forget_effect": 0.6, "forget_coef": 1.0}
    record = _match(_spec(lr=[3e-5, 1e-5], refine=3), point, reference)
    assert calls == [3e-5, 1e-5]  # the row's own grid, no bisection without a bracket
    assert record["chosen"]["lr"] == 1e-5  # a tie goes to the smaller learning rate


def _matched_config(saved_llama, twin: dict):
    config = tiny_config(saved_llama, seeds=[0]).model_dump(mode="json")
    config["mode"] = "unlearn"
    config["train"] |= {"objective": "gradient_ascent", "steps": 2}
    config["sweep"] = {"lr": [1e-5, 1e-2], "forget_coef": [1.0]}
    config["localizations"] = [{"name": "all_mlps", "method": "all_mlps"}, twin]
    # the relearning attack's held-out accuracy is a twin claim even on a tiny model's facts
    config["evaluation"] |= {"soft_prompt": None, "probes": False, "formats": ["completion"]}
    return config


def test_a_matched_row_is_calibrated_then_compared_with_its_row(saved_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    twin = {
        "name": "all_mlps_lat",
        "method": "all_mlps",
        "latent_adversary": {"layers": [0], "epsilon": 0.5, "steps": 1},
        "match_forgetting": {"row": "all_mlps", "lr": [1e-5, 1e-3, 1e-1], "refine": 1},
    }
    cfg = validate_config(ExperimentConfig, _matched_config(saved_llama, twin), "t")
    units = {u.key: u for u in plan_units(cfg)}
    assert not any(k.startswith("sweep/all_mlps_lat") for k in units)
    assert units["match/reference/all_mlps"].deps == (
        "localize/all_mlps", "sweep/all_mlps/r0p0", "sweep/all_mlps/r0p1",
    )  # fmt: skip
    assert units["match/all_mlps_lat"].deps == (
        "localize/all_mlps_lat",
        "match/reference/all_mlps",
    )
    assert units["edit/all_mlps_lat/seed0"].deps == ("localize/all_mlps_lat", "match/all_mlps_lat")

    out = run_experiment(cfg, tmp_path / "run", progress=False)
    record = json.loads((out / "match" / "all_mlps_lat.json").read_text())
    reference = json.loads((out / "match" / "reference" / "all_mlps.json").read_text())
    run = json.loads((out / "run.json").read_text())
    assert record["target"] == reference["forget_effect"]
    assert reference["lr"] == run["hyperparameters"]["all_mlps"]["lr"]
    assert 3 <= len(record["tried"]) <= 4
    gaps = [abs(t["forget_effect"] - record["target"]) for t in record["tried"]]
    chosen = next(t for t in record["tried"] if t["lr"] == record["chosen"]["lr"])
    assert abs(chosen["forget_effect"] - record["target"]) == min(gaps)
    assert run["hyperparameters"]["all_mlps_lat"]["lr"] == record["chosen"]["lr"]
    assert not (out / "sweep" / "all_mlps_lat.json").exists()
    text = (out / "results.md").read_text()
    assert "## Matched forgetting" in text and "## Twins" in text
    twins = json.loads((out / "claims.json").read_text())["twins"]
    assert {(r["twin"], r["other"]) for r in twins} == {("all_mlps_lat", "all_mlps")}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"match_forgetting": {"row": "nowhere"}}, "names no other localization"),
        ({"match_forgetting": {"row": "all_mlps_lat"}}, "names no other localization"),
        (
            {"match_forgetting": {"row": "all_mlps"}, "hyperparameters_from": "all_mlps"},
            "drop hyperparameters_from",
        ),
        ({"match_forgetting": {"row": "all_mlps", "lr": [1e-3]}}, "at least two distinct"),
    ],
)
def test_a_broken_match_is_refused(saved_llama, change, message):
    twin = {"name": "all_mlps_lat", "method": "all_mlps", **change}
    with pytest.raises(ConfigError, match=message):
        validate_config(ExperimentConfig, _matched_config(saved_llama, twin), "t")


def test_matching_to_a_matched_row_or_borrowing_its_choice_is_refused(saved_llama):
    twin = {"name": "all_mlps_lat", "method": "all_mlps", "match_forgetting": {"row": "all_mlps"}}
    config = _matched_config(saved_llama, twin)
    chained = json.loads(json.dumps(config))
    chained["localizations"].append(
        {"name": "third", "method": "all_mlps", "match_forgetting": {"row": "all_mlps_lat"}}
    )
    with pytest.raises(ConfigError, match="which is matched itself"):
        validate_config(ExperimentConfig, chained, "t")
    borrowing = json.loads(json.dumps(config))
    borrowing["localizations"].append(
        {"name": "third", "method": "all_mlps", "hyperparameters_from": "all_mlps_lat"}
    )
    with pytest.raises(ConfigError, match="which is matched"):
        validate_config(ExperimentConfig, borrowing, "t")


def test_an_edit_whose_weights_are_gone_is_trained_again_before_its_battery(
    saved_llama, tmp_path, monkeypatch
):
    """A finished run deletes every edited-weights file; an edit made by an earlier launch for
    a seed the finished run did not cover could then never be measured. Extending the run
    retrains it instead of failing."""
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    config = _matched_config(saved_llama, {"name": "all_mlps_2", "method": "all_mlps"})
    config["localizations"] = config["localizations"][:1]
    cfg = validate_config(ExperimentConfig, config, "t")
    out = run_experiment(cfg, tmp_path / "run", progress=False)
    result = out / "results" / "all_mlps" / "seed0.json"
    measures = out / "units" / "measure" / "all_mlps" / "seed0"
    assert result.is_file() and not (out / "units" / "weights").exists()
    # the state such a launch leaves: the edit done, its battery not, its weights deleted
    result.unlink()
    for part in measures.glob("*.json"):
        part.unlink()
    edit = out / "units" / "edit" / "all_mlps" / "seed0.json"
    edited_at = edit.stat().st_mtime_ns
    messages: list[str] = []
    run_experiment(cfg, tmp_path / "run", resume=True, progress=False, log=messages.append)
    assert result.is_file() and edit.stat().st_mtime_ns > edited_at
    assert any("edit/all_mlps/seed0: its edited weights are gone" in m for m in messages)
