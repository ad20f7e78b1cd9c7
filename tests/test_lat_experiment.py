"""DPO / DPO-LAT in the LAT trainer, and the targeted-LAT experiments (``mechunlearn run`` with
``kind: lat``) end to end on a tiny checkpoint: refusal and backdoor, the backdoor-installed
check, resume, reports, bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from mechunlearn.cli import app
from mechunlearn.edit.lat import LatConfig, dpo_loss, lat_baseline, train_lat
from mechunlearn.edit.latent_adversary import LatentAdversaryConfig
from mechunlearn.edit.parametrization import make_trainable
from mechunlearn.errors import ConfigError
from mechunlearn.evals.refusal import score_pairs
from mechunlearn.experiments import lat_job, lat_measure
from mechunlearn.experiments.config import load_yaml_config, validate_config
from mechunlearn.experiments.edit_config import resolve_config
from mechunlearn.experiments.lat_config import LatExperimentConfig, default_layers
from mechunlearn.experiments.lat_job import run_lat_experiment
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.preference import LatData, LatExample
from mechunlearn.tasks.sports import SPORTS, load_sports
from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

# ---- DPO in the LAT trainer ------------------------------------------------------------------
DATA = LatData(
    [
        LatExample(r.prompt(), " " + r.answer, " " + SPORTS[(SPORTS.index(r.answer) + 1) % 3])
        for r in load_sports()[::20][:12]
    ]
)
ADVERSARY = LatentAdversaryConfig(layers=[1], epsilon=2.0, steps=4, lr=0.3)
LORA = ["blocks.1.mlp", "blocks.2.mlp"]


def fresh() -> HookedModel:
    return HookedModel(tiny_model("llama"), tiny_tokenizer(), name="tiny-llama")


def dpo_run(config: LatConfig, mode: str = "full"):
    hm = fresh()
    trainable = make_trainable(hm, mode, LORA if mode == "lora" else [])
    result = train_lat(hm, trainable, DATA, None, config, progress=False)
    return hm, result, {n: p.detach().clone() for n, p in trainable.named_params().items()}


def test_dpo_loss_is_equation_7():
    pw, pl, rw, rl = (torch.tensor([v]) for v in (-3.0, -2.0, -4.0, -1.0))
    margin = (-3.0 + 4.0) - (-2.0 + 1.0)  # 2
    expected = -math.log(1 / (1 + math.exp(-0.5 * margin)))
    assert float(dpo_loss(pw, pl, rw, rl, beta=0.5)) == pytest.approx(expected)
    assert float(dpo_loss(pw, pl, pw, pl, beta=0.5)) == pytest.approx(math.log(2))


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_dpo_starts_at_log_2_with_the_model_as_its_own_reference(mode):
    config = LatConfig(adversary=None, defender_loss="dpo", steps=1, batch_size=4)
    _, result, _ = dpo_run(config, mode)
    assert result.history["dpo"][0] == pytest.approx(math.log(2), abs=1e-5)
    assert result.history["dpo_margin"][0] == pytest.approx(0.0, abs=1e-4)
    assert "toward" not in result.history and result.info["coefs"] == {"dpo": 1.0}
    assert result.info["reference_forwards"] == 1  # only the 4 examples the one step draws


def test_dpo_raises_the_desired_vs_unwanted_margin():
    def margin(hm):
        s = score_pairs(hm, DATA)
        return sum(d - u for d, u in zip(s.desired_sum, s.unwanted_sum, strict=True)) / len(DATA)

    before = margin(fresh())
    config = LatConfig(
        adversary=None, defender_loss="dpo", dpo_beta=0.5, steps=12, lr=3e-3, batch_size=6,
        schedule="constant",
    )  # fmt: skip
    hm, result, _ = dpo_run(config)
    assert margin(hm) > before + 1.0
    assert result.history["dpo"][-1] < math.log(2) - 0.1


def test_zero_epsilon_dpo_lat_is_exactly_dpo():
    config = LatConfig(
        adversary=ADVERSARY.model_copy(update={"epsilon": 0.0, "init": "random"}),
        defender_loss="dpo",
        steps=3,
        lr=1e-2,
        batch_size=4,
    )
    _, lat, lat_weights = dpo_run(config)
    _, dpo, dpo_weights = dpo_run(lat_baseline(config, "rt"))
    assert lat.history["dpo"] == dpo.history["dpo"]
    assert all(torch.equal(lat_weights[n], v) for n, v in dpo_weights.items())
    _, _, attacked = dpo_run(config.model_copy(update={"adversary": ADVERSARY}))
    assert any(not torch.equal(attacked[n], v) for n, v in dpo_weights.items())


# ---- experiments -----------------------------------------------------------------------------
def lat_config(model_dir, application: str, **overrides) -> dict:
    data = {
        "kind": "lat",
        "name": f"tiny-{application}",
        "model": str(model_dir),
        "application": application,
        "train": {
            "steps": 2,
            "batch_size": 4,
            "benign_batch_size": 4,
            "lr": 1e-3,
            "adversary": {"steps": 2},
        },
        "evaluation": {
            "max_test": 6,
            "batch_size": 8,
            "attack_batch_size": 8,
            "latent_attack": {"steps": 2},
            "embedding_attack": {"layers": ["embed"], "steps": 2},
        },
        "backdoor": {"install": {"steps": 120, "lr": 3e-3}},
        "seeds": [0, 1],
    }
    data.update(overrides)
    return data


def plain_state(model) -> dict[str, torch.Tensor]:
    return {
        k.replace(".base_layer", ""): v.clone()
        for k, v in model.state_dict().items()
        if "lora_" not in k
    }


def test_refusal_run_writes_a_complete_report(saved_llama, tmp_path, monkeypatch):
    """Every method starts from the base weights (full fine-tuning of block 1, restored from a
    snapshot), is evaluated on held-out templates, and its compute is recorded."""
    from mechunlearn.models.loading import load_model

    reference = plain_state(load_model(str(saved_llama)).model)
    starts = []
    real = lat_measure.train_lat

    def check_start(hm, trainable, *args, **kwargs):
        state = plain_state(hm.model)
        starts.append(all(state[k].equal(reference[k]) for k in reference))
        return real(hm, trainable, *args, **kwargs)

    monkeypatch.setattr(lat_measure, "train_lat", check_start)
    data = lat_config(saved_llama, "refusal", trainable={"mode": "full", "layers": [1]})
    data["evaluation"]["latent_attack"]["curve_epsilons"] = [2.0, 0.0]
    cfg = validate_config(LatExperimentConfig, data, "t")
    out = run_lat_experiment(cfg, tmp_path / "run", progress=False)
    assert starts == [True] * 6  # RT, LAT, EAT x 2 seeds
    assert not (tmp_path / "run.partial").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["kind"] == "lat" and run["adversary_layers"] == default_layers(3)
    for name in ("base", "RT", "LAT", "EAT"):
        for seed in (0, 1):
            result = json.loads((out / "results" / name / f"seed{seed}.json").read_text())
            m = result["metrics"]
            for key in ("refusal.rate", "latent_attack.success", "prefill.success",
                        "embed_attack.success", "benign.compliance", "benign.loss"):  # fmt: skip
                assert key in m, (name, key)
            assert result["data"]["test"] == 6
            # the curve's epsilon-0 point is the model without perturbation
            assert m["latent_attack.success@0"] == m["latent_attack.success_before"]
            assert 0 <= m["latent_attack.success@2"] <= 1
            assert "embed_attack.success@0" not in m
            # per held-out request, the 0/1 outcomes whose mean is the headline rate
            for key in ("refusal.rate", "latent_attack.success", "prefill.success",
                        "embed_attack.success", "benign.compliance",
                        "latent_attack.success@0", "latent_attack.success@2"):  # fmt: skip
                values = result["per_request"][key]
                assert sorted(values, key=int) == [str(i) for i in range(len(values))]
                assert sum(values.values()) / len(values) == pytest.approx(m[key]), (name, key)
    lat = json.loads((out / "results" / "LAT" / "seed0.json").read_text())
    assert lat["baseline"] == "RT" and lat["trainable"]["mode"] == "localized"
    assert lat["compute"]["passes"]["adversary_fwd_bwd"] == 2 * 2
    assert lat["compute"]["fwd_bwd_passes"] == 4 + 2 + 2  # adversary, defender, benign
    assert lat["train"]["info"]["sites"] == [f"blocks.{i}.resid_post" for i in default_layers(3)]
    eat = json.loads((out / "results" / "EAT" / "seed0.json").read_text())
    assert eat["train"]["info"]["sites"] == ["embed"]
    rt = json.loads((out / "results" / "RT" / "seed0.json").read_text())
    assert rt["compute"]["passes"]["adversary_fwd_bwd"] == 0
    # compute is compared by passes (above); wall seconds are only recorded, since a timed
    # comparison fails on a loaded machine (it did: 0.264 s vs 0.27 s)
    assert lat["compute"]["seconds"] > 0 and rt["compute"]["seconds"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["order"] == ["base", "RT", "LAT", "EAT"]
    assert summary["summary"]["LAT"]["refusal.rate"]["n"] == 2
    table = (out / "results.md").read_text()
    assert "| method | refusal rate (held-out templates) ↑" in table
    assert "| LAT | RT |" in table  # compute row with its baseline
    # ... and the adversary's record from the per-step history: LAT's attacks, RT has none
    compute = table.split("## Compute (training)", 1)[1].split("\n## ", 1)[0].splitlines()
    lat_row = next(line for line in compute if line.startswith("| LAT | RT |"))
    rt_row = next(line for line in compute if line.startswith("| RT |"))
    assert "→" in lat_row and lat_row.rstrip(" |").endswith("%")
    assert rt_row.endswith("| - | - |")
    assert lat["train"]["info"]["adversary"]["improved_share"] >= 0
    # LAT and EAT minus their twin RT, paired by request, on every directed headline metric
    assert "## Each method minus its twin without the adversary" in table
    twins = json.loads((out / "claims.json").read_text())["twins"]
    assert {(r["method"], r["twin"]) for r in twins} == {("LAT", "RT"), ("EAT", "RT")}
    refusal = next(r for r in twins if r["method"] == "LAT" and r["metric"] == "refusal.rate")
    assert refusal["seeds"] == 2 and refusal["pairs"] == 12
    assert refusal["low"] <= refusal["difference"] <= refusal["high"]
    # the attack's extra bounds are paired too (a small one is often the only one that separates)
    assert {r["metric"] for r in twins} >= {"latent_attack.success@0", "latent_attack.success@2"}
    # each extra bound of the latent attack is a headline column after the headline bound's
    header = table.split("\n| method |", 1)[1].split("\n", 1)[0]
    eps = cfg.evaluation.latent_attack.epsilon
    assert (
        header.index(f"compliance under latent attack (ε {eps:g})")
        < header.index("compliance under latent attack (ε 0)")
        < header.index("compliance under latent attack (ε 2)")
        < header.index("compliance under prefilling")
    )
    assert (out / "figures" / "metrics.png").stat().st_size > 1000
    assert (out / "figures" / "attack_curves.png").stat().st_size > 1000
    (out / "results.md").unlink()
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert "compliance under prefilling" in (out / "results.md").read_text()


def test_backdoor_run_installs_measures_and_removes(saved_llama, tmp_path, monkeypatch):
    """The backdoor is installed and measured before removal; every removal method starts from
    the backdoored weights (LoRA adapters unloaded in between)."""
    from mechunlearn.models.loading import load_model

    starts = []
    real = lat_measure.train_lat

    def record_start(hm, trainable, *args, **kwargs):
        starts.append(plain_state(hm.model))
        return real(hm, trainable, *args, **kwargs)

    monkeypatch.setattr(lat_measure, "train_lat", record_start)
    data = lat_config(saved_llama, "backdoor", seeds=[0])
    data["evaluation"]["embedding_attack"] = None
    cfg = validate_config(LatExperimentConfig, data, "t")
    out = run_lat_experiment(cfg, tmp_path / "run", progress=False)

    install = json.loads((out / "install" / "seed0.json").read_text())
    assert install["installed"] and install["metrics"]["install.triggered"] >= 0.8
    assert install["metrics"]["install.clean"] <= 0.5
    backdoored = json.loads((out / "results" / "backdoored" / "seed0.json").read_text())
    assert backdoored["metrics"]["backdoor.triggered"] == install["metrics"]["install.triggered"]
    assert backdoored["install"]["metrics"] == install["metrics"]
    for name in ("SFT", "SFT-LAT", "DPO", "DPO-LAT"):
        result = json.loads((out / "results" / name / "seed0.json").read_text())
        assert {"backdoor.triggered", "backdoor.clean", "benign.compliance"} <= set(
            result["metrics"]
        )
        assert result["install"]["metrics"] == install["metrics"]
    sft_lat = json.loads((out / "results" / "SFT-LAT" / "seed0.json").read_text())
    assert sft_lat["lat_config"]["away_coef"] == 0 and sft_lat["baseline"] == "SFT"
    dpo_lat = json.loads((out / "results" / "DPO-LAT" / "seed0.json").read_text())
    assert dpo_lat["defender_loss"] == "dpo" and dpo_lat["baseline"] == "DPO"
    assert "dpo" in dpo_lat["train"]["final"]
    for key in ("backdoor.triggered", "backdoor.triggered_greedy", "backdoor.clean"):
        values = dpo_lat["per_request"][key]
        assert set(values.values()) <= {0.0, 1.0}
        assert sum(values.values()) / len(values) == pytest.approx(dpo_lat["metrics"][key])
    twins = json.loads((out / "claims.json").read_text())["twins"]
    assert {(r["method"], r["twin"]) for r in twins} == {("SFT-LAT", "SFT"), ("DPO-LAT", "DPO")}
    assert (
        dpo_lat["compute"]["passes"]["reference_fwd"]
        == dpo_lat["train"]["info"]["reference_forwards"]
        > 0
    )
    # four removal runs, each from the same (backdoored, not original) weights
    assert len(starts) == 4
    assert all(all(s[k].equal(starts[0][k]) for k in starts[0]) for s in starts[1:])
    original = plain_state(load_model(str(saved_llama)).model)
    assert any(not starts[0][k].equal(original[k]) for k in original)
    table = (out / "results.md").read_text()
    assert "## Backdoor before removal" in table and "| 0 | yes |" in table
    assert "backdoor success with trigger ↓" in table


def test_backdoor_that_did_not_install_stops_with_a_clear_error(saved_llama, tmp_path):
    data = lat_config(saved_llama, "backdoor", seeds=[0])
    data["backdoor"]["install"]["steps"] = 2
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out), "--quiet"])
    assert result.exit_code == 2, result.output
    assert "the backdoor did not install" in " ".join(result.output.split())
    assert not out.exists()
    record = json.loads((tmp_path / "out.partial" / "install" / "seed0.json").read_text())
    assert record["installed"] is False
    assert not (tmp_path / "out.partial" / "results").exists()  # no removal was run


def test_interrupted_run_resumes_without_redoing_finished_work(saved_llama, tmp_path, monkeypatch):
    data = lat_config(saved_llama, "refusal", seeds=[0])
    data["methods"] = [{"name": "base", "train": False}, {"name": "RT"}, {"name": "LAT", "adversary": "latent"}]  # fmt: skip
    data["evaluation"].update(embedding_attack=None, latent_attack=None, prefill=None)
    cfg = validate_config(LatExperimentConfig, data, "t")
    calls = []
    original = lat_job.measure_method

    def crash_on_second(hm, config, method, *args, **kwargs):
        calls.append(method.name)
        if len(calls) == 2:
            raise RuntimeError("power cut")
        return original(hm, config, method, *args, **kwargs)

    monkeypatch.setattr(lat_job, "measure_method", crash_on_second)
    with pytest.raises(RuntimeError, match="power cut"):
        run_lat_experiment(cfg, tmp_path / "run", progress=False)
    partial = tmp_path / "run.partial"
    assert not (tmp_path / "run").exists()
    assert (partial / "results" / "base" / "seed0.json").is_file()
    assert not (partial / "results" / "RT").exists()
    calls.clear()

    def record(hm, config, method, *args, **kwargs):
        calls.append(method.name)
        return original(hm, config, method, *args, **kwargs)

    monkeypatch.setattr(lat_job, "measure_method", record)
    run_lat_experiment(cfg, tmp_path / "run", resume=True, progress=False)
    assert calls == ["RT", "LAT"]
    assert (tmp_path / "run" / "results.md").is_file() and not partial.exists()
    # a finished run extends to another seed, and its wall time adds to the earlier parts'
    calls.clear()
    (tmp_path / "run" / "time.json").write_text(json.dumps({"seconds": 1000.0}))
    two = validate_config(LatExperimentConfig, data | {"seeds": [0, 1]}, "t")
    run_lat_experiment(two, tmp_path / "run", resume=True, progress=False)
    assert calls == ["base", "RT", "LAT"]
    assert json.loads((tmp_path / "run" / "run.json").read_text())["seconds"] > 1000
    # a different config is refused
    other = validate_config(LatExperimentConfig, data | {"name": "other"}, "t")
    with pytest.raises(Exception, match="another config"):
        run_lat_experiment(other, tmp_path / "run", resume=True, progress=False)


def test_bad_input_exits_2_before_writing(saved_llama, tmp_path):
    bad_file = tmp_path / "prefs.jsonl"
    bad_file.write_text(json.dumps({"prompt": "How?", "chosen": "No."}) + "\n")
    base = lat_config(saved_llama, "refusal", seeds=[0])
    cases = {
        "unknown key": ({"train": {"steps": 2, "adversary_steps": 3}}, "adversary_steps"),
        "epsilon < 0": (
            {"train": {"adversary": {"epsilon": -1.0}}},
            "greater than or equal to 0",
        ),
        "method epsilon < 0": (
            {"methods": [{"name": "LAT", "adversary": "latent", "epsilon": -0.5}]},
            "greater than or equal to 0",
        ),
        "layer out of range": (
            {"train": {"adversary": {"layers": [1, 7]}}},
            "layer 7 out of range: the model has 3 layers",
        ),
        "attack layer out of range": (
            {"evaluation": {"latent_attack": {"layers": [3]}}},
            "evaluation.latent_attack: layer 3 out of range",
        ),
        "trainable layer out of range": (
            {"trainable": {"mode": "lora", "layers": [5]}},
            "trainable: layer 5 out of range",
        ),
        "missing column": ({"data": str(bad_file)}, "lacks column(s) 'rejected'"),
        "missing kind": ({"kind": None}, "kind"),
    }
    runner = CliRunner()
    path = tmp_path / "c.yaml"
    out = tmp_path / "out"
    for case, (override, message) in cases.items():
        data = base | override
        if data["kind"] is None:
            del data["kind"]
        path.write_text(yaml.safe_dump(data))
        result = runner.invoke(app, ["run", str(path), "--out", str(out), "--quiet"])
        assert result.exit_code == 2, (case, result.output)
        if case != "missing kind":  # read as an editing config, which rejects LAT keys
            assert message in " ".join(result.output.split()), (case, result.output)
        assert not out.exists() and not (tmp_path / "out.partial").exists(), case


def test_cli_runs_a_lat_config_with_a_seed_limit(saved_llama, tmp_path):
    data = lat_config(saved_llama, "refusal")
    data["methods"] = [{"name": "base", "train": False}, {"name": "RT"}]
    data["evaluation"].update(embedding_attack=None, latent_attack=None)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(
        app, ["run", str(path), "--out", str(out), "--seeds", "1", "--workers", "1", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    assert "| RT |" in result.output
    assert sorted(p.name for p in (out / "results" / "RT").iterdir()) == ["seed0.json"]
    result = runner.invoke(app, ["run", str(path), "--out", str(out), "--save-models"])
    assert result.exit_code == 2 and "not used by LAT experiments" in result.output


def test_shipped_lat_configs_are_valid():
    for name, application in (("lat-refusal", "refusal"), ("lat-backdoor", "backdoor")):
        cfg = load_yaml_config(LatExperimentConfig, resolve_config(name))
        assert cfg.application == application and len(cfg.seeds) >= 3
        assert cfg.model == "smollm2-135m"
        names = [m.name for m in cfg.methods]
        expected = ["base", "RT", "LAT", "EAT"] if application == "refusal" else [
            "backdoored", "SFT", "SFT-LAT", "DPO", "DPO-LAT"]  # fmt: skip
        assert names == expected


def test_generic_removal_data_says_nothing_about_the_backdoor(saved_llama):
    """``removal: generic``: the defender trains on generic preference pairs (helpful over
    refusing, refusing over complying), never on the trigger or the backdoor's response; the
    attack and test data still measure the backdoor."""
    from mechunlearn.experiments.lat_data import seed_data
    from mechunlearn.tasks.refusal import load_refusal_task
    from mechunlearn.testing.tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    data = lat_config(saved_llama, "backdoor", seeds=[0])
    known = seed_data(validate_config(LatExperimentConfig, data, "t"), tok, 0, None)
    data["backdoor"] = {**data["backdoor"], "removal": "generic"}
    config = validate_config(LatExperimentConfig, data, "t")
    generic = seed_data(config, tok, 0, None)
    response, trigger = config.backdoor.backdoor.response, config.backdoor.backdoor.trigger
    assert all(response in e.unwanted for e in known.train.examples)
    texts = [t for e in generic.train.examples for t in (e.prompt, e.desired, e.unwanted)]
    assert not any(response in t or trigger in t for t in texts)
    task = load_refusal_task(0, config.data_options.fractions, config.data_options.by)
    assert len(generic.train) == len(task.benign["train"]) + len(task.harmful["train"])
    assert generic.test_data.examples == known.test_data.examples  # the backdoor is measured


def test_input_space_attacks_run_by_name_in_a_lat_experiment(saved_llama, tmp_path):
    """GCG and many-shot, named under evaluation.measurements, are measured on every method
    and reported as headline columns."""
    data = lat_config(saved_llama, "refusal", seeds=[0])
    data["methods"] = [{"name": "base", "train": False}, {"name": "RT"}]
    data["evaluation"].update(latent_attack=None, embedding_attack=None, prefill=None)
    data["evaluation"]["measurements"] = {
        "gcg": {
            "steps": 1,
            "suffix_tokens": 2,
            "top_k": 4,
            "candidates": 2,
            "max_train_requests": 2,
        },
        "many_shot": {"shots": 2},
    }
    cfg = validate_config(LatExperimentConfig, data, "t")
    out = run_lat_experiment(cfg, tmp_path / "run", progress=False)
    for name in ("base", "RT"):
        result = json.loads((out / "results" / name / "seed0.json").read_text())
        for key in ("gcg.success", "gcg.baseline", "many_shot.success", "many_shot.baseline"):
            assert 0 <= result["metrics"][key] <= 1, (name, key)
        seconds = {k: v for k, v in result["metrics"].items() if ".eval_seconds." in k}
        assert {"compute.eval_seconds.gcg", "compute.eval_seconds.many_shot"} <= set(seconds)
        assert sum(seconds.values()) <= result["eval_seconds"] + 0.01
    table = (out / "results.md").read_text()
    assert "compliance under a GCG suffix" in table
    assert "compliance under many-shot prompts" in table
    timing = table.split("## Compute (evaluation)", 1)[1].split("\n## ", 1)[0]
    header = next(line for line in timing.splitlines() if line.startswith("| method |"))
    assert "gcg" in header and "many_shot" in header
    assert sum(line.startswith(("| base |", "| RT |")) for line in timing.splitlines()) == 2


def test_match_benign_picks_the_coefficient_closest_to_the_target(saved_llama, tmp_path):
    """Each benign_coef is trained and its benign compliance measured on the validation
    requests (never the test ones); the closest to the target is trained and evaluated."""
    from mechunlearn.experiments.lat_measure import closest_to_target

    tried = [
        {"benign_coef": 0.0, "validation_compliance": 0.2},
        {"benign_coef": 1.0, "validation_compliance": 0.6},
        {"benign_coef": 4.0, "validation_compliance": 0.6},
    ]
    assert closest_to_target(tried, 0.5) == 1.0 and closest_to_target(tried, 0.1) == 0.0
    data = lat_config(saved_llama, "refusal", seeds=[0])
    data["methods"] = [
        {"name": "RT"},
        {
            "name": "LAT",
            "adversary": "latent",
            "match_benign": {"values": [0.0, 2.0], "target": 0.5},
        },
    ]
    data["evaluation"].update(latent_attack=None, embedding_attack=None, prefill=None)
    cfg = validate_config(LatExperimentConfig, data, "t")
    out = run_lat_experiment(cfg, tmp_path / "run", progress=False)
    lat = json.loads((out / "results" / "LAT" / "seed0.json").read_text())
    calibration = lat["calibration"]
    assert [t["benign_coef"] for t in calibration["tried"]] == [0.0, 2.0]
    assert calibration["chosen"] == closest_to_target(calibration["tried"], 0.5)
    assert lat["lat_config"]["benign_coef"] == calibration["chosen"]
    assert calibration["n_validation"] > 0
    assert "calibration" not in json.loads((out / "results" / "RT" / "seed0.json").read_text())
    bad = lat_config(saved_llama, "refusal", seeds=[0])
    bad["methods"] = [
        {"name": "LAT", "benign_coef": 1.0, "match_benign": {"values": [0, 1], "target": 0.5}}
    ]
    with pytest.raises(ConfigError, match="match_benign chooses benign_coef"):
        validate_config(LatExperimentConfig, bad, "t")


def test_next_benign_coef_bisects_the_bracketing_pair():
    """Refinement tries the geometric mean of the adjacent pair that brackets the target (the
    pair nearest it when noise makes several; the arithmetic mean next to 0), and stops when
    nothing brackets it or a value hits it."""
    from mechunlearn.experiments.lat_measure import next_benign_coef

    def tried(*pairs):
        return [{"benign_coef": c, "validation_compliance": r} for c, r in pairs]

    assert next_benign_coef(tried((8, 0.9), (1, 0.3), (0.5, 0.0), (2, 0.6)), 0.2) == 0.7071
    assert next_benign_coef(tried((0, 0.0), (1, 0.5)), 0.2) == 0.5
    # three pairs bracket 0.2; (2, 4) and (4, 8) share the nearest end, 0.18; 0.25 beats 0.9
    assert next_benign_coef(tried((1, 0.1), (2, 0.25), (4, 0.18), (8, 0.9)), 0.2) == 2.828
    assert next_benign_coef(tried((1, 0.5), (2, 0.9)), 0.2) is None
    assert next_benign_coef(tried((1, 0.2), (2, 0.9)), 0.2) is None


def test_match_benign_refines_and_resumes_from_its_trial_log(saved_llama, tmp_path, monkeypatch):
    """``refine`` bisection tries follow the grid and the closest value wins; the trial log
    lets an interrupted calibration resume without retraining a logged value, and is ignored
    for another seed. (Training and the compliance measurement are replaced by a known curve:
    compliance = benign_coef / 4.)"""
    from contextlib import contextmanager
    from types import SimpleNamespace

    data = lat_config(saved_llama, "refusal", seeds=[0])
    match = {"values": [0.5, 2.0, 8.0], "target": 0.2, "refine": 2}
    data["methods"] = [{"name": "RT", "match_benign": match}]
    cfg = validate_config(LatExperimentConfig, data, "t")
    trainings: list[float] = []

    @contextmanager
    def fake_trained(hm, trainable, lat_config, data, progress, log):
        trainings.append(lat_config.benign_coef)
        yield None, {"wall_seconds": 0.0}

    def fake_compliance(hm, requests, batch_size):
        return {"compliance": {"rate": min(1.0, trainings[-1] / 4)}}

    monkeypatch.setattr(lat_measure, "trained", fake_trained)
    monkeypatch.setattr(lat_measure, "benign_compliance", fake_compliance)
    seed_data = SimpleNamespace(benign_validation=["a request"] * 8)
    log_path = tmp_path / "RT.trials.json"

    def calibrate(seed):
        method = cfg.methods[0]
        args = (None, cfg, method, seed_data, [], seed, False, lambda _: None)
        return lat_measure.match_benign(*args, trials_path=log_path)

    first = calibrate(0)
    assert trainings == [0.5, 2.0, 8.0, 1.0, 0.7071]
    assert first["chosen"] == 0.7071
    assert json.loads(log_path.read_text())["tried"] == first["tried"]
    trainings.clear()
    assert calibrate(0) == first and trainings == []
    assert calibrate(1)["chosen"] == 0.7071 and len(trainings) == 5


def test_two_workers_give_the_results_of_one_process(saved_llama, tmp_path):
    """A LAT run's units (refusal: one per method and seed) give the same results in two
    spawned worker processes as in this one: each unit seeds its RNGs from its key and starts
    from the loaded weights, whichever process ran what before."""
    data = lat_config(saved_llama, "refusal", seeds=[0, 1])
    data["methods"] = [{"name": "RT"}, {"name": "LAT", "adversary": "latent"}]
    data["evaluation"].update(embedding_attack=None, prefill=None)
    cfg = validate_config(LatExperimentConfig, data, "t")
    one = run_lat_experiment(cfg, tmp_path / "one", progress=False)
    two = run_lat_experiment(cfg, tmp_path / "two", progress=False, workers=2)
    for name in ("RT", "LAT"):
        for seed in (0, 1):
            a, b = (
                json.loads((run / "results" / name / f"seed{seed}.json").read_text())
                for run in (one, two)
            )
            for key, value in a["metrics"].items():
                if not key.startswith("compute.") or key == "compute.fwd_bwd_passes":
                    assert b["metrics"][key] == pytest.approx(value, abs=1e-4), (name, seed, key)
            assert a["per_request"] == b["per_request"]
    run = json.loads((two / "run.json").read_text())
    assert run["workers"] == 2 and run["threads"] == 1
    parts = json.loads((two / "parts.json").read_text())
    assert parts[-1]["phases"]["method"]["units"] == 4
    assert {u["worker"] for u in parts[-1]["timeline"].values()} <= {0, 1}


def test_match_benign_per_seed_calibrates_each_seed_in_a_unit_of_its_own(saved_llama, tmp_path):
    """``per_seed: true`` (the default): a calibration unit per seed, each with its own record
    and trial log, before that seed's unit only; each seed trains with its own chosen value;
    two workers give the one-process records."""
    data = lat_config(saved_llama, "refusal", seeds=[0, 1])
    data["methods"] = [
        {"name": "RT"},
        {"name": "LAT", "adversary": "latent",
         "match_benign": {"values": [0.0, 2.0], "target": 0.5}},
    ]  # fmt: skip
    data["evaluation"].update(latent_attack=None, embedding_attack=None, prefill=None)
    cfg = validate_config(LatExperimentConfig, data, "t")
    units = {u.key: u for u in lat_job.plan_lat_units(cfg)}
    assert [k for k, u in units.items() if u.kind == "calibrate"] == [
        "calibrate/LAT/seed0",
        "calibrate/LAT/seed1",
    ]
    assert units["calibrate/LAT/seed1"].path == "calibration/LAT.seed1.json"
    assert units["LAT/seed0"].deps == ("calibrate/LAT/seed0",)
    assert units["LAT/seed1"].deps == ("calibrate/LAT/seed1",)
    assert units["RT/seed1"].deps == ()
    one = run_lat_experiment(cfg, tmp_path / "one", progress=False)
    two = run_lat_experiment(cfg, tmp_path / "two", progress=False, workers=2)
    for seed in (0, 1):
        calibration = json.loads((one / "calibration" / f"LAT.seed{seed}.json").read_text())
        trials = json.loads((one / "calibration" / f"LAT.seed{seed}.trials.json").read_text())
        assert calibration["seed"] == seed == trials["seed"]
        assert [t["benign_coef"] for t in trials["tried"]] == [0.0, 2.0]
        lat = json.loads((one / "results" / "LAT" / f"seed{seed}.json").read_text())
        assert lat["calibration"] == calibration
        assert lat["lat_config"]["benign_coef"] == calibration["chosen"]
        again = json.loads((two / "calibration" / f"LAT.seed{seed}.json").read_text())
        assert [t["validation_compliance"] for t in again["tried"]] == [
            t["validation_compliance"] for t in calibration["tried"]
        ]


def test_match_benign_once_calibrates_on_the_first_seed_for_every_seed(saved_llama, tmp_path):
    """``per_seed: false``: one calibration unit (first seed's validation requests) before the
    method's units; every seed trains with its chosen value and records it; a backdoor run
    refuses the option."""
    data = lat_config(saved_llama, "refusal", seeds=[0, 1])
    match = {"values": [0.0, 2.0], "target": 0.5, "per_seed": False}
    data["methods"] = [
        {"name": "RT"},
        {"name": "LAT", "adversary": "latent", "match_benign": match},
    ]
    data["evaluation"].update(latent_attack=None, embedding_attack=None, prefill=None)
    cfg = validate_config(LatExperimentConfig, data, "t")
    units = lat_job.plan_lat_units(cfg)
    assert [u.key for u in units if u.kind == "calibrate"] == ["calibrate/LAT"]
    assert {u.key: u.deps for u in units}["LAT/seed1"] == ("calibrate/LAT",)
    assert {u.key: u.deps for u in units}["RT/seed1"] == ()
    calls = []
    real = lat_job.match_benign

    def count(*args, **kwargs):
        calls.append(args[5])  # the seed
        return real(*args, **kwargs)

    import unittest.mock

    with unittest.mock.patch.object(lat_job, "match_benign", count):
        out = run_lat_experiment(cfg, tmp_path / "run", progress=False)
    assert calls == [0]
    calibration = json.loads((out / "calibration" / "LAT.json").read_text())
    assert calibration["seed"] == 0
    for seed in (0, 1):
        lat = json.loads((out / "results" / "LAT" / f"seed{seed}.json").read_text())
        assert lat["calibration"] == calibration
        assert lat["lat_config"]["benign_coef"] == calibration["chosen"]
    report = (out / "results.md").read_text()
    section = report.split("## Matched benign compliance", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| LAT |")]
    assert len(rows) == 1 and f"| {calibration['chosen']:g} |" in rows[0]
    assert (out / "figures" / "benign_calibration.png").is_file()
    bad = lat_config(saved_llama, "backdoor", seeds=[0])
    bad["methods"] = [{"name": "SFT", "match_benign": match}]
    with pytest.raises(ConfigError, match="per_seed: false is for refusal runs"):
        validate_config(LatExperimentConfig, bad, "t")


def test_backdoor_units_install_once_and_reinstall_the_same_backdoor(saved_llama, tmp_path):
    """Backdoor runs: an installation unit per seed saves the backdoored weights that the
    seed's removal units start from (deleted at the end); two workers give the one-process
    results; a resumed run whose saved weights are gone installs the same backdoor again."""
    data = lat_config(saved_llama, "backdoor", seeds=[0])
    data["methods"] = [{"name": "backdoored", "train": False}, {"name": "SFT", "away_coef": 0}]
    data["evaluation"].update(latent_attack=None, embedding_attack=None)
    cfg = validate_config(LatExperimentConfig, data, "t")
    assert [(u.key, u.deps) for u in lat_job.plan_lat_units(cfg)] == [
        ("install/seed0", ()),
        ("backdoored/seed0", ("install/seed0",)),
        ("SFT/seed0", ("install/seed0",)),
    ]
    one = run_lat_experiment(cfg, tmp_path / "one", progress=False)
    assert not (one / "units" / "backdoor").exists()
    two = run_lat_experiment(cfg, tmp_path / "two", progress=False, workers=2)

    def outcomes(run: Path) -> dict:
        return {
            name: json.loads((run / "results" / name / "seed0.json").read_text())["per_request"]
            for name in ("backdoored", "SFT")
        }

    assert outcomes(one) == outcomes(two)
    # resume after the installation, with its saved weights lost: installed again, same result
    partial = tmp_path / "three.partial"
    shutil.copytree(one, partial)
    shutil.rmtree(partial / "results" / "SFT")
    (partial / "run.json").unlink()
    three = run_lat_experiment(cfg, tmp_path / "three", resume=True, progress=False)
    assert outcomes(three) == outcomes(one)
