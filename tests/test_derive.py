"""Derived models (models.derived, experiments.derive_job): built by recipe, loaded by name."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest
from typer.testing import CliRunner

from mechunlearn.cli import app
from mechunlearn.errors import ConfigError, DataError, ModelNotFoundError
from mechunlearn.experiments.derive_job import (
    FormatTuneRecipe,
    derive_model,
    mcq_capable,
    mcq_pairs,
    training_athletes,
)
from mechunlearn.models.derived import derived_built
from mechunlearn.models.loading import load_model
from mechunlearn.tasks.sports import load_sports, make_record

SPORTS = ("baseball", "basketball", "football")


def _athletes_csv(path, n: int, shipped: int = 3):
    rows = [(r.subject, r.answer) for r in load_sports()[:shipped]]  # must be left out
    rows += [(f"Format Tuner {i}", SPORTS[i % 3]) for i in range(n)]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["athlete", "sport"])
        writer.writerows(rows)
    return path


def test_mcq_pairs_put_every_letter_equally_often_on_the_answer():
    records = [make_record(f"A{i}", SPORTS[i % 3]) for i in range(4)]
    pairs = mcq_pairs(records)
    assert len(pairs) == 4 * 6
    assert Counter(target for _, target in pairs) == {" A": 8, " B": 8, " C": 8}
    assert all(prompt.endswith("Answer:") for prompt, _ in pairs)


def test_training_athletes_exclude_the_shipped_set(tmp_path):
    records = load_sports(_athletes_csv(tmp_path / "a.csv", 5))
    kept = training_athletes(records)
    assert [r.subject for r in kept] == [f"Format Tuner {i}" for i in range(5)]
    with pytest.raises(DataError, match="every athlete of the data file is in the shipped"):
        training_athletes(load_sports()[:4])


def test_mcq_capable_needs_a_margin_over_chance_and_to_match_completion():
    ok = {
        "mcq_accuracy": 0.7,
        "mcq_accuracy_sem": 0.02,
        "chance": 1 / 3,
        "completion_accuracy": 0.75,
    }
    assert mcq_capable(ok)
    assert not mcq_capable(ok | {"mcq_accuracy": 0.5})  # not 25 points above chance
    assert not mcq_capable(ok | {"completion_accuracy": 0.9})  # far below its own completion


def test_derive_builds_loads_by_name_and_records_its_recipe(saved_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelNotFoundError, match="mechunlearn derive gemma3-270m-mcq"):
        load_model("gemma3-270m-mcq")
    data = _athletes_csv(tmp_path / "athletes.csv", 12)
    recipe = FormatTuneRecipe(
        base=str(saved_llama), n_athletes=8, known_threshold=0.0, steps=2, batch_size=4,
        retain_batch_size=2, n_validation=6, lora_rank=2,
    )  # fmt: skip
    out = derive_model("gemma3-270m-mcq", data, recipe=recipe, progress=False)
    assert derived_built("gemma3-270m-mcq")
    saved = json.loads((out / "recipe.json").read_text())
    assert saved["recipe"]["steps"] == 2 and len(saved["data"]["sha256"]) == 64
    shipped = {r.subject for r in load_sports()}
    assert len(saved["training_athletes"]) == 8 and not shipped & set(saved["training_athletes"])
    assert set(saved["validation_athletes"]) <= shipped and len(saved["validation_athletes"]) == 6
    after = saved["validation_after"]
    assert sum(after["letter_share"].values()) == pytest.approx(1.0)
    assert set(after["accuracy_by_correct_letter"]) == {"A", "B", "C"}
    assert isinstance(saved["mcq_capable"], bool)
    hm = load_model("gemma3-270m-mcq")
    assert hm.dims.n_layers == load_model(str(saved_llama)).dims.n_layers
    with pytest.raises(DataError, match="known by"):
        derive_model("gemma3-270m-mcq", data, recipe=recipe.model_copy(update={"n_athletes": 50}))
    with pytest.raises(ConfigError, match="unknown derived model"):
        derive_model("gemma3-270m-letters", data)


def test_derive_cli_rejects_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["derive", "nope", "--data", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "unknown derived model 'nope'" in result.output
    result = runner.invoke(app, ["derive", "gemma3-270m-mcq", "--data", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "not found" in result.output
