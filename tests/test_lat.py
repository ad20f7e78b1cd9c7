"""Targeted LAT trainer: reduction to RT at epsilon 0, robustness gained, the benign terms,
coefficients, LoRA adapters switched off for the KL reference, and bad inputs."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from mechunlearn.attacks.latent import latent_attack
from mechunlearn.edit.lat import LatConfig, lat_baseline, normalised_coefs, train_lat
from mechunlearn.edit.latent_adversary import LatentAdversaryConfig
from mechunlearn.edit.parametrization import make_trainable
from mechunlearn.edit.trainer import lr_factor
from mechunlearn.errors import ConfigError, DataError, SiteError
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.preference import LatData, LatExample
from mechunlearn.tasks.sports import SPORTS, load_sports
from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer


def lat_examples(n: int, step: int) -> list[LatExample]:
    """Sports facts: desired = the true sport, unwanted = the next sport in the list."""
    out = []
    for r in load_sports()[::step][:n]:
        wrong = SPORTS[(SPORTS.index(r.answer) + 1) % len(SPORTS)]
        out.append(LatExample(r.prompt(), " " + r.answer, " " + wrong))
    return out


DATA = LatData(lat_examples(12, 20))
BENIGN = [(r.prompt(), " " + r.answer) for r in load_sports()[5::40][:8]]
ADVERSARY = LatentAdversaryConfig(layers=[1], epsilon=2.0, steps=6, lr=0.3)
LORA = ["blocks.1.mlp", "blocks.2.mlp"]


def fresh() -> HookedModel:
    return HookedModel(tiny_model("llama"), tiny_tokenizer(), name="tiny-llama")


def run(config: LatConfig, mode: str = "full", benign=BENIGN, data=DATA):
    hm = fresh()
    trainable = make_trainable(hm, mode, LORA if mode == "lora" else [])
    result = train_lat(hm, trainable, data, benign, config, progress=False)
    weights = {n: p.detach().clone() for n, p in trainable.named_params().items()}
    return hm, trainable, result, weights


# ---- LAT with epsilon 0 is RT ----------------------------------------------------------------
@pytest.mark.parametrize(("mode", "benign"), [("full", "sft"), ("lora", "kl")])
def test_zero_epsilon_lat_gives_exactly_the_rt_weights(mode, benign):
    config = LatConfig(
        adversary=ADVERSARY.model_copy(update={"epsilon": 0.0, "init": "random"}),
        steps=3,
        defender_steps=2,
        lr=1e-2,
        batch_size=4,
        benign_batch_size=4,
        benign=benign,
    )
    _, _, lat, lat_weights = run(config, mode)
    _, _, rt, rt_weights = run(lat_baseline(config, "rt"), mode)
    assert "adv_loss_first" in lat.history and "adv_loss_first" not in rt.history
    assert lat.info["method"] == "lat" and rt.info["method"] == "rt"
    for name, value in rt_weights.items():
        assert torch.equal(lat_weights[name], value), name
    assert lat.history["loss"] == rt.history["loss"]
    # ...and a real adversary changes the outcome (the comparison above is not vacuous)
    _, _, _, attacked = run(config.model_copy(update={"adversary": ADVERSARY}), mode)
    assert any(not torch.equal(attacked[n], v) for n, v in rt_weights.items())


# ---- robustness ------------------------------------------------------------------------------
def test_lat_lowers_the_attack_success_rate():
    attack = LatentAdversaryConfig(layers=[1], epsilon=2.0, steps=20, lr=0.2)
    untrained = fresh()
    before = latent_attack(untrained, DATA, attack, batch_size=12, progress=False)
    assert before.before["success_rate"] <= 0.1 and before.after["success_rate"] >= 0.9

    config = LatConfig(
        adversary=ADVERSARY, steps=20, lr=3e-3, batch_size=6, schedule="constant", benign="kl"
    )
    hm, _, result, _ = run(config)
    after = latent_attack(hm, DATA, attack, batch_size=12, progress=False)
    assert after.after["success_rate"] <= before.after["success_rate"] - 0.4
    assert len(result.history["adv_loss_last"]) == 20

    rt_hm, _, _, _ = run(lat_baseline(config, "rt"))
    rt = latent_attack(rt_hm, DATA, attack, batch_size=12, progress=False)
    assert after.after["success_rate"] < rt.after["success_rate"]


# ---- the benign term -------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "lora", "localized"])
def test_kl_starts_at_zero_and_tracks_the_base_model(mode):
    config = LatConfig(adversary=ADVERSARY, steps=4, lr=2e-2, batch_size=4, benign="kl")
    hm = fresh()
    components = LORA if mode != "full" else []
    trainable = make_trainable(hm, mode, components)
    result = train_lat(hm, trainable, DATA, BENIGN, config, progress=False)
    kl = result.history["benign"]
    assert kl[0] == pytest.approx(0.0, abs=1e-6)
    assert kl[-1] > 1e-5  # the model moved away from the base and the term sees it


def test_adapters_disabled_runs_the_base_model():
    hm = fresh()
    inputs = hm.batch(["Fact: Tom Brady plays the sport of"]).model_inputs()
    with torch.no_grad():
        base = hm.model(**inputs).logits
    trainable = make_trainable(hm, "lora", LORA)
    with torch.no_grad():
        for p in trainable.params:
            p.add_(0.1 * torch.randn_like(p))
        adapted = hm.model(**inputs).logits
        assert not torch.allclose(adapted, base)
        with trainable.adapters_disabled():
            torch.testing.assert_close(hm.model(**inputs).logits, base)
            assert not any(p.requires_grad for p in trainable.params)
        torch.testing.assert_close(hm.model(**inputs).logits, adapted)
    assert all(p.requires_grad for p in trainable.params)
    trainable.restore()
    with pytest.raises(ConfigError, match="active LoRA"):
        with trainable.adapters_disabled():
            pass
    full = make_trainable(hm, "full")
    with pytest.raises(ConfigError, match="active LoRA"):
        with full.adapters_disabled():
            pass


def test_sft_benign_term_is_the_benign_cross_entropy():
    config = LatConfig(adversary=None, steps=6, lr=1e-2, batch_size=4, benign_batch_size=8)
    _, _, result, _ = run(config)
    benign = result.history["benign"]
    assert benign[-1] < benign[0]  # SFT on the benign pairs lowers their CE


# ---- coefficients and schedule ---------------------------------------------------------------
def test_coefficients_are_normalised_over_active_terms():
    config = LatConfig(adversary=None, toward_coef=2, away_coef=1, benign_coef=1)
    assert normalised_coefs(config, True) == {"toward": 0.5, "away": 0.25, "benign": 0.25}
    assert normalised_coefs(config, False) == pytest.approx({"toward": 2 / 3, "away": 1 / 3})
    config = LatConfig(adversary=None, away_coef=0)
    assert normalised_coefs(config, True) == {"toward": 0.5, "benign": 0.5}

    config = LatConfig(
        adversary=ADVERSARY, steps=2, lr=1e-2, batch_size=4, toward_coef=3, away_coef=1
    )
    _, _, result, _ = run(config, benign=None)
    h = result.history
    assert "benign" not in h and result.info["coefs"] == {"toward": 0.75, "away": 0.25}
    for i in range(2):
        assert h["loss"][i] == pytest.approx(0.75 * h["toward"][i] + 0.25 * h["away"][i])


def test_schedule_counts_defender_steps():
    config = LatConfig(adversary=None, steps=3, defender_steps=2, lr=1e-2, batch_size=4)
    _, _, result, _ = run(config)
    expected = [1e-2 * lr_factor(2 * s, 6) for s in range(3)]
    assert result.history["lr"] == pytest.approx(expected)


def test_eat_moves_the_adversary_to_the_embeddings():
    config = LatConfig(adversary=ADVERSARY, steps=2, lr=1e-2, batch_size=4)
    eat = lat_baseline(config, "eat")
    assert eat.adversary.layers == ["embed"] and eat.adversary.epsilon == ADVERSARY.epsilon
    _, _, result, _ = run(eat)
    assert result.info["sites"] == ["embed"] and "eps/embed" in result.history
    with pytest.raises(ConfigError, match="EAT needs"):
        lat_baseline(lat_baseline(config, "rt"), "eat")


# ---- bad inputs ------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors():
    hm = fresh()
    trainable = make_trainable(hm, "full")
    bad_layer = LatConfig(adversary=LatentAdversaryConfig(layers=[5]), steps=1)
    with pytest.raises(SiteError, match="layer 5 out of range: the model has 3 layers"):
        train_lat(hm, trainable, DATA, None, bad_layer, progress=False)
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        LatConfig(adversary={"layers": [0], "epsilon": -1.0})
    with pytest.raises(ValidationError, match="nothing to train against"):
        LatConfig(adversary=None, toward_coef=0, away_coef=0)
    with pytest.raises(ValidationError, match="Field required"):
        LatConfig()
    good = LatConfig(adversary=None, steps=1)
    with pytest.raises(DataError, match="no LAT examples"):
        train_lat(hm, trainable, LatData([]), None, good, progress=False)
    with pytest.raises(DataError, match="benign example 1: completion is missing"):
        train_lat(hm, trainable, DATA, [("Q", " a"), ("Q", "")], good, progress=False)
    with pytest.raises(DataError, match="not a \\(prompt, completion\\) pair"):
        train_lat(hm, trainable, DATA, ["just text"], good, progress=False)
    trainable.restore()
    with pytest.raises(ConfigError, match="restored or merged"):
        train_lat(hm, trainable, DATA, None, good, progress=False)


def test_lat_total_loss_is_the_normalised_coefficient_sum():
    config = LatConfig(
        adversary=ADVERSARY, steps=3, lr=1e-2, batch_size=4, benign_batch_size=4,
        toward_coef=0.5, away_coef=2.0, benign_coef=1.5,
    )  # fmt: skip
    _, _, result, _ = run(config)
    coefs = result.info["coefs"]
    assert coefs == pytest.approx({"toward": 0.125, "away": 0.5, "benign": 0.375})
    h = result.history
    for step in range(3):
        expected = sum(c * h[name][step] for name, c in coefs.items())
        assert h["loss"][step] == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_interrupted_lat_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    from mechunlearn.edit import lat as lat_module

    config = LatConfig(
        adversary=ADVERSARY, steps=5, lr=1e-2, batch_size=4, benign_batch_size=4, benign="kl"
    )
    _, _, reference, expected = run(config)
    config = config.model_copy(update={"checkpoint_every": 2})
    real_step = lat_module._lat_step

    def crash_at_step_4(run_, engine, step):
        if step == 3:
            raise KeyboardInterrupt
        return real_step(run_, engine, step)

    hm = fresh()
    trainable = make_trainable(hm, "full", [])
    monkeypatch.setattr(lat_module, "_lat_step", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train_lat(hm, trainable, DATA, BENIGN, config, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(lat_module, "_lat_step", real_step)
    hm = fresh()
    trainable = make_trainable(hm, "full", [])
    resumed = train_lat(
        hm, trainable, DATA, BENIGN, config, checkpoint_dir=tmp_path, resume=True, progress=False
    )
    got = {n: p.detach() for n, p in trainable.named_params().items()}
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert resumed.history["loss"] == reference.history["loss"]
