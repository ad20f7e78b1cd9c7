"""ROME CounterFact metrics: hand-checked values, item construction, real-model consistency."""

from __future__ import annotations

import math

import pytest
import torch

from mechunlearn.errors import DataError
from mechunlearn.evals import counterfact_metrics as cm
from mechunlearn.evals.scoring import ItemScore
from mechunlearn.tasks.records import FactRecord


def record(i: int, paraphrases=("P{i}a", "P{i}b"), neighborhood=("N{i}a",), new="Rome"):
    return FactRecord(
        id=f"cf:{i}",
        subject=f"Subject{i}",
        template="{subject} is located in",
        answer="Paris",
        options=("Paris", new) if new else ("Paris", "Rome"),
        new_answer=new,
        paraphrases=tuple(p.format(i=i) for p in paraphrases),
        neighborhood=tuple(p.format(i=i) for p in neighborhood),
    )


# per prompt: (log P(true) total, n true tokens, log P(new) total, n new tokens)
TABLE = {
    # record 0: rewrite succeeds (nll_new 1 < nll_true 2), paraphrases 1 of 2, neighbour holds
    "Subject0 is located in": (-2.0, 1, -2.0, 2),
    "P0a": (-1.0, 1, -0.5, 1),
    "P0b": (-0.5, 1, -3.0, 1),
    "N0a": (-0.2, 1, -4.0, 2),
    # record 1: rewrite fails, both paraphrases succeed, one of two neighbours broken
    "Subject1 is located in": (-0.1, 1, -3.0, 1),
    "P1a": (-3.0, 1, -1.0, 1),
    "P1b": (-4.0, 2, -1.0, 1),
    "N1a": (-1.0, 1, -3.0, 1),
    "N1b": (-3.0, 1, -1.0, 1),
}


def fake_score_items(hm, items, batch_size=16):
    out = []
    for item in items:
        lt, nt, ln, nn = TABLE[item.prompt]
        out.append(ItemScore(item, (lt, ln), (nt, nn)))
    return out


def test_hand_checked_values(monkeypatch):
    monkeypatch.setattr(cm, "score_items", fake_score_items)
    records = [record(0), record(1, neighborhood=("N{i}a", "N{i}b"))]
    m = cm.rome_metrics(None, records)
    e = math.exp
    assert m["efficacy_score"] == pytest.approx(0.5)
    assert m["efficacy_magnitude"] == pytest.approx(((e(-1) - e(-2)) + (e(-3) - e(-0.1))) / 2)
    # paraphrases: record 0 -> 1/2, record 1 -> 2/2; averaged per record first
    assert m["paraphrase_score"] == pytest.approx(0.75)
    pm0 = ((e(-0.5) - e(-1)) + (e(-3) - e(-0.5))) / 2
    pm1 = ((e(-1) - e(-3)) + (e(-1) - e(-2))) / 2
    assert m["paraphrase_magnitude"] == pytest.approx((pm0 + pm1) / 2)
    # neighbourhood: true should win; record 0 -> 1, record 1 -> 1/2
    assert m["neighborhood_score"] == pytest.approx(0.75)
    nm0 = e(-0.2) - e(-2.0)
    nm1 = ((e(-1) - e(-3)) + (e(-3) - e(-1))) / 2
    assert m["neighborhood_magnitude"] == pytest.approx((nm0 + nm1) / 2)
    assert m["score"] == pytest.approx(3 / (1 / 0.5 + 1 / 0.75 + 1 / 0.75))
    assert m["neighborhood_n_records"] == 2


def test_per_record_scores_average_each_record_over_its_prompts(monkeypatch):
    monkeypatch.setattr(cm, "score_items", fake_score_items)
    records = [record(0), record(1, neighborhood=("N{i}a", "N{i}b"))]
    per = cm.rome_per_record(None, records)
    assert per["efficacy_score"] == {"cf:0": 1.0, "cf:1": 0.0}
    assert per["paraphrase_score"] == {"cf:0": 0.5, "cf:1": 1.0}
    assert per["neighborhood_score"] == {"cf:0": 1.0, "cf:1": 0.5}
    # the summary is the mean over records of these values
    assert cm.summarize_records(per) == pytest.approx(cm.rome_metrics(None, records))


def test_items_use_rewrite_paraphrase_and_neighbourhood_prompts():
    items = cm.rome_items([record(0)])
    assert [(i.format, i.prompt) for i in items] == [
        ("efficacy", "Subject0 is located in"),
        ("paraphrase", "P0a"),
        ("paraphrase", "P0b"),
        ("neighborhood", "N0a"),
    ]
    for item in items:  # option 0 is the true target, option 1 the new one, spaced
        assert item.continuations == (" Paris", " Rome")


def test_ties_fail_on_both_sides(monkeypatch):
    monkeypatch.setattr(
        cm,
        "score_items",
        lambda hm, items, batch_size=16: [ItemScore(i, (-1.0, -2.0), (1, 2)) for i in items],
    )
    m = cm.rome_metrics(None, [record(0)])
    assert m["efficacy_score"] == 0.0
    assert m["neighborhood_score"] == 0.0
    assert m["score"] == 0.0
    assert m["efficacy_magnitude"] == pytest.approx(0.0)


def test_errors_name_the_problem():
    with pytest.raises(DataError, match="new_answer"):
        cm.rome_items([record(0, new=None)])
    with pytest.raises(DataError, match="paraphrase"):
        cm.rome_items([record(0, paraphrases=())])
    with pytest.raises(DataError, match="neighbourhood"):
        cm.rome_items([record(0, neighborhood=())])
    with pytest.raises(DataError, match="empty"):
        cm.rome_items([])


def _mean_nll(hm, prompt: str, target: str) -> float:
    """Independent check: one unpadded forward over prompt + target tokens."""
    p = hm.tokenize(prompt)
    t = hm.tokenize(" " + target, add_special_tokens=False)
    with torch.no_grad():
        logits = hm.model(torch.tensor([p + t], device=hm.device)).logits[0].float().log_softmax(-1)
    return -sum(logits[len(p) - 1 + j, tok].item() for j, tok in enumerate(t)) / len(t)


def test_matches_direct_computation_on_a_tiny_model(tiny_llama):
    records = [
        FactRecord(
            id="cf:a",
            subject="Danny Green",
            template="{subject} plays the sport of",
            answer="basketball",
            options=("basketball", "football"),
            new_answer="football",
            paraphrases=("Danny Green is good at", "The sport of Danny Green is"),
            neighborhood=("Tim Duncan plays the sport of",),
        ),
        FactRecord(
            id="cf:b",
            subject="Tom Brady",
            template="{subject} is a player of",
            answer="football",
            options=("football", "golf"),
            new_answer="golf",
            paraphrases=("Tom Brady plays",),
            neighborhood=("Peyton Manning plays", "Eli Manning is a player of"),
        ),
    ]
    m = cm.rome_metrics(tiny_llama, records, batch_size=3)
    es, em, ps, pm, ns, nm = [], [], [], [], [], []
    for r in records:

        def probs(prompt, r=r):
            return (
                math.exp(-_mean_nll(tiny_llama, prompt, r.answer)),
                math.exp(-_mean_nll(tiny_llama, prompt, r.new_answer)),
            )

        t, n = probs(r.prompt())
        es.append(float(n > t))
        em.append(n - t)
        pairs = [probs(p) for p in r.paraphrases]
        ps.append(sum(float(n > t) for t, n in pairs) / len(pairs))
        pm.append(sum(n - t for t, n in pairs) / len(pairs))
        pairs = [probs(p) for p in r.neighborhood]
        ns.append(sum(float(t > n) for t, n in pairs) / len(pairs))
        nm.append(sum(t - n for t, n in pairs) / len(pairs))
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    assert m["efficacy_score"] == pytest.approx(mean(es))
    assert m["efficacy_magnitude"] == pytest.approx(mean(em), abs=1e-6)
    assert m["paraphrase_score"] == pytest.approx(mean(ps))
    assert m["paraphrase_magnitude"] == pytest.approx(mean(pm), abs=1e-6)
    assert m["neighborhood_score"] == pytest.approx(mean(ns))
    assert m["neighborhood_magnitude"] == pytest.approx(mean(nm), abs=1e-6)
    # the magnitudes are not trivially zero on a random model
    assert any(abs(v) > 1e-6 for v in em + pm + nm)
