"""Latent-knowledge probes on the planted model, whose sport is decodable only after the
planted lookup MLP (layer 1) at the last subject token."""

from __future__ import annotations

import random

import pytest
import torch

from mechunlearn.errors import DataError
from mechunlearn.evals.latent_probes import latent_probe_accuracy
from mechunlearn.testing.planted import SPORTS, train_planted_model


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(0)
    return train_planted_model(seed=0)


def _split(records, n_forget=20, seed=0):
    records = list(records)
    random.Random(seed).shuffle(records)
    return records[:n_forget], records[n_forget:]


def _with_new_answers(records):
    """Forget facts as an edit would define them: a different sport as ``new_answer``."""
    return [
        r.model_copy(update={"new_answer": SPORTS[(SPORTS.index(r.answer) + 1) % len(SPORTS)]})
        for r in records
    ]


def test_probe_reads_original_answers_where_the_lookup_wrote_them(planted):
    forget, retain = _split(planted.records)
    result = latent_probe_accuracy(planted.hm, _with_new_answers(forget), retain, seed=0)
    layers = result.layers
    assert layers == ["embed", "0", "1", "2", "3"]
    assert len(result.forget_accuracy) == len(layers) == len(result.retain_heldout_accuracy)
    after = layers.index(str(planted.planted_layer))
    # after the planted MLP the ORIGINAL sport is decodable on forget facts (new_answer would
    # give 0 accuracy: it always differs from the answer)
    assert min(result.forget_accuracy[after:]) >= 0.9
    assert min(result.retain_heldout_accuracy[after:]) >= 0.9
    # before it the sport (addition mod 3 of two names) is not linearly decodable
    assert max(result.forget_accuracy[:after]) <= 0.5
    assert result.chance == pytest.approx(1 / 3)
    assert result.n_forget == 20
    assert result.n_retain_train + result.n_retain_heldout == len(retain)
    assert result.skipped_forget_ids == []
    data = result.to_json()
    assert data["forget_accuracy"] == result.forget_accuracy
    assert set(data) >= {"layers", "chance", "retain_heldout_accuracy", "classes"}


def test_final_position_needs_the_extraction_heads(planted):
    forget, retain = _split(planted.records)
    last = latent_probe_accuracy(planted.hm, forget, retain, position="last_subject")
    final = latent_probe_accuracy(planted.hm, forget, retain, position="final")
    # at the final token the sport arrives later than at the subject token
    assert final.forget_accuracy[-1] >= 0.9
    assert final.forget_accuracy[2] < last.forget_accuracy[2]


def test_seed_changes_the_heldout_split_deterministically(planted):
    forget, retain = _split(planted.records)
    a = latent_probe_accuracy(planted.hm, forget, retain, seed=1)
    b = latent_probe_accuracy(planted.hm, forget, retain, seed=1)
    assert a.to_json() == b.to_json()


def test_unseen_forget_answers_are_skipped(planted):
    forget, retain = _split(planted.records)
    retain = [r for r in retain if r.answer != "football"]
    result = latent_probe_accuracy(planted.hm, forget, retain)
    assert result.classes == ["baseball", "basketball"]
    skipped = {r.id for r in forget if r.answer == "football"}
    assert set(result.skipped_forget_ids) == skipped and skipped
    assert result.n_forget == len(forget) - len(skipped)


def test_errors(planted):
    forget, retain = _split(planted.records)
    with pytest.raises(DataError, match="forget list is empty"):
        latent_probe_accuracy(planted.hm, [], retain)
    one_class = [r for r in retain if r.answer == "baseball"]
    with pytest.raises(DataError, match="two different attributes"):
        latent_probe_accuracy(planted.hm, forget, one_class)
    with pytest.raises(DataError, match="both forget and retain"):
        latent_probe_accuracy(planted.hm, forget, retain + forget[:1])
    with pytest.raises(DataError, match="position"):
        latent_probe_accuracy(planted.hm, forget, retain, position="middle")
    basketball = [r for r in forget if r.answer == "basketball"]
    no_basketball = [r for r in retain if r.answer != "basketball"]
    with pytest.raises(DataError, match="none of the"):
        latent_probe_accuracy(planted.hm, basketball, no_basketball)
