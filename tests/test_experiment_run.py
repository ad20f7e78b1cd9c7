"""``mechunlearn run`` end to end on a tiny checkpoint: files, resume, report, bad input."""

from __future__ import annotations

import json
import statistics

import pytest
import yaml
from typer.testing import CliRunner

from mechunlearn.cli import app
from mechunlearn.experiments import edit_job
from mechunlearn.experiments.battery import battery_parts
from mechunlearn.experiments.config import validate_config
from mechunlearn.experiments.edit_config import ExperimentConfig
from mechunlearn.experiments.edit_job import run_experiment

MLP_PARAMS = 3 * 64 * 128  # one tiny-llama MLP


def tiny_config(model_dir, **overrides) -> ExperimentConfig:
    data = {
        "name": "tiny",
        "model": str(model_dir),
        "task": "sports",
        "mode": "edit",
        "facts": {
            "known_only": False,
            "n_forget": 6,
            "n_validation": 4,
            "n_validation_retain": 6,
            "n_retain_train": 8,
            "n_retain_eval": 6,
            "n_localize": 8,
        },
        "localize_options": {"budget": MLP_PARAMS, "batch_size": 8},
        "localizations": [
            {"name": "random", "method": "random"},
            {"name": "ct_mlps", "method": "causal_tracing", "restrict_to": "mlp"},
            {"name": "all_mlps_lora", "method": "all_mlps", "trainer": "lora"},
        ],
        "train": {"steps": 2, "batch_size": 4, "retain_batch_size": 4, "lm_batch_size": 2},
        "sweep": {"lr": [1e-3], "forget_coef": [1.0]},
        "evaluation": {
            "formats": ["completion", "mcq"],
            "batch_size": 8,
            "lm_texts": 4,
            "relearn": {"steps": 2, "eval_every": 1, "batch_size": 2},
            "soft_prompt": {"steps": 2, "batch_size": 4},
        },
        "seeds": [0, 1],
    }
    for key, value in overrides.items():
        data[key] = value
    return validate_config(ExperimentConfig, data, "test")


def test_run_writes_a_complete_report(saved_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    run_experiment(tiny_config(saved_llama), out, progress=False)
    assert not (tmp_path / "run.partial").exists()
    for name in ("base", "random", "ct_mlps", "all_mlps_lora"):
        for seed in (0, 1):
            result = json.loads((out / "results" / name / f"seed{seed}.json").read_text())
            assert "forget.completion.edit_success" in result["metrics"]
            assert "retain.mcq.accuracy" in result["metrics"]
    edited = json.loads((out / "results" / "random" / "seed0.json").read_text())
    assert "relearn.completion.accuracy" in edited["metrics"]
    assert "soft_prompt.accuracy_after" in edited["metrics"]
    assert "probe.forget_accuracy" in edited["metrics"]
    curve = edited["curves"]["relearn"]["curve"]
    assert [p["step"] for p in curve] == [0, 1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["order"] == ["base", "random", "ct_mlps", "all_mlps_lora"]
    page = (out / "report.html").read_text()
    assert "<table>" in page and page.count('src="data:image/png;base64,') >= 2
    assert summary["summary"]["random"]["lm_loss_delta"]["n"] == 2
    assert summary["summary"]["random"]["train_seconds"]["mean"] > 0
    peaks = [
        max(
            p["completion.accuracy"]
            for p in json.loads((out / "results" / "random" / f"seed{s}.json").read_text())[
                "curves"
            ]["relearn"]["curve"]
        )
        for s in (0, 1)
    ]
    peak = summary["summary"]["random"]["relearn_peak.completion.accuracy"]
    assert peak["mean"] == pytest.approx(sum(peaks) / 2)
    ct = json.loads((out / "localizations" / "ct_mlps.json").read_text())
    assert all(c.endswith(".mlp") for c in ct["selected"])
    sweep = json.loads((out / "sweep" / "random.json").read_text())
    assert sweep["chosen"] == {"lr": 1e-3, "forget_coef": 1.0}
    for figure in ("metrics.png", "relearning.png", "probes.png"):
        assert (out / "figures" / figure).stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert "| random |" in table and "edit success: completion ↑" in table
    every_metric = table.split("## Every metric")[1]
    # raw metrics have no desired direction: no arrows there (P(original) must not read "higher is better")
    assert "↑" not in every_metric and "↓" not in every_metric
    # seeds 0 and 1 edit different facts
    f0 = json.loads((out / "facts" / "seed0.json").read_text())["forget"]
    f1 = json.loads((out / "facts" / "seed1.json").read_text())["forget"]
    assert f0 != f1
    # the report command re-renders from saved results
    (out / "results.md").unlink()
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "results.md").is_file()


def test_weights_are_restored_between_runs(saved_llama, tmp_path, monkeypatch):
    """Every (localization, seed) starts from the original model."""
    from mechunlearn.models.loading import load_model

    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    reference = {k: v.clone() for k, v in load_model(str(saved_llama)).model.state_dict().items()}
    seen = []
    original = edit_job.run_battery

    def plain_state(model):
        """State without LoRA tensors, base-layer names mapped back to the plain names."""
        return {
            k.replace(".base_layer", ""): v
            for k, v in model.state_dict().items()
            if "lora_" not in k
        }

    def spy(hm, *args, **kwargs):
        if kwargs.get("attacks"):
            state = plain_state(hm.model)
            seen.append(sum(not state[k].equal(reference[k]) for k in reference))
        return original(hm, *args, **kwargs)

    real_train = edit_job.train

    def check_start(hm, *args, **kwargs):
        state = plain_state(hm.model)
        assert all(state[k].equal(reference[k]) for k in reference), (
            "training started from edited weights"
        )
        return real_train(hm, *args, **kwargs)

    monkeypatch.setattr(edit_job, "run_battery", spy)
    monkeypatch.setattr(edit_job, "train", check_start)
    cfg = tiny_config(saved_llama, seeds=[0])
    run_experiment(cfg, tmp_path / "run", progress=False)
    # every part of every battery (each its own unit) saw edited weights
    assert len(seen) == 3 * len(battery_parts(cfg)) and all(n > 0 for n in seen)


def test_interrupted_run_resumes_without_redoing_finished_work(saved_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config(saved_llama, seeds=[0])
    calls = []
    original = edit_job._edit

    def crash_on_second(ctx, spec, *args, **kwargs):
        calls.append(spec.name)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return original(ctx, spec, *args, **kwargs)

    monkeypatch.setattr(edit_job, "_edit", crash_on_second)
    with pytest.raises(RuntimeError, match="power cut"):
        run_experiment(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    partial = tmp_path / "run.partial"
    assert (partial / "units" / "edit" / "random" / "seed0.json").is_file()
    assert (partial / "units" / "weights" / "random" / "seed0.safetensors").is_file()
    first_part_seconds = json.loads((partial / "time.json").read_text())["seconds"]
    assert first_part_seconds > 0
    calls.clear()
    monkeypatch.setattr(
        edit_job,
        "_edit",
        lambda ctx, spec, *a, **k: (calls.append(spec.name), original(ctx, spec, *a, **k))[1],
    )
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "empty-cache"))  # a new machine

    def no_recompute(*args, **kwargs):
        raise AssertionError("a resumed run must reuse its own localizations")

    monkeypatch.setattr(edit_job, "run_cached", no_recompute)
    run_experiment(cfg, tmp_path / "run", resume=True, progress=False)
    assert calls == ["ct_mlps", "all_mlps_lora"]
    assert (tmp_path / "run" / "results.md").is_file() and not partial.exists()
    assert not (tmp_path / "run" / "units" / "weights").exists()  # no edited weights left
    # the reported wall time is the sum of both parts, not only the resumed one
    total = json.loads((tmp_path / "run" / "run.json").read_text())["seconds"]
    assert total == json.loads((tmp_path / "run" / "time.json").read_text())["seconds"]
    assert total > first_part_seconds


def test_bad_inputs_fail_before_writing(saved_llama, tmp_path, monkeypatch):
    from mechunlearn.localize import Localization

    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    other = Localization(
        method="fact_lookup",
        model="gemma3-270m",
        model_type="gemma3_text",
        n_layers=18,
        scores={},
        selected=["blocks.0.mlp"],
        n_params=1,
    )
    other.save(tmp_path / "other.json")
    config_path = tmp_path / "config.yaml"
    runner = CliRunner()
    bad = {
        "localization from another model": (
            {
                "localizations": [
                    {
                        "name": "flu",
                        "method": "fact_lookup",
                        "from_file": str(tmp_path / "other.json"),
                    }
                ]
            },
            "computed on gemma3-270m",
        ),
        "empty forget group": (
            {"facts": {"known_only": False, "forget_group": "golf"}},
            "no known fact has the answer 'golf'",
        ),
        "unknown key": (
            {"evaluation": {"formats": ["completion"], "relearn_steps": 3}},
            "relearn_steps",
        ),
    }
    base = tiny_config(saved_llama).model_dump(mode="json")
    for case, (override, message) in bad.items():
        config_path.write_text(yaml.safe_dump(base | override))
        result = runner.invoke(
            app, ["run", str(config_path), "--out", str(tmp_path / "out"), "--quiet"]
        )
        assert result.exit_code == 2, (case, result.output)
        assert message in " ".join(result.output.split()), (case, result.output)
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists(), case


def test_cli_run_with_seed_limit(saved_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    config = tiny_config(saved_llama).model_dump(mode="json")
    config["localizations"] = [{"name": "all_mlps", "method": "all_mlps"}]
    config["evaluation"]["relearn"] = None
    config["evaluation"]["soft_prompt"] = None
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["run", str(path), "--out", str(out), "--seeds", "1", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "| all_mlps |" in result.output
    assert sorted(p.name for p in (out / "results" / "all_mlps").iterdir()) == ["seed0.json"]
    assert yaml.safe_load((out / "config.yaml").read_text())["seeds"] == [0]


def test_resume_extends_a_finished_run_to_more_seeds(saved_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    config = tiny_config(saved_llama).model_dump(mode="json")
    config["localizations"] = [{"name": "all_mlps", "method": "all_mlps"}]
    config["evaluation"]["relearn"] = None
    config["evaluation"]["soft_prompt"] = None
    one = validate_config(ExperimentConfig, config | {"seeds": [0]}, "t")
    two = validate_config(ExperimentConfig, config | {"seeds": [0, 1]}, "t")
    out = tmp_path / "run"
    run_experiment(one, out, progress=False)
    first = (out / "results" / "all_mlps" / "seed0.json").read_text()
    calls = []
    original = edit_job._edit
    monkeypatch.setattr(
        edit_job,
        "_edit",
        lambda ctx, spec, *a, **k: (calls.append(a[3]), original(ctx, spec, *a, **k))[1],
    )
    run_experiment(two, out, resume=True, progress=False)
    assert calls == [1]  # only the new seed ran
    assert (out / "results" / "all_mlps" / "seed0.json").read_text() == first
    summary = json.loads((out / "summary.json").read_text())["summary"]
    assert summary["all_mlps"]["lm_loss_delta"]["n"] == 2
    other = validate_config(ExperimentConfig, config | {"name": "different"}, "t")
    with pytest.raises(Exception, match="another config"):
        run_experiment(other, out, resume=True, progress=False)
    assert (out / "results.md").is_file()  # a refused resume leaves the finished run in place


def test_counterfact_side_effect_is_measured(saved_llama, tmp_path, monkeypatch, shared_data):
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    config = tiny_config(saved_llama).model_dump(mode="json")
    config["localizations"] = [{"name": "all_mlps", "method": "all_mlps"}]
    config["evaluation"]["relearn"] = None
    config["evaluation"]["soft_prompt"] = None
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    cf = str(shared_data / "counterfact_subset.json")
    out = tmp_path / "out"
    args = ["run", str(path), "--out", str(out), "--seeds", "1", "--counterfact", cf, "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for name in ("base", "all_mlps"):
        metrics = json.loads((out / "results" / name / "seed0.json").read_text())["metrics"]
        assert 0.0 <= metrics["side_effects.counterfact_neighborhood"] <= 1.0


def test_fixed_target_joins_options_but_not_knowledge_or_localization(
    saved_llama, tmp_path, monkeypatch
):
    """Editing to golf: golf is an option of every evaluated fact (and the one-shot example is
    then not golf), while localization sees the facts among their own options."""
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    seen = {}
    real_facts = edit_job.localization_facts

    def spy_facts(hm, known, *args):
        seen["localized"] = {tuple(r.options) for r in known}
        return real_facts(hm, known, *args)

    real_battery = edit_job.run_battery

    def spy_battery(hm, sets, *args, **kwargs):
        seen.setdefault("evaluated", set()).update(tuple(r.options) for r in sets.forget)
        return real_battery(hm, sets, *args, **kwargs)

    monkeypatch.setattr(edit_job, "localization_facts", spy_facts)
    monkeypatch.setattr(edit_job, "run_battery", spy_battery)
    config = tiny_config(saved_llama, seeds=[0]).model_dump(mode="json")
    config |= {"target": {"kind": "fixed", "value": "golf"}}
    config["localizations"] = [{"name": "all_mlps", "method": "all_mlps"}]
    config["evaluation"] |= {"relearn": None, "soft_prompt": None}
    run_experiment(validate_config(ExperimentConfig, config, "t"), tmp_path / "run", progress=False)
    assert seen["localized"] == {("baseball", "basketball", "football")}
    assert seen["evaluated"] == {("baseball", "basketball", "football", "golf")}
    result = json.loads((tmp_path / "run" / "results" / "all_mlps" / "seed0.json").read_text())
    assert "forget.completion.edit_success" in result["metrics"]


def test_unlearning_rows_with_their_own_objective_and_lat(saved_llama, tmp_path, monkeypatch):
    from mechunlearn.edit.lat import ForgetLat

    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    adversary = {"layers": [1], "epsilon": 0.5, "steps": 2}
    config = tiny_config(
        saved_llama,
        mode="unlearn",
        train={"objective": "unlearn", "steps": 2, "batch_size": 4, "retain_batch_size": 4},
        localizations=[
            {"name": "GA", "method": "all_mlps", "objective": "gradient_ascent"},
            {
                "name": "GA_LAT",
                "method": "all_mlps",
                "objective": "gradient_ascent",
                "latent_adversary": adversary,
            },
        ],  # fmt: skip
        seeds=[0],
    )
    perturbed = []
    original = ForgetLat.perturb
    monkeypatch.setattr(
        ForgetLat,
        "perturb",
        lambda self, *a, **k: (perturbed.append(1), original(self, *a, **k))[1],
    )
    out = tmp_path / "run"
    run_experiment(config, out, progress=False)
    # 1 sweep point + 1 seed, 2 steps each, only for the LAT row
    assert len(perturbed) == 4
    results = {
        name: json.loads((out / "results" / name / "seed0.json").read_text())
        for name in ("GA", "GA_LAT")
    }
    assert results["GA"]["objective"] == results["GA_LAT"]["objective"] == "gradient_ascent"
    assert not results["GA"]["latent_adversary"] and results["GA_LAT"]["latent_adversary"]
    assert "adv_loss_last" in results["GA_LAT"]["train"]["final"]
    report = (out / "results.md").read_text()
    assert "| GA_LAT |" in report
    # the LAT row's training time is compared with the same row trained without the adversary
    assert "## Training compute of the LAT rows" in report
    assert "| GA_LAT | GA |" in report
    # ... with the adversary's record: whether it lowered its own objective while training
    adversary = results["GA_LAT"]["train"]["adversary"]
    assert set(adversary) == {"loss_first_mean", "loss_last_mean", "improved_share"}
    assert results["GA"]["train"]["adversary"] is None
    assert "steps it lowered its loss" in report


def test_whole_group_edit_probes_with_validation_facts_of_the_group(
    saved_llama, tmp_path, monkeypatch
):
    """Editing every basketball player: no retain fact answers basketball, so the probe learns
    that class from the validation players (never a seed's forget or retain fact)."""
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    config = tiny_config(saved_llama, seeds=[0]).model_dump(mode="json")
    config |= {"target": {"kind": "fixed", "value": "golf"}}
    config["facts"] |= {"n_forget": None, "forget_group": "basketball", "max_forget": 6}
    config["localizations"] = [{"name": "all_mlps", "method": "all_mlps"}]
    config["evaluation"] |= {"relearn": None, "soft_prompt": None}
    out = tmp_path / "run"
    run_experiment(validate_config(ExperimentConfig, config, "t"), out, progress=False)
    facts = json.loads((out / "facts" / "seed0.json").read_text())
    validation = json.loads((out / "run.json").read_text())["validation"]
    for name in ("base", "all_mlps"):
        result = json.loads((out / "results" / name / "seed0.json").read_text())
        assert 0 <= result["metrics"]["probe.forget_accuracy"] <= 1
        assert any("4 validation facts answering basketball" in n for n in result["notes"])
        assert "basketball" in result["curves"]["probes"]["classes"]
    assert not set(validation["forget"]) & set(facts["forget"])


def test_progress_counts_units_and_estimates_the_time_left():
    from mechunlearn.experiments.workers import Progress, Unit

    units = [Unit(f"edit/{i}", "edit", f"{i}.json") for i in range(4)]
    units.append(Unit("sweep/0", "sweep", "s.json"))
    lines = []
    progress = Progress(units, workers=2, log=lines.append)
    assert progress.describe() == "units: 0 done, 0 running, 5 left"
    for unit in units[:2]:
        progress.start(unit)
        progress.finish(unit, 600.0)
    # two edits left at 10 min each, the sweep at the mean of the known kinds, on 2 workers
    assert progress.eta_seconds() == 3 * 600.0 / 2
    assert lines[-1] == "edit/1 done in 600s; units: 2 done, 0 running, 3 left; ETA 15 min"


def test_battery_parts_merge_in_report_order_whatever_order_they_ran():
    from mechunlearn.errors import DataError
    from mechunlearn.experiments.battery import BatteryResult, merge_batteries

    soft = BatteryResult({"soft_prompt.accuracy_after": 0.5}, {"soft_prompt": {}}, ["s"])
    formats = BatteryResult({"forget.completion.p_original": 0.1, "lm_loss": 3.0}, {}, ["f"])
    relearn = BatteryResult({"relearn.completion.accuracy": 0.2}, {"relearn": {}}, [])
    strong = BatteryResult(
        {"relearn@strong.completion.accuracy": 0.9},
        {"relearn@strong": {}},
        [],
        {"relearn@strong.completion.accuracy": {"a": 1.0, "b": 0.0}},
    )
    merged = merge_batteries(
        {"soft_prompt": soft, "relearn@strong": strong, "relearn": relearn, "formats": formats}
    )
    assert list(merged.metrics) == [
        "forget.completion.p_original",
        "lm_loss",
        "relearn.completion.accuracy",
        "relearn@strong.completion.accuracy",
        "soft_prompt.accuracy_after",
    ]
    assert merged.notes == ["f", "s"]
    assert list(merged.curves) == ["relearn", "relearn@strong", "soft_prompt"]
    assert merged.per_fact == {"relearn@strong.completion.accuracy": {"a": 1.0, "b": 0.0}}
    assert BatteryResult.from_json(merged.to_json()) == merged
    with pytest.raises(DataError, match="unknown battery part 'probes'"):
        merge_batteries({"probes": formats})


def test_per_fact_results_relearn_variants_and_claims(saved_llama, tmp_path, monkeypatch):
    """Every forget metric is stored per fact (and its mean is the metric), a relearning variant
    runs as its own part, the probe is averaged over layers, and the report pairs the rows."""
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    config = tiny_config(saved_llama).model_dump()
    config["localizations"] = [
        {"name": "fact_lookup", "method": "random"},  # a label: the claims compare by name
        {"name": "causal_tracing", "method": "causal_tracing", "restrict_to": "mlp"},
        {"name": "last_layer", "method": "last_layer", "train": {"steps": 3}},
    ]
    config["evaluation"]["formats"] = ["completion", "options_word", "capitalized", "dashed"]
    config["evaluation"]["soft_prompt"] = None
    config["evaluation"]["relearn_variants"] = {
        "strong": {"steps": 2, "eval_every": 2, "batch_size": 2, "lr": 1e-2, "lora_rank": 4,
                   "schedule": "cosine", "formats": ["completion"]}
    }  # fmt: skip
    out = tmp_path / "run"
    run_experiment(validate_config(ExperimentConfig, config, "test"), out, progress=False)
    forget = json.loads((out / "facts" / "seed0.json").read_text())["forget"]
    result = json.loads((out / "results" / "last_layer" / "seed0.json").read_text())
    # the row's own train length, in its edit and in its sweep; the other rows keep theirs
    assert result["train"]["steps"] == 3
    assert json.loads((out / "sweep" / "last_layer.json").read_text())["rung_steps"] == [3]
    other = json.loads((out / "results" / "causal_tracing" / "seed0.json").read_text())
    assert other["train"]["steps"] == 2
    metrics, per_fact = result["metrics"], result["per_fact"]
    for fmt in ("completion", "options_word", "capitalized", "dashed"):
        values = per_fact[f"forget.{fmt}.p_original"]
        assert sorted(values) == sorted(forget)
        assert metrics[f"forget.{fmt}.p_original"] == pytest.approx(
            statistics.fmean(values.values())
        )
    strong = per_fact["relearn@strong.completion.accuracy"]
    assert len(strong) == len(forget) // 2  # the held-out half only
    assert metrics["relearn@strong.completion.accuracy"] == pytest.approx(
        statistics.fmean(strong.values())
    )
    assert result["curves"]["relearn@strong"]["config"]["schedule"] == "cosine"
    assert [p["step"] for p in result["curves"]["relearn@strong"]["curve"]] == [0, 2]
    assert "relearn.completion.accuracy" in metrics  # the config's own attack still runs
    probes = result["curves"]["probes"]
    layer_mean = per_fact["probe.forget_accuracy_layer_mean"]
    assert metrics["probe.forget_accuracy_layer_mean"] == pytest.approx(
        statistics.fmean(statistics.fmean(row) for row in probes["forget_correct"][1:])
    )
    assert statistics.fmean(layer_mean.values()) == pytest.approx(
        metrics["probe.forget_accuracy_layer_mean"]
    )
    assert metrics["probe.forget_accuracy_last"] == pytest.approx(probes["forget_accuracy"][-1])
    claims = json.loads((out / "claims.json").read_text())
    assert {row["format"] for row in claims["format_baselines"]} == {
        "completion", "options_word", "capitalized", "dashed"
    }  # fmt: skip
    keys = {row["key"] for row in claims["claims"]}
    assert {"relearn@strong.completion.accuracy", "probe.forget_accuracy_layer_mean"} <= keys
    assert {row["other"] for row in claims["claims"]} == {"causal_tracing"}
    assert all(row["n_seeds"] == 2 for row in claims["claims"])
    assert all(row["low"] <= row["difference"] <= row["high"] for row in claims["claims"])
    strength = {(r["attack"], r["row"]) for r in claims["relearn_strength"]}
    assert ("relearn@strong", "last_layer") in strength and ("relearn", "fact_lookup") in strength
    table = (out / "results.md").read_text()
    assert "## Claims: fact lookup (FLU) against output tracing" in table
    assert "## Relearning attacks: what each restores" in table


def test_relocalize_runs_on_the_base_and_every_edited_model(saved_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    config = tiny_config(saved_llama).model_dump()
    config["localizations"] = [
        {"name": "ct_mlps", "method": "causal_tracing", "restrict_to": "mlp"}
    ]
    config["seeds"] = [0]
    config["evaluation"] |= {
        "relearn": None,
        "soft_prompt": None,
        "relocalize": {"methods": ["fact_lookup", "causal_tracing"], "n_facts": 4},
    }
    parsed = validate_config(ExperimentConfig, config, "test")
    assert battery_parts(parsed, attacks=False) == ["formats", "relocalize"]
    out = tmp_path / "run"
    run_experiment(parsed, out, progress=False)
    base = json.loads((out / "results" / "base" / "seed0.json").read_text())
    edited = json.loads((out / "results" / "ct_mlps" / "seed0.json").read_text())
    before, after = base["curves"]["relocalize"], edited["curves"]["relocalize"]
    assert before["facts"] == after["facts"] and len(before["facts"]) >= 2
    assert set(before) == {"facts", "fact_lookup", "causal_tracing"}
    assert after["causal_tracing"]["scores"] != before["causal_tracing"]["scores"]  # edited
    assert "relocalize.fact_lookup.probe_best" in edited["metrics"]
    rows = json.loads((out / "claims.json").read_text())["relocalize"]
    measures = {(r["method"], r["measure"]) for r in rows if r["row"] == "ct_mlps"}
    assert ("causal_tracing", "on the row's components") in measures
    assert ("fact_lookup", "clean logit difference") in measures
    assert "## Localized again after the edit" in (out / "results.md").read_text()
