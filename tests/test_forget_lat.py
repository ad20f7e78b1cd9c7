"""Targeted LAT on the forget term of the editing/unlearning trainer (``edit.lat.ForgetLat``):
the perturbation reaches only the forget forwards, epsilon 0 is exactly plain training, a real
adversary changes training and leaves the model harder to attack, and bad input is refused."""

from __future__ import annotations

import pydantic
import pytest
import torch

from mechunlearn.edit import TrainConfig, TrainData, fact_pairs, make_trainable, train
from mechunlearn.edit.lat import ForgetLat
from mechunlearn.edit.latent_adversary import (
    LatentAdversaryConfig,
    adversary_progress,
    failing_adversary_message,
    train_adversary,
)
from mechunlearn.errors import ConfigError, DataError, SiteError
from mechunlearn.experiments.edit_config import ExperimentConfig, LocalizationSpec
from mechunlearn.models.batches import LatBatch
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.general_text import load_general_text
from mechunlearn.tasks.sports import load_sports
from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

RECORDS = load_sports()
FORGET_RECORDS = RECORDS[1::52][:8]  # several sports
UNLEARN = TrainData(
    forget=fact_pairs(FORGET_RECORDS),
    retain=fact_pairs(RECORDS[2::35][:12]),
    general_text=load_general_text()[:4],
)
EDIT = TrainData(
    forget=[(r.prompt(), " golf") for r in FORGET_RECORDS],
    retain=fact_pairs(RECORDS[2::35][:12]),
    general_text=load_general_text()[:4],
    adversary_targets=[" " + r.answer for r in FORGET_RECORDS],
)
ADVERSARY = LatentAdversaryConfig(layers=[1], epsilon=2.0, steps=4, lr=0.3)


def fresh() -> HookedModel:
    return HookedModel(tiny_model("llama"), tiny_tokenizer(), name="tiny-llama")


def run(data: TrainData, adversary: LatentAdversaryConfig | None, mode="localized", **cfg):
    hm = fresh()
    trainable = make_trainable(hm, mode, [] if mode == "full" else ["blocks.1.mlp", "blocks.2.mlp"])
    config = TrainConfig(**{"steps": 4, "lr": 1e-2, "batch_size": 4, "retain_batch_size": 4, **cfg})
    perturbation = ForgetLat(adversary) if adversary is not None else None
    result = train(hm, trainable, data, config, progress=False, forget_perturbation=perturbation)
    weights = {n: p.detach().clone() for n, p in trainable.named_params().items()}
    return hm, result, weights


def test_exclusive_perturbation_leaves_other_forwards_clean():
    hm = fresh()
    prompts = [hm.tokenize(p) for p, _ in UNLEARN.forget[:3]]
    answers = [hm.tokenize(c, add_special_tokens=False) for _, c in UNLEARN.forget[:3]]
    batch = LatBatch(prompts, answers, answers, hm.pad_id)
    adversary = train_adversary(hm, batch, ADVERSARY, seed=0)
    seqs = batch.sequences(("desired",), hm.device)
    other = hm.batch(["An unrelated sentence about the weather.", "Another one."])
    with torch.no_grad():
        clean_seqs = hm.forward(**seqs.batch.model_inputs()).logits
        clean_other = hm.forward(**other.model_inputs()).logits
        with adversary.active(hm, seqs, exclusive=True):
            perturbed_seqs = hm.forward(**seqs.batch.model_inputs()).logits
            other_inside = hm.forward(**other.model_inputs()).logits
        after = hm.forward(**seqs.batch.model_inputs()).logits
    assert not torch.allclose(perturbed_seqs, clean_seqs)
    assert torch.equal(other_inside, clean_other)
    assert torch.equal(after, clean_seqs)  # the hooks and the gate are gone


@pytest.mark.parametrize(
    ("data", "objective"),
    [(UNLEARN, "gradient_ascent"), (UNLEARN, "grad_diff"), (UNLEARN, "rmu"), (EDIT, "edit")],
)
def test_zero_epsilon_is_exactly_plain_training(data, objective):
    zero = ADVERSARY.model_copy(update={"epsilon": 0.0, "init": "random"})
    _, lat, lat_weights = run(data, zero, objective=objective)
    # plain training with a forward per batch, as under LAT (bit-identical sums)
    _, plain, plain_weights = run(data, None, objective=objective, joint_forward=False)
    assert "adv_loss_first" in lat.history and "adv_loss_first" not in plain.history
    assert lat.history["loss"] == plain.history["loss"]
    for name, value in plain_weights.items():
        assert torch.equal(lat_weights[name], value), name
    # a real adversary changes the outcome (grad_diff's retain forward runs clean beside it)
    _, attacked, attacked_weights = run(data, ADVERSARY, objective=objective)
    assert attacked.history["adv_loss_last"][0] < attacked.history["adv_loss_first"][0]
    assert any(not torch.equal(attacked_weights[n], v) for n, v in plain_weights.items())


def test_the_adversarys_record_says_whether_it_attacked():
    _, attacked, _ = run(UNLEARN, ADVERSARY, objective="gradient_ascent")
    first, last = attacked.history["adv_loss_first"], attacked.history["adv_loss_last"]
    record = attacked.info["adversary"]
    assert record == adversary_progress(attacked.history)
    assert record["improved_share"] == sum(b < a for a, b in zip(first, last, strict=True)) / len(
        first
    )
    assert record["loss_first_mean"] == pytest.approx(sum(first) / len(first))
    _, plain, _ = run(UNLEARN, None, objective="gradient_ascent")
    assert plain.info["adversary"] is None


def test_an_adversary_that_raises_its_own_loss_is_reported_as_failing():
    overshooting = {"adv_loss_first": [0.4, 0.2, 0.1, 0.3], "adv_loss_last": [6.4, 3.1, 0.05, 2.0]}
    record = adversary_progress(overshooting)
    assert record["improved_share"] == 0.25
    message = failing_adversary_message(record)
    assert message is not None and "25%" in message and "not attacking" in message
    working = {"adv_loss_first": [1.4, 0.9], "adv_loss_last": [0.2, 0.1]}
    assert failing_adversary_message(adversary_progress(working)) is None
    assert adversary_progress({"loss": [1.0]}) is None


def attacked_original_nll(hm: HookedModel, data: TrainData, attack: LatentAdversaryConfig) -> float:
    """CE of the edited facts' original answers after a fresh latent attack toward them."""
    prompts = [hm.tokenize(p) for p, _ in data.forget]
    new = [hm.tokenize(c, add_special_tokens=False) for _, c in data.forget]
    old = [hm.tokenize(c, add_special_tokens=False) for c in data.adversary_targets]
    adversary = train_adversary(hm, LatBatch(prompts, new, old, hm.pad_id), attack, seed=1)
    return adversary.losses[-1]


def test_editing_under_lat_resists_the_latent_attack_better():
    # full fine-tuning: the tiny model's logits only move far enough with its unembedding
    adversary = ADVERSARY.model_copy(update={"epsilon": 0.6})
    attack = adversary.model_copy(update={"steps": 12})
    common = {"steps": 16, "lr": 1e-2, "schedule": "constant", "batch_size": 8}
    plain_hm, _, _ = run(EDIT, None, mode="full", **common)
    lat_hm, _, _ = run(EDIT, adversary, mode="full", **common)
    plain, lat = (attacked_original_nll(hm, EDIT, attack) for hm in (plain_hm, lat_hm))
    assert lat > plain + 0.2, (lat, plain)


def test_bad_input_is_refused_before_training():
    hm = fresh()
    trainable = make_trainable(hm, "localized", ["blocks.1.mlp"])
    config = TrainConfig(steps=2, objective="unlearn", batch_size=4)
    away = ADVERSARY.model_copy(update={"away_coef": 1.0})
    with pytest.raises(ConfigError, match="away_coef"):
        train(hm, trainable, UNLEARN, config, progress=False, forget_perturbation=ForgetLat(away))
    deep = ADVERSARY.model_copy(update={"layers": [7]})
    with pytest.raises(SiteError, match="out of range"):
        train(hm, trainable, UNLEARN, config, progress=False, forget_perturbation=ForgetLat(deep))
    short = TrainData(forget=EDIT.forget, adversary_targets=[" tennis"])
    with pytest.raises(DataError, match="adversary targets"):
        short.validate()


def test_rows_choose_their_objective_and_lat():
    rows = [
        LocalizationSpec(name="GA", method="nonlocalized", objective="gradient_ascent"),
        LocalizationSpec(
            name="GA_LAT",
            method="nonlocalized",
            objective="gradient_ascent",
            latent_adversary={"layers": [1], "epsilon": 0.5},
        ),
        LocalizationSpec(name="fact_lookup", method="fact_lookup"),
    ]
    config = ExperimentConfig(
        mode="unlearn", train={"objective": "unlearn"}, localizations=rows, sweep=None,
        hyperparameters={r.name: {"lr": 1e-4, "forget_coef": 1.0} for r in rows},
    )  # fmt: skip
    objectives = [spec.train_config(config.train).objective for spec in config.localizations]
    assert objectives == ["gradient_ascent", "gradient_ascent", "unlearn"]
    assert config.localizations[1].latent_adversary.epsilon == 0.5
    with pytest.raises(pydantic.ValidationError, match="GA: mode 'edit'"):
        ExperimentConfig(mode="edit", localizations=rows[:1])
    with pytest.raises(ConfigError, match="unknown objective 'nope'"):
        ExperimentConfig(localizations=[{"name": "x", "method": "random", "objective": "nope"}])
    with pytest.raises(ConfigError, match="unknown option\\(s\\) layr for objective 'rmu'"):
        ExperimentConfig(
            mode="unlearn",
            train={"objective": "unlearn"},
            localizations=[
                {
                    "name": "x",
                    "method": "random",
                    "objective": "rmu",
                    "objective_options": {"layr": 2},
                }
            ],
        )
