"""The measurement registry: the built-in battery and LAT measurements, config validation of
``evaluation.measurements``, and a measurement added in one place reaching the battery's
parts, the results and the report's headline table."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, Field

from mechunlearn.errors import ConfigError
from mechunlearn.experiments import edit_config, lat_config
from mechunlearn.experiments.battery import battery_parts, merge_batteries
from mechunlearn.experiments.config import validate_config
from mechunlearn.experiments.edit_config import ExperimentConfig
from mechunlearn.experiments.edit_job import run_experiment
from mechunlearn.experiments.lat_config import LatExperimentConfig
from mechunlearn.experiments.measurements import (
    MEASUREMENTS,
    BatteryContext,
    BatteryResult,
    plan,
)
from mechunlearn.report.columns import SECTIONS, Column, table_columns
from mechunlearn.schema import STRICT_CONFIG
from tests.test_experiment_run import tiny_config

EDIT = ["formats", "counterfact", "probes", "relocalize", "relearn", "soft_prompt"]
LAT = [
    "refusal", "backdoor", "latent_attack", "prefill", "gcg", "many_shot", "embed_attack", "benign",
]  # fmt: skip


# ---- a new measurement: this block is everything it takes ----------------------------------
class ToyOptions(BaseModel):
    model_config = STRICT_CONFIG
    scale: float = Field(1.0, gt=0)


def register_toy() -> None:
    @MEASUREMENTS.register(
        "toy",
        config=ToyOptions,
        columns=[Column("toy.forget_facts", "toy: forget facts x scale", None, "side_effect")],
    )
    def toy(ctx: BatteryContext, options: ToyOptions, name: str) -> BatteryResult:
        return BatteryResult(metrics={f"{name}.forget_facts": options.scale * len(ctx.sets.forget)})


# ---------------------------------------------------------------------------------------------


@pytest.fixture
def toy(monkeypatch):
    """The toy measurement registered for one test (the registry restored afterwards)."""
    monkeypatch.setattr(MEASUREMENTS, "_entries", dict(MEASUREMENTS._entries))
    register_toy()


def test_builtin_measurements_in_run_order():
    assert [m.name for m in MEASUREMENTS.ordered("edit")] == EDIT
    assert [m.name for m in MEASUREMENTS.ordered("lat")] == LAT
    parts = {m.name: m.part for m in MEASUREMENTS.ordered("edit")}
    assert parts["counterfact"] == parts["probes"] == "formats"  # one part, as before
    attacks = {m.name for m in MEASUREMENTS.ordered("edit") if not m.on_base}
    assert attacks == {"relearn", "soft_prompt"}


def test_every_measurement_is_well_formed():
    for m in MEASUREMENTS.ordered():
        assert issubclass(m.config, BaseModel), m.name
        assert m.config.model_config.get("extra") == "forbid", m.name  # typos are errors
        for column in m.columns:
            assert column.section in SECTIONS
            assert column.runs, (m.name, column.key)
    for dedicated, pipeline in ((edit_config.DEDICATED, "edit"), (lat_config.DEDICATED, "lat")):
        for name in dedicated:
            assert MEASUREMENTS.get(name).pipeline == pipeline


def test_battery_parts_keep_their_names():
    config = ExperimentConfig.model_validate(
        {"evaluation": {"relocalize": {}, "relearn_variants": {"paper": {}, "a": {}}}}
    )
    assert battery_parts(config) == [
        "formats", "relocalize", "relearn", "relearn@paper", "relearn@a", "soft_prompt",
    ]  # fmt: skip
    assert battery_parts(config, attacks=False) == ["formats", "relocalize"]
    off = ExperimentConfig.model_validate({"evaluation": {"relearn": None, "soft_prompt": None}})
    assert battery_parts(off) == ["formats"]
    merged = merge_batteries(
        {p: BatteryResult(notes=[p]) for p in reversed(battery_parts(config))}
    )  # variants right after relearn, by name
    assert merged.notes == [
        "formats", "relocalize", "relearn", "relearn@a", "relearn@paper", "soft_prompt",
    ]  # fmt: skip


def test_lat_plans_follow_the_application():
    for application, expected in (
        ("refusal", ["refusal", "latent_attack", "prefill", "embed_attack", "benign"]),
        ("backdoor", ["backdoor", "latent_attack", "embed_attack", "benign"]),
    ):
        config = LatExperimentConfig.model_validate({"kind": "lat", "application": application})
        chosen = plan(config.evaluation.measurement_options(application), "lat")
        assert [p.name for p in chosen] == expected


def test_column_order_sections_then_registration():
    keys = {"relearn@paper.completion.accuracy", "relearn.completion.accuracy", "lm_loss_delta"}
    columns = table_columns(MEASUREMENTS.columns(), "edit", keys)
    names = [key for key, _, _ in columns]
    assert (
        names.index("forget.completion.edit_success")
        < names.index("relearn@paper.completion.accuracy")
        < names.index("relearn.completion.accuracy")
        < names.index("soft_prompt.accuracy_after")
    )
    assert names.index("probe.forget_accuracy") < names.index("retain.completion.accuracy")
    assert "forget.completion.original_accuracy" not in names  # an unlearning column
    titles = dict((k, t) for k, t, _ in columns)
    assert titles["relearn@paper.completion.accuracy"] == (
        "after relearning (relearn@paper): completion acc (held-out)"
    )
    assert "benign.compliance" not in names  # a LAT column


@pytest.mark.parametrize(
    ("measurements", "message"),
    [
        ({"nope": {}}, "unknown measurement 'nope'; known: "),
        ({"toy": {"scale": 0}}, "measurement 'toy': scale: Input should be greater than 0"),
        ({"toy": {"scael": 2}}, "measurement 'toy': scael: Extra inputs are not permitted"),
        ({"toy@": {}}, "measurement 'toy@': the instance name"),
        ({"relearn@big": {}}, "is configured by evaluation.relearn"),
        ({"benign": {}}, "measurement 'benign' is measured in lat experiments, not edit"),
    ],
)
def test_bad_measurements_are_config_errors(toy, measurements, message):
    data = {"evaluation": {"measurements": measurements}}
    with pytest.raises(ConfigError) as info:
        validate_config(ExperimentConfig, data, "test.yaml")
    assert "evaluation.measurements" in str(info.value)
    assert message in str(info.value)


def test_bad_lat_measurement_is_a_config_error():
    data = {"kind": "lat", "application": "refusal", "evaluation": {"measurements": {"probes": {}}}}
    with pytest.raises(ConfigError, match="measured in edit experiments, not lat"):
        validate_config(LatExperimentConfig, data, "test.yaml")


def test_new_measurement_reaches_parts_results_and_report(toy, saved_llama, tmp_path, monkeypatch):
    """Registered in this file only: configured, run as its own battery part, merged into the
    results after the built-in parts, and a headline column of the report."""
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    evaluation = {
        "formats": ["completion"], "batch_size": 8, "lm_texts": 4, "probes": False,
        "relearn": None, "soft_prompt": None, "measurements": {"toy": {"scale": 2}, "toy@b": None},
    }  # fmt: skip
    config = tiny_config(
        saved_llama,
        localizations=[{"name": "random", "method": "random"}],
        evaluation=evaluation,
        seeds=[0],
    )
    assert battery_parts(config) == ["formats", "toy", "toy@b"]
    out = tmp_path / "run"
    run_experiment(config, out, progress=False)
    for name in ("base", "random"):
        metrics = json.loads((out / "results" / name / "seed0.json").read_text())["metrics"]
        assert metrics["toy.forget_facts"] == 2 * 6  # n_forget facts, scale 2
        assert metrics["toy@b.forget_facts"] == 6
        assert list(metrics)[-2:] == ["toy.forget_facts", "toy@b.forget_facts"]
    headline = (out / "results.md").read_text().split("\n\n")[2]
    assert "toy: forget facts x scale |" in headline.splitlines()[0]
