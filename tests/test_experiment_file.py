"""One experiment schema (``kind`` discriminator) and the shared run folder for tree training."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from mechunlearn.cli import app
from mechunlearn.errors import ConfigError
from mechunlearn.experiments.edit_config import ExperimentConfig, shipped_configs
from mechunlearn.experiments.experiment_file import load_experiment, validate_experiment
from mechunlearn.experiments.lat_config import LatExperimentConfig
from mechunlearn.experiments.tree_job import TreeExperimentConfig
from tests.test_tree_train import tiny_config


def test_every_shipped_config_validates_as_its_kind():
    classes = {"edit": ExperimentConfig, "lat": LatExperimentConfig}
    for name, path in shipped_configs().items():
        kind = (yaml.safe_load(open(path).read()) or {}).get("kind", "edit")
        assert isinstance(load_experiment(path), classes[kind]), name


def test_kind_selects_the_schema_and_errors_name_fields():
    assert isinstance(validate_experiment({}, "t"), ExperimentConfig)  # no kind: editing
    with pytest.raises(ConfigError, match="kind 'train' is not one of edit, lat, tree"):
        validate_experiment({"kind": "train"}, "t")
    with pytest.raises(ConfigError, match="application: Field required"):
        validate_experiment({"kind": "lat"}, "t")
    # a LAT key in an editing config is an error of the editing schema, not silently ignored
    with pytest.raises(ConfigError, match="methods: Extra inputs"):
        validate_experiment({"kind": "edit", "methods": []}, "t")


def test_tree_training_runs_in_the_shared_run_folder(tmp_path):
    recipe = {
        "kind": "tree",
        "name": "tiny",
        "train": tiny_config(steps=20).model_dump(mode="json"),
    }
    path = tmp_path / "tree.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "run"
    cli = CliRunner()
    # stopped early, the run stays partial; --resume finishes it and moves it into place
    from mechunlearn.experiments.tree_job import run_tree_experiment

    config = load_experiment(path)
    assert isinstance(config, TreeExperimentConfig)
    partial = run_tree_experiment(config, out, progress=False, until=10)
    assert partial.name == "run.partial" and not out.exists()
    result = cli.invoke(app, ["run", str(path), "--out", str(out), "--resume", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (out / "model").is_dir() and not partial.exists()
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "tree" and run["steps"] == 20
    # another recipe cannot resume this folder
    other = dict(recipe, train=tiny_config(steps=30).model_dump(mode="json"))
    path.write_text(yaml.safe_dump(other))
    result = cli.invoke(app, ["run", str(path), "--out", str(out), "--resume", "--quiet"])
    assert result.exit_code != 0 and "another config" in result.output
    result = cli.invoke(app, ["run", str(path), "--out", str(out), "--workers", "2"])
    assert result.exit_code != 0 and "not used by tree-training experiments" in result.output


def test_experiments_trace_only_scored_cells_unless_asked():
    assert ExperimentConfig().localize_options.trace_cells == "scored"
    given = ExperimentConfig.model_validate({"localize_options": {"seed": 3}})
    assert (given.localize_options.trace_cells, given.localize_options.seed) == ("scored", 3)
    full = ExperimentConfig.model_validate({"localize_options": {"trace_cells": "all"}})
    assert full.localize_options.trace_cells == "all"
    from mechunlearn.localize import LocalizeOptions

    assert LocalizeOptions().trace_cells == "all"  # `mechunlearn localize` draws every heatmap


def test_a_row_train_block_replaces_fields_and_errors_name_the_row():
    def config(train):
        return {
            "localizations": [{"name": "shallow", "method": "last_layer", "train": train}],
            "sweep": None,
            "hyperparameters": {"shallow": {"lr": 1e-3, "forget_coef": 1.0}},
        }

    row = validate_experiment(config({"steps": 60, "max_grad_norm": 5.0}), "t")
    assert row.row_train("shallow").steps == 60
    assert row.row_train("shallow").optim.max_grad_norm == 5.0
    assert row.train.steps != 60  # the experiment's own block is untouched
    with pytest.raises(ConfigError, match=r"localizations\.0\.train.*unknown train field"):
        validate_experiment(config({"stepz": 60}), "t")
    with pytest.raises(ConfigError, match=r"\['lr'\] cannot be set per row"):
        validate_experiment(config({"lr": 1.0}), "t")


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_a_non_finite_number_is_refused_where_the_file_is_read(value):
    with pytest.raises(ConfigError, match=r"train\.lr.*finite number"):
        validate_experiment({"train": {"lr": value}}, "t")
    with pytest.raises(ConfigError, match=r"finite number"):
        validate_experiment({"kind": "tree", "train": {"lr": value}}, "t")
