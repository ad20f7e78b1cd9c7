"""Latent adversary: data checks, the per-token bound, where the perturbation lands, training,
and the standalone attack."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from mechunlearn.attacks.latent import latent_attack, preference_scores
from mechunlearn.edit.latent_adversary import (
    LatentAdversary,
    LatentAdversaryConfig,
    frozen_model,
    train_adversary,
)
from mechunlearn.errors import DataError, SiteError
from mechunlearn.models.batches import LatBatch
from mechunlearn.tasks.preference import LatData, LatExample
from mechunlearn.tasks.sports import SPORTS, load_sports


def lat_examples(n: int = 6, step: int = 37) -> list[LatExample]:
    """Sports facts: desired = the true sport, unwanted = the next sport in the list."""
    out = []
    for r in load_sports()[::step][:n]:
        wrong = SPORTS[(SPORTS.index(r.answer) + 1) % len(SPORTS)]
        out.append(LatExample(r.prompt(), " " + r.answer, " " + wrong))
    return out


EXAMPLES = lat_examples()


# ---- configuration and data ------------------------------------------------------------------
def test_config_rejects_bad_values():
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        LatentAdversaryConfig(layers=[0], epsilon=-0.1)
    with pytest.raises(ValidationError):
        LatentAdversaryConfig(layers=[])
    with pytest.raises(ValidationError, match="repeat"):
        LatentAdversaryConfig(layers=[1, 1])
    with pytest.raises(ValidationError, match="negative"):
        LatentAdversaryConfig(layers=[-1])
    with pytest.raises(ValidationError):
        LatentAdversaryConfig(layers=["unembed"])
    with pytest.raises(ValidationError, match="no objective"):
        LatentAdversaryConfig(layers=[0], toward_coef=0, away_coef=0)
    with pytest.raises(ValidationError, match="Extra inputs"):
        LatentAdversaryConfig(layers=[0], eps=1.0)
    assert LatentAdversaryConfig(layers=["embed", 2]).kinds == ("unwanted",)
    assert LatentAdversaryConfig(layers=[0], away_coef=1).kinds == ("unwanted", "desired")


def test_layers_out_of_range_name_the_depth(tiny_llama):
    config = LatentAdversaryConfig(layers=[0, 3], steps=1)
    with pytest.raises(SiteError, match="layer 3 out of range: the model has 3 layers"):
        train_adversary(tiny_llama, EXAMPLES[:2], config)
    with pytest.raises(SiteError, match="out of range"):
        latent_attack(tiny_llama, EXAMPLES[:2], config, progress=False)


def test_data_validation_errors():
    with pytest.raises(DataError, match="no LAT examples"):
        LatData([]).validate()
    with pytest.raises(DataError, match="'unwanted' is missing or empty"):
        LatData([LatExample("Q", " a", " ")]).validate()
    with pytest.raises(DataError, match="are the same"):
        LatData([LatExample("Q", " a", " a")]).validate()
    rows = [{"prompt": "Q", "chosen": " a", "rejected": " b"}]
    with pytest.raises(DataError, match=r"row 0 lacks column\(s\) 'desired', 'unwanted'"):
        LatData.from_rows(rows)
    data = LatData.from_rows(rows, desired="chosen", unwanted="rejected")
    assert data.examples == [LatExample("Q", " a", " b")]
    with pytest.raises(DataError, match="no LAT examples"):
        latent_attack(None, [], LatentAdversaryConfig(layers=[0]), progress=False)


# ---- the bound and the placement -------------------------------------------------------------
def _clean_prompt_norms(hm, batch: LatBatch, site: str) -> torch.Tensor:
    """Norms of every prompt token's activation, each prompt run alone (no padding)."""
    norms = []
    for prompt in batch.prompts:
        _, cache = hm.run_with_cache([site], input_ids=torch.tensor([prompt]))
        norms.append(cache[site][0].float().norm(dim=-1))
    return torch.cat(norms)


@pytest.mark.parametrize("mode", ["absolute", "relative"])
@pytest.mark.parametrize("positions", ["prompt", "prompt_and_completion"])
def test_every_token_stays_within_epsilon_and_unchosen_cells_stay_zero(tiny_llama, mode, positions):
    hm = tiny_llama
    config = LatentAdversaryConfig(
        layers=["embed", 1],
        epsilon=0.5 if mode == "relative" else 0.05,
        epsilon_mode=mode,
        positions=positions,
        steps=4,
        lr=5.0,  # huge steps: without the projection every cell would leave its ball
        optimizer="sgd_sign",
        init="random",
    )
    batch = LatBatch.from_examples(hm, EXAMPLES)
    adversary = train_adversary(hm, batch, config, seed=1)
    for site, norms in adversary.norms().items():
        eps = adversary.epsilons[site]
        if mode == "relative":
            expected = 0.5 * float(_clean_prompt_norms(hm, batch, site).median())
            assert eps == pytest.approx(expected, rel=1e-4)
        else:
            assert eps == 0.05
        assert (norms <= eps * (1 + 1e-5)).all()
        chosen = adversary.mask.cpu()
        assert (norms[~chosen] == 0).all()
        assert (norms[chosen] >= 0.99 * eps).float().mean() > 0.9  # the bound is active
    p_width = batch.prompt_width
    mask = adversary.mask.cpu()
    for b, prompt in enumerate(batch.prompts):
        assert mask[b, :p_width].sum() == len(prompt)  # real prompt tokens only, not padding
        assert mask[b, p_width - len(prompt) : p_width].all()
        longest = max(len(batch.desired[b]), len(batch.unwanted[b]))
        expect = longest if positions == "prompt_and_completion" else 0
        assert mask[b, p_width:].sum() == expect


@pytest.mark.parametrize("layer", ["embed", 1])
def test_perturbation_lands_on_the_chosen_tokens_only(tiny, layer):
    """At the perturbed site itself, the activation moves by exactly the cell's perturbation at
    chosen positions (the same prompt perturbation in both completions' rows) and not at all
    elsewhere (padding, completion tokens); every family's hook points."""
    hm = tiny
    config = LatentAdversaryConfig(layers=[layer], epsilon=0.3, steps=0, init="random")
    # example 0 has the longest prompt, so grid cell 0 is a real (perturbed) token: padding
    # positions must not pick it up
    batch = LatBatch.from_examples(hm, sorted(EXAMPLES, key=lambda e: -len(e.prompt))[:4])
    assert len(batch.prompts[0]) == batch.prompt_width > len(batch.prompts[-1])
    adversary = train_adversary(hm, batch, config, seed=0)
    seqs = batch.sequences(("unwanted", "desired"), hm.device)
    sites = adversary.sites
    with torch.no_grad():
        _, clean = hm.run_with_cache(sites, **seqs.batch.model_inputs())
        with adversary.active(hm, seqs):
            _, hit = hm.run_with_cache(sites, **seqs.batch.model_inputs())
    n, width = batch.grid
    for site in sites:
        diff = hit[site] - clean[site]
        moved = diff.norm(dim=-1) > 0
        delta = adversary.deltas[site].detach().reshape(n * width, -1)
        for row in range(2 * n):
            b, seq = row % n, seqs.batch.input_ids.shape[1]
            n_cont = seqs.batch.n_targets[row]
            n_prompt = len(batch.prompts[b])
            prompt_cols = range(seq - n_cont - n_prompt, seq - n_cont)
            assert moved[row].nonzero().flatten().tolist() == list(prompt_cols)
            for j, col in enumerate(prompt_cols):
                cell = b * width + batch.prompt_width - n_prompt + j
                torch.testing.assert_close(diff[row, col], delta[cell], rtol=1e-4, atol=1e-5)
        # both rows of an example got the same prompt perturbation
        for b in range(n):
            torch.testing.assert_close(
                diff[b][moved[b]], diff[n + b][moved[n + b]], rtol=1e-4, atol=1e-5
            )


def test_completion_positions_are_perturbed_when_asked(tiny_llama):
    hm = tiny_llama
    config = LatentAdversaryConfig(
        layers=[0], epsilon=0.3, steps=0, init="random", positions="prompt_and_completion"
    )
    batch = LatBatch.from_examples(hm, EXAMPLES[:3])
    adversary = train_adversary(hm, batch, config)
    seqs = batch.sequences(("unwanted", "desired"), hm.device)
    with torch.no_grad():
        _, clean = hm.run_with_cache(["blocks.0.resid_post"], **seqs.batch.model_inputs())
        with adversary.active(hm, seqs):
            _, hit = hm.run_with_cache(["blocks.0.resid_post"], **seqs.batch.model_inputs())
    moved = (hit["blocks.0.resid_post"] - clean["blocks.0.resid_post"]).norm(dim=-1) > 0
    real = seqs.batch.attention_mask.bool()
    assert torch.equal(moved, real)  # every real token, prompt and completion; no padding


def test_wrong_batch_shape_is_refused(tiny_llama):
    hm = tiny_llama
    config = LatentAdversaryConfig(layers=[0], steps=0)
    adversary = train_adversary(hm, EXAMPLES[:2], config)
    other = LatBatch.from_examples(hm, EXAMPLES[2:5]).sequences(("desired",), hm.device)
    with pytest.raises(SiteError, match="perturbation grid"):
        with adversary.active(hm, other):
            pass
    own = adversary.batch.sequences(("desired",), hm.device)
    with pytest.raises(SiteError, match="built for a batch of shape"):
        with adversary.active(hm, own), torch.no_grad():
            hm.model(**other.batch.model_inputs())


# ---- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [[1], ["embed"]])
def test_adversary_alone_drives_the_toward_loss_down(tiny_llama, layers):
    hm = tiny_llama
    hm.model.train()  # restored afterwards, as are requires_grad flags
    frozen = hm.model.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    flags = [p.requires_grad for p in hm.model.parameters()]
    before = {n: p.detach().clone() for n, p in hm.model.named_parameters()}
    config = LatentAdversaryConfig(layers=layers, epsilon=1.0, steps=15, lr=0.2)
    batch = LatBatch.from_examples(hm, EXAMPLES)
    adversary = train_adversary(hm, batch, config, seed=0)
    assert len(adversary.losses) == 15
    assert adversary.losses[-1] < adversary.losses[0] - 0.3
    hm.model.eval()
    clean = preference_scores(hm, batch)
    attacked = preference_scores(hm, batch, adversary)
    assert sum(attacked["unwanted_nll"]) < sum(clean["unwanted_nll"]) - 0.3 * len(EXAMPLES)
    hm.model.train()
    assert hm.model.training
    assert [p.requires_grad for p in hm.model.parameters()] == flags
    for name, p in hm.model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
        assert p.grad is None, name


def test_zero_epsilon_cannot_move_the_loss(tiny_llama):
    config = LatentAdversaryConfig(layers=[0, 2], epsilon=0.0, steps=5, lr=0.5, init="random")
    adversary = train_adversary(tiny_llama, EXAMPLES[:3], config)
    assert adversary.losses == [adversary.losses[0]] * 5
    assert all((n == 0).all() for n in adversary.norms().values())


def test_away_term_lowers_the_desired_completion(tiny_llama):
    hm = tiny_llama
    config = LatentAdversaryConfig(
        layers=[1], epsilon=2.0, steps=12, lr=0.3, toward_coef=0, away_coef=1, away_floor=-20
    )
    batch = LatBatch.from_examples(hm, EXAMPLES)
    adversary = train_adversary(hm, batch, config)
    seqs = batch.sequences(("desired",), hm.device)
    with torch.no_grad(), frozen_model(hm):
        from mechunlearn.edit.objectives import sequence_logprobs

        clean = sequence_logprobs(hm, seqs.batch).sum()
        with adversary.active(hm, seqs):
            attacked = sequence_logprobs(hm, seqs.batch).sum()
    assert attacked < clean - 0.5


def test_latent_attack_reports_before_and_after(tiny_llama):
    hm = tiny_llama
    before = {n: p.detach().clone() for n, p in hm.model.named_parameters()}
    examples = lat_examples(10, 23)
    config = LatentAdversaryConfig(layers=[1], epsilon=2.0, steps=15, lr=0.3)
    result = latent_attack(hm, examples, config, seed=0, batch_size=4, progress=False)
    assert result.n_examples == 10 and len(result.success_after) == 10
    assert len(result.epsilons_per_batch) == len(result.losses) == 3  # 4 + 4 + 2 examples
    assert result.after["toward_loss"] < result.before["toward_loss"] - 0.3
    assert result.after["success_rate"] > result.before["success_rate"]
    assert result.after["success_rate"] == sum(result.success_after) / 10
    assert result.after["argmax_rate"] <= result.after["success_rate"] + 1e-9
    site = "blocks.1.resid_post"
    mean_eps = sum(e[site] for e in result.epsilons_per_batch) / 3
    assert result.epsilons[site] == pytest.approx(mean_eps)
    js = result.to_json()
    assert js["success_rate_after"] == result.after["success_rate"]
    for name, p in hm.model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name


def test_success_means_unwanted_more_likely_per_token(tiny_llama):
    """The success flag is the comparison of mean per-token log-probs, computed here directly."""
    from mechunlearn.edit.objectives import sequence_logprobs
    from mechunlearn.models.batches import TargetBatch

    hm = tiny_llama
    examples = [
        LatExample(e.prompt, e.desired, " golf and also tennis on weekends") for e in EXAMPLES
    ]
    batch = LatBatch.from_examples(hm, examples)
    flags = preference_scores(hm, batch)["success"]
    disagree = 0
    for ex, flag in zip(examples, flags, strict=True):
        means, totals = [], []
        for completion in (ex.unwanted, ex.desired):
            tb = TargetBatch.from_pairs(hm, [(ex.prompt, completion)])
            with torch.no_grad():
                totals.append(float(sequence_logprobs(hm, tb)[0]))
            means.append(totals[-1] / tb.n_targets[0])
        assert flag == (means[0] > means[1])
        disagree += (means[0] > means[1]) != (totals[0] > totals[1])
    assert disagree > 0  # the length normalisation matters on these examples


def test_adversary_class_projects_on_construction(tiny_llama):
    batch = LatBatch.from_examples(tiny_llama, EXAMPLES[:2])
    config = LatentAdversaryConfig(layers=[0], epsilon=0.01, epsilon_mode="absolute", init="random")
    adversary = LatentAdversary(
        config, batch, ["blocks.0.resid_post"], {"blocks.0.resid_post": 0.01}, 64, "cpu", seed=3
    )
    assert (adversary.norms()["blocks.0.resid_post"] <= 0.01 * (1 + 1e-5)).all()
