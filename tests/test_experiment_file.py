"""One experiment schema (``kind`` discriminator) and the shared run folder for tree training."""

from __future__ import annotations

import json
import re
from pathlib import Path

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
    def tracing(config: ExperimentConfig) -> str:
        return config.method_options["causal_tracing"]["trace_cells"]

    assert tracing(ExperimentConfig()) == "scored"
    given = ExperimentConfig.model_validate({"method_options": {"causal_tracing": {"window": 3}}})
    assert tracing(given) == "scored" and given.method_options["causal_tracing"]["window"] == 3
    full = ExperimentConfig.model_validate(
        {"method_options": {"causal_tracing": {"trace_cells": "all"}}}
    )
    assert tracing(full) == "all"
    from mechunlearn.localize.causal_tracing import CausalTracingOptions

    assert CausalTracingOptions().trace_cells == "all"  # `mechunlearn localize` draws every heatmap


def test_method_options_are_validated_by_each_methods_schema():
    with pytest.raises(ConfigError, match="causal_tracing options: probe_split"):
        validate_experiment({"method_options": {"causal_tracing": {"probe_split": 0.5}}}, "t")
    with pytest.raises(ConfigError, match="unknown localization method 'tracing'"):
        validate_experiment({"method_options": {"tracing": {}}}, "t")
    with pytest.raises(ConfigError, match="noise_scale"):
        validate_experiment({"method_options": {"causal_tracing": {"noise_scale": -1}}}, "t")


def test_configs_with_one_options_bag_still_load_and_mean_the_same():
    """Before methods had their own schemas, every knob sat in ``localize_options`` (committed
    runs' config.yaml): those keys move to the methods that define them."""
    legacy = {
        "localize_options": {
            "seed": 2, "noise_scale": 2.0, "window": 5, "trace_cells": "all", "probe_split": 0.4,
        },
        "method_options": {"causal_tracing": {"window": 7}},  # an explicit value wins
    }  # fmt: skip
    config = validate_experiment(legacy, "t")
    assert config.localize_options.seed == 2
    assert config.method_options["causal_tracing"] == {
        "noise_scale": 2.0, "window": 7, "trace_cells": "all",
    }  # fmt: skip
    assert config.method_options["fact_lookup"] == {"probe_split": 0.4}
    with pytest.raises(ConfigError, match="noise_scal"):
        validate_experiment({"localize_options": {"noise_scal": 2.0}}, "t")
    committed = Path(__file__).parents[1] / "docs/results/athlete-edit-64/config.yaml"
    loaded = validate_experiment(yaml.safe_load(committed.read_text()), str(committed))
    assert loaded.method_options["causal_tracing"]["trace_cells"] == "scored"


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
    with pytest.raises(ConfigError, match=r"train\.(optim\.)?lr.*finite number"):
        validate_experiment({"train": {"lr": value}}, "t")
    with pytest.raises(ConfigError, match=r"finite number"):
        validate_experiment({"kind": "tree", "train": {"lr": value}}, "t")


def test_set_overrides_keep_yaml_types_index_lists_and_are_validated():
    from mechunlearn.experiments.config import apply_overrides

    data = {"train": {"steps": 20}, "localizations": [{"name": "a", "method": "last_layer"}]}
    out = apply_overrides(
        data,
        ["train.steps=40", "train.lr=1e-3", "seeds=[0, 1]", "localizations.0.train={steps: 60}",
         "sweep.lr=[1.0e-4]"],
    )  # fmt: skip
    assert out["train"] == {"steps": 40, "lr": 1e-3} and out["seeds"] == [0, 1]
    assert out["localizations"][0]["train"] == {"steps": 60} and out["sweep"] == {"lr": [1e-4]}
    assert data["train"] == {"steps": 20}  # the input is not changed
    for bad, message in (
        ("train.steps", "expected key.path=value"),
        ("localizations.5.name=x", "not an index of a 1-item list"),
        ("train.steps.x=1", "inside a single value"),
        ("train.steps=[1", "not valid YAML"),
    ):
        with pytest.raises(ConfigError, match=re.escape(message)):
            apply_overrides(data, [bad])
    with pytest.raises(ConfigError, match="train.stepz: Extra inputs"):
        validate_experiment(apply_overrides({}, ["train.stepz=3"]), "t")


def test_cli_set_and_full(tmp_path, monkeypatch):
    """--set reaches the validated config (a wrong key fails before anything runs) and --full
    wins over --seeds, as the quickstart's `--seeds 1 ... --full` needs."""
    from mechunlearn.cli import experiments as cli_experiments

    seen = {}

    def fake_run(cfg, out, **kwargs):
        seen["cfg"] = cfg
        (tmp_path / "done").mkdir(exist_ok=True)
        (tmp_path / "done" / "results.md").write_text("ok")
        return tmp_path / "done"

    monkeypatch.setattr("mechunlearn.experiments.edit_job.run_experiment", fake_run)
    runner = CliRunner()
    args = ["run", "sports-athlete-edit-16", "--out", str(tmp_path / "r"), "--quiet",
            "--workers", "1"]  # fmt: skip
    result = runner.invoke(app, [*args, "--seeds", "1", "--full", "--set", "train.steps=7"])
    assert result.exit_code == 0, result.output
    assert seen["cfg"].train.steps == 7 and len(seen["cfg"].seeds) == 3
    result = runner.invoke(app, [*args, "--set", "train.stepz=7"])
    assert result.exit_code == 2 and "train.stepz: Extra inputs" in result.output
    assert cli_experiments is not None
