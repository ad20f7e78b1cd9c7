"""The evaluation harness against naive references: option scoring, metrics, LM loss."""

from __future__ import annotations

import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from mechunlearn.errors import ConfigError, DataError, TokenizationError
from mechunlearn.evals import (
    METRICS,
    ItemScore,
    evaluate,
    known_facts,
    lm_loss,
    mean_and_sem,
    per_record,
    score_items,
)
from mechunlearn.evals.harness import summarise_format
from mechunlearn.evals.scoring import count_units
from mechunlearn.tasks import FactRecord, PromptItem, load_general_text, load_sports

FORMATS = ["completion", "mcq", "question", "paraphrase"]


def item(
    record_id: str,
    prompt: str,
    continuations,
    correct: int = 0,
    fmt: str = "test",
    single_token: bool = False,
):
    return PromptItem(
        record_id=record_id,
        format=fmt,
        prompt=prompt,
        continuations=tuple(continuations),
        correct=correct,
        labels=tuple(c.strip() for c in continuations),
        single_token=single_token,
    )


# single-token sports and letters, multi-token " golf" (3) and " tennis" (4) in the tiny vocabulary
ITEMS = [
    item(
        "r0", "Fact: LeBron James plays the sport of", [" baseball", " basketball", " football"], 1
    ),
    item("r1", "The river flows", [" golf", " xylophone quartz", " tennis"], 2),
    item("r2", "Question: Which?\nA. x\nB. y\nAnswer:", [" A", " B"], 0, single_token=True),
    item("r3", "Fact: Tiger Woods plays the sport of", [" baseball", " golf"], 1),
    item(
        "r4",
        "Many migratory birds travel thousands of miles each year to reach their",
        [" winter", " home"],
    ),
    item("r5", "Hi", [" football", " tennis", " basketball", " golf"], 3),
]


@torch.no_grad()
def naive_logprob(hm, prompt: str, continuation: str) -> tuple[float, int]:
    """One unpadded forward of prompt + continuation; sum of the continuation's log-probs."""
    prompt_ids = hm.tokenize(prompt)
    target = hm.tokenize(continuation, add_special_tokens=False)
    ids = torch.tensor([prompt_ids + target], device=hm.device)
    logprobs = hm.model(input_ids=ids).logits[0].float().log_softmax(-1)
    total = sum(logprobs[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(target))
    return total, len(target)


def test_items_mix_single_and_multi_token(tiny_llama):
    lengths = [
        [len(tiny_llama.tokenize(c, add_special_tokens=False)) for c in it.continuations]
        for it in ITEMS
    ]
    assert lengths[0] == [1, 1, 1] and lengths[2] == [1, 1]
    assert lengths[1][0] > 1 and len(set(lengths[1])) > 1  # multi-token, mixed lengths
    assert lengths[3][0] == 1 and lengths[3][1] > 1
    # one sequence for an all-single-token item, one per option otherwise
    expected_units = sum(1 if all(n == 1 for n in ls) else len(ls) for ls in lengths)
    assert count_units(tiny_llama, ITEMS) == expected_units


def test_score_items_matches_naive_reference(tiny):
    by_batch = {bs: score_items(tiny, ITEMS, batch_size=bs) for bs in (1, 4)}
    for bs, scores in by_batch.items():
        assert [s.item for s in scores] == ITEMS
        for s in scores:
            for option, continuation in enumerate(s.item.continuations):
                ref, n = naive_logprob(tiny, s.item.prompt, continuation)
                assert s.n_tokens[option] == n
                assert s.logprobs[option] == pytest.approx(ref, abs=1e-4), (
                    bs,
                    s.item.record_id,
                    continuation,
                )
    for a, b in zip(by_batch[1], by_batch[4], strict=True):
        assert a.n_tokens == b.n_tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def _wide_window_gemma3():
    from mechunlearn.models.handle import HookedModel
    from mechunlearn.testing.tiny_models import TINY_CONFIGS, tiny_tokenizer

    config = TINY_CONFIGS["gemma3"]()
    config.sliding_window = 128
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return HookedModel(model, tiny_tokenizer(), name="tiny-gemma3-wide")


def test_shared_prefix_runs_once_and_scores_as_the_naive_reference(tiny):
    """Prompts with a common one-shot prefix (as the completion format's): the prefix runs once
    into a KV cache and each row continues it, padding masked between prefix and suffix; the
    log-probs equal the unpadded naive forward's (single- and multi-token options). A sliding
    window shorter than the prompts (the tiny Gemma's 8 tokens) counts padding slots, so such
    batches run plainly."""
    _check_shared_prefix(tiny)


def test_shared_prefix_with_sliding_window_layers_that_span_the_prompts():
    """Gemma 3's sliding-window layers with a window wider than the prompts (as the real
    model's 512 tokens): the prefix is shared, and the scores still equal the naive ones."""
    _check_shared_prefix(_wide_window_gemma3())


def _check_shared_prefix(tiny):
    shot = "Fact: Tiger Woods plays the sport of golf\nFact: "
    items = [
        item("a", shot + "Al Bo plays the sport of", [" football", " tennis"], 0),
        item("b", shot + "Cy Dee Eff Gee plays the sport of", [" golf", " basketball"], 1),
        item("c", shot + "Hal plays the sport of", [" cricket", " ice hockey"], 1),
    ]
    widths = []
    embed = tiny.model.get_input_embeddings()
    probe = embed.register_forward_hook(lambda m, a, o: widths.append(tuple(a[0].shape)))
    scores = score_items(tiny, items, batch_size=8)
    probe.remove()
    prefix = len(os.path.commonprefix([tiny.tokenize(i.prompt) for i in items]))
    longest = max(len(tiny.tokenize(i.prompt)) for i in items) + 1
    window = getattr(tiny.model.config, "sliding_window", None)
    if window and longest > window:
        assert all(w[1] >= longest - 1 for w in widths)  # whole prompts
    else:
        assert prefix >= 8 and widths[0] == (1, prefix)  # the shared prefix, once
        assert all(w[1] < longest - prefix + 2 for w in widths[1:])  # suffixes only
    for s in scores:
        for option, continuation in enumerate(s.item.continuations):
            ref, _ = naive_logprob(tiny, s.item.prompt, continuation)
            assert s.logprobs[option] == pytest.approx(ref, abs=1e-4), (s.item.record_id, option)


def test_score_items_advance_counts_units(tiny_llama):
    done = []
    score_items(tiny_llama, ITEMS, batch_size=3, advance=done.append)
    assert sum(done) == count_units(tiny_llama, ITEMS)
    assert max(done) <= 3


def test_single_token_violation_names_continuation(tiny_llama):
    bad = item(
        "sports:X", "Question: Which?\nAnswer:", [" A", " golf"], fmt="mcq", single_token=True
    )
    with pytest.raises(TokenizationError, match=r"' golf'.*sports:X.*3 tokens"):
        score_items(tiny_llama, [ITEMS[0], bad])
    with pytest.raises(TokenizationError, match="single-token"):
        count_units(tiny_llama, [bad])


def test_score_items_without_tokenizer(tiny_llama):
    from mechunlearn.models.handle import HookedModel

    with pytest.raises(TokenizationError, match="no tokenizer"):
        score_items(HookedModel(tiny_llama.model, None, name="bare"), ITEMS)


# ---- ItemScore and metrics -----------------------------------------------------------------


def score(
    record_id: str, logprobs, correct: int = 0, n_tokens=None, fmt: str = "test"
) -> ItemScore:
    k = len(logprobs)
    it = item(record_id, "p", [f" o{i}" for i in range(k)], correct, fmt)
    return ItemScore(it, tuple(logprobs), tuple(n_tokens or [1] * k))


def test_item_score_properties():
    s = score("r", [math.log(0.5), math.log(0.25), math.log(0.125)], correct=1)
    probs = s.renormalised()
    assert sum(probs) == pytest.approx(1.0, abs=1e-12)
    assert probs == pytest.approx([0.5 / 0.875, 0.25 / 0.875, 0.125 / 0.875])
    assert s.prob_renorm == pytest.approx(0.25 / 0.875)
    assert s.prob_full == pytest.approx(0.25)
    assert s.accuracy == 0.0
    assert score("r", [-1.0, -3.0, -2.0], correct=0).accuracy == 1.0
    assert score("r", [-4.0, -1.0], n_tokens=[2, 1]).mean_nll(0) == pytest.approx(2.0)


def test_item_score_properties_on_real_scores(tiny):
    for s in score_items(tiny, ITEMS, batch_size=4):
        assert sum(s.renormalised()) == pytest.approx(1.0, abs=1e-9)
        assert 0.0 < s.prob_full <= s.prob_renorm <= 1.0  # options never hold more than all mass
        assert s.prob_full == pytest.approx(math.exp(s.logprobs[s.correct]))
        assert s.accuracy == float(
            max(range(len(s.logprobs)), key=s.logprobs.__getitem__) == s.correct
        )


def test_true_beats_new_uses_mean_per_token_nll():
    fn = METRICS.get("true_beats_new")
    # true has the lower total log-prob but the lower per-token NLL (2 < 4): true wins
    assert fn(score("r", [-6.0, -4.0], correct=0, n_tokens=[3, 1])) == 1.0
    # true has the higher total log-prob but the higher per-token NLL (2 > 1): new wins
    assert fn(score("r", [-2.0, -3.0], correct=0, n_tokens=[1, 3])) == 0.0
    # the correct index says which option is the true one
    assert fn(score("r", [-4.0, -6.0], correct=1, n_tokens=[1, 3])) == 1.0
    assert fn(score("r", [-1.0, -1.0], correct=0)) == 0.0  # a tie is not a win
    assert math.isnan(fn(score("r", [-1.0, -2.0, -3.0])))  # defined for two options only


def test_metrics_aggregate_per_record_first():
    # record a: three paraphrases, one right; record b: one item, right
    scores = [
        score("a", [-1.0, -2.0], 0),
        score("a", [-2.0, -1.0], 0),
        score("a", [-3.0, -1.0], 0),
        score("b", [-1.0, -5.0], 0),
    ]
    assert per_record(scores, "accuracy") == {"a": pytest.approx(1 / 3), "b": 1.0}
    result = summarise_format("paraphrase", scores, ["accuracy", "prob_renorm"])
    assert result.n_records == 2 and result.n_items == 4
    assert result.chance == pytest.approx(0.5)
    assert result.metrics["accuracy"]["mean"] == pytest.approx(2 / 3)  # not 2/4 over items
    # sem over the two record means: std (ddof=1) / sqrt(2)
    assert result.metrics["accuracy"]["sem"] == pytest.approx(
        abs(1 - 1 / 3) / math.sqrt(2) / math.sqrt(2)
    )
    a_renorm = sum(s.prob_renorm for s in scores[:3]) / 3
    assert result.metrics["prob_renorm"]["mean"] == pytest.approx(
        (a_renorm + scores[3].prob_renorm) / 2
    )


def test_mean_and_sem_edge_cases():
    assert mean_and_sem([1.0, 3.0]) == (2.0, pytest.approx(1.0))
    mean, sem = mean_and_sem([0.5])
    assert mean == 0.5 and math.isnan(sem)
    assert all(math.isnan(v) for v in mean_and_sem([]))
    assert mean_and_sem([1.0, math.nan, 3.0])[0] == 2.0  # NaNs (undefined items) are skipped


def test_unknown_metric():
    with pytest.raises(ConfigError, match="unknown metric 'nope'"):
        per_record([score("a", [-1.0, -2.0])], "nope")


def test_known_facts_threshold():
    scores = [
        score("a", [math.log(0.6), math.log(0.4)], fmt="completion"),
        score("b", [math.log(0.4), math.log(0.6)], fmt="completion"),
        score("c", [math.log(0.5), math.log(0.5)], fmt="completion"),
        score("d", [0.0, -9.0], fmt="mcq"),  # other formats never count
    ]
    known = known_facts(scores, 0.5)
    assert known["known_ids"] == ["a", "c"]
    assert known["n_known"] == 2 and known["n_total"] == 3


# ---- evaluate() end to end -----------------------------------------------------------------


def test_evaluate_end_to_end(tiny_llama):
    records = load_sports()[:12]
    texts = load_general_text()[:3]
    result = evaluate(
        tiny_llama, records, FORMATS, general_text=texts, progress=False, known_threshold=0.34
    )
    assert list(result.formats) == FORMATS
    n_items = {"completion": 12, "mcq": 12, "question": 12, "paraphrase": 36}
    assert len(result.scores) == sum(n_items.values())
    for name, fr in result.formats.items():
        assert fr.format == name
        assert fr.n_records == 12 and fr.n_items == n_items[name]
        assert fr.chance == pytest.approx(1 / 3)
        assert set(fr.metrics) == {"accuracy", "prob_renorm", "prob_full"}
        for metric, stat in fr.metrics.items():
            mine = [s for s in result.scores if s.item.format == name]
            expected = sum(per_record(mine, metric).values()) / 12
            assert stat["mean"] == pytest.approx(expected)
            assert 0.0 <= stat["mean"] <= 1.0 and stat["sem"] >= 0.0
    # known facts agree with the per-record completion probabilities
    completion = per_record(
        [s for s in result.scores if s.item.format == "completion"], "prob_renorm"
    )
    expected_known = sorted(r for r, p in completion.items() if p >= 0.34)
    assert result.known["known_ids"] == expected_known
    assert result.known["n_known"] == len(expected_known) and result.known["n_total"] == 12
    assert result.known["format"] == "completion" and result.known["threshold"] == 0.34
    assert result.counterfact is None  # sports facts define no edit target
    assert result.lm == pytest.approx(lm_loss(tiny_llama, texts))
    payload = result.to_json()
    assert set(payload) >= {"formats", "known", "counterfact", "lm_loss"}
    assert payload["formats"]["mcq"]["n_items"] == 12 and "accuracy" in payload["formats"]["mcq"]
    rows = result.item_rows()
    assert len(rows) == len(result.scores)
    assert {
        "record_id",
        "format",
        "prompt",
        "labels",
        "correct",
        "logprobs",
        "n_tokens",
        "prob_renorm",
    } <= set(rows[0])


def test_evaluate_counterfact_and_no_extras(tiny_llama):
    records = [
        FactRecord(
            id=f"cf:{i}",
            subject=subject,
            template="Fact: {subject} plays the sport of",
            answer=true,
            options=(true, new),
            new_answer=new,
        )
        for i, (subject, true, new) in enumerate(
            [("LeBron James", "basketball", "golf"), ("Tom Brady", "football", "baseball")]
        )
    ]
    result = evaluate(
        tiny_llama, records, ["completion", "mcq"], progress=False, known_threshold=None
    )
    assert result.known is None and result.lm is None
    assert set(result.counterfact) == {
        "completion"
    }  # mcq letters say nothing about P(true) vs P(new)
    per = per_record([s for s in result.scores if s.item.format == "completion"], "true_beats_new")
    assert result.counterfact["completion"] == pytest.approx(sum(per.values()) / 2)


def test_evaluate_empty_records(tiny_llama):
    with pytest.raises(DataError, match="empty"):
        evaluate(tiny_llama, [], ["completion"], progress=False)


def test_evaluate_format_with_no_prompts(tiny_llama):
    record = FactRecord(
        id="x", subject="Bob", template="{subject} plays", answer="golf", options=("golf", "chess")
    )
    with pytest.raises(DataError, match="no prompts"):
        evaluate(tiny_llama, [record], ["paraphrase"], progress=False)


# ---- lm_loss -------------------------------------------------------------------------------


@torch.no_grad()
def naive_lm_loss(hm, texts):
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([hm.tokenize(text)], device=hm.device)
        logits = hm.model(input_ids=ids).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count, count


def test_lm_loss_matches_naive(tiny):
    texts = [
        *load_general_text()[:2],
        "Short one.",
        "A much longer sentence about the weather and the hills.",
    ]
    ref, count = naive_lm_loss(tiny, texts)
    for bs in (1, 3):
        out = lm_loss(tiny, texts, batch_size=bs)
        assert out["tokens"] == count
        assert out["loss"] == pytest.approx(ref, abs=1e-4)
        assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))


def test_lm_loss_is_token_weighted(tiny_llama):
    texts = ["Hi there.", load_general_text()[0]]
    per_text = [naive_lm_loss(tiny_llama, [t]) for t in texts]
    weighted = sum(loss * n for loss, n in per_text) / sum(n for _, n in per_text)
    assert lm_loss(tiny_llama, texts)["loss"] == pytest.approx(weighted, abs=1e-5)
    with pytest.raises(ValueError, match="at least one text"):
        lm_loss(tiny_llama, [])
