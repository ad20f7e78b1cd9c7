"""Fact sets of an editing experiment, edit targets, per-format edit metrics and the config."""

from __future__ import annotations

import pytest

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.evals.edit_metrics import edit_metrics
from mechunlearn.evals.scoring import ItemScore
from mechunlearn.experiments.config import validate_config
from mechunlearn.experiments.edit_config import (
    EditTarget,
    ExperimentConfig,
    FactSelection,
    resolve_config,
    shipped_configs,
)
from mechunlearn.experiments.fact_sets import (
    FactSets,
    add_options,
    split_experiment_facts,
    with_targets,
)
from mechunlearn.tasks.records import PromptItem
from mechunlearn.tasks.sports import load_sports

RECORDS = load_sports()


def selection(**kw) -> FactSelection:
    base = dict(
        n_forget=8, n_validation=6, n_validation_retain=10, n_retain_train=20, n_retain_eval=15
    )
    return FactSelection(**(base | kw))


def test_sets_are_disjoint_and_validation_is_shared_across_seeds():
    facts = split_experiment_facts(RECORDS, selection())
    val_ids = {r.id for r in facts.validation.forget} | {r.id for r in facts.validation.retain_eval}
    seen_forget = []
    for seed in (0, 1, 2):
        sets = facts.for_seed(seed)
        ids = [
            set(map(lambda r: r.id, x)) for x in (sets.forget, sets.retain_train, sets.retain_eval)
        ]
        assert [len(i) for i in ids] == [8, 20, 15]
        assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
        assert not (set().union(*ids) & val_ids)
        seen_forget.append(ids[0])
    assert seen_forget[0] != seen_forget[1]  # seeds vary the facts
    again = split_experiment_facts(list(reversed(RECORDS)), selection()).for_seed(1)
    assert {r.id for r in again.forget} == seen_forget[1]  # order of the data does not matter


def test_group_selection_forgets_only_that_answer():
    facts = split_experiment_facts(RECORDS, selection(forget_group="basketball", max_forget=12))
    sets = facts.for_seed(0)
    assert len(sets.forget) == 12 and all(r.answer == "basketball" for r in sets.forget)
    assert all(r.answer != "basketball" for r in sets.retain_train + sets.retain_eval)
    assert all(r.answer == "basketball" for r in facts.validation.forget)


def test_not_enough_known_facts_is_a_clear_error():
    with pytest.raises(DataError, match="not enough known facts"):
        split_experiment_facts(RECORDS[:20], selection()).for_seed(0)
    with pytest.raises(DataError, match="no known fact has the answer 'golf'"):
        split_experiment_facts(RECORDS, selection(forget_group="golf"))


def test_overlapping_sets_are_rejected():
    with pytest.raises(DataError, match="both the forget and the retain_eval"):
        FactSets(RECORDS[:3], RECORDS[5:8], RECORDS[2:4]).check()
    with pytest.raises(DataError, match="forget set is empty"):
        FactSets([], RECORDS[:3], RECORDS[3:5]).check()


def test_targets_other_option_and_fixed():
    edited = with_targets(RECORDS[:30], EditTarget(kind="other_option"), seed=0)
    assert all(r.new_answer in r.options and r.new_answer != r.answer for r in edited)
    assert with_targets(RECORDS[:30], EditTarget(kind="other_option"), seed=0) == edited
    golf = with_targets(
        add_options(RECORDS[:5], ["golf"]), EditTarget(kind="fixed", value="golf"), 0
    )
    assert all(r.new_answer == "golf" and r.options[-1] == "golf" for r in golf)
    with pytest.raises(DataError, match="no new_answer"):
        with_targets(RECORDS[:2], EditTarget(kind="dataset"), 0)


def _score(record_id: str, fmt: str, labels, logprobs, correct=0) -> ItemScore:
    item = PromptItem(
        record_id=record_id,
        format=fmt,
        prompt="p",
        continuations=tuple(" " + x for x in labels),
        correct=correct,
        labels=tuple(labels),
    )
    return ItemScore(item, tuple(logprobs), tuple(1 for _ in labels))


def test_edit_metrics_read_new_and_original_from_one_score():
    labels = ("baseball", "basketball", "football")
    scores = [
        _score("a", "completion", labels, (-3.0, -0.1, -4.0)),  # a: baseball -> basketball, edited
        _score(
            "b", "completion", labels, (-0.1, -3.0, -4.0)
        ),  # b: baseball -> football, not edited
        _score("zz", "completion", labels, (0.0, 0.0, 0.0)),  # not an edited fact: ignored
    ]
    out = edit_metrics(scores, {"a": ("baseball", "basketball"), "b": ("baseball", "football")})
    m = out["completion"]
    assert m["edit_success"]["mean"] == pytest.approx(0.5)
    assert m["original_accuracy"]["mean"] == pytest.approx(0.5)
    import math

    pa = [math.exp(x) for x in (-3.0, -0.1, -4.0)]
    pb = [math.exp(x) for x in (-0.1, -3.0, -4.0)]
    expected_new = (pa[1] / sum(pa) + pb[2] / sum(pb)) / 2
    assert m["p_new"]["mean"] == pytest.approx(expected_new)
    with pytest.raises(DataError, match="must contain both"):
        edit_metrics(scores, {"a": ("baseball", "golf")})


def test_config_rejects_unknown_keys_and_inconsistent_modes():
    with pytest.raises(ConfigError, match="trian: Extra inputs"):
        validate_config(ExperimentConfig, {"trian": {}}, "t")
    with pytest.raises(ConfigError, match="mode 'unlearn' needs an unlearning objective"):
        validate_config(ExperimentConfig, {"mode": "unlearn"}, "t")
    with pytest.raises(ConfigError, match="hyperparameters for every localization"):
        validate_config(ExperimentConfig, {"sweep": None}, "t")
    with pytest.raises(ConfigError, match="unknown localization method|localization method"):
        validate_config(ExperimentConfig, {"localizations": [{"name": "x", "method": "nope"}]}, "t")
    with pytest.raises(ConfigError, match="target.value"):
        validate_config(ExperimentConfig, {"target": {"kind": "fixed"}}, "t")


def test_shipped_configs_validate():
    from mechunlearn.experiments.config import load_yaml_config

    names = shipped_configs()
    assert {
        "sports-athlete-edit-16",
        "sports-sport-to-golf",
        "sports-unlearn-sport",
        "counterfact-edit-16",
    } <= set(names)
    for name in [n for n in names if not n.startswith("lat-")]:  # LAT: test_lat_experiment.py
        cfg = load_yaml_config(ExperimentConfig, resolve_config(name))
        names = [spec.name for spec in cfg.localizations]
        assert len(cfg.seeds) >= 3
        # every experiment compares fact lookup with the output-tracing localizations
        assert {"fact_lookup", "causal_tracing", "attribution_patching"} <= set(names)
    decisive = load_yaml_config(ExperimentConfig, resolve_config("sports-athlete-edit-64"))
    assert len(decisive.seeds) >= 5 and decisive.facts.n_forget == 64
    assert decisive.evaluation.relearn_variants["paper"].lora_rank == 512
    with pytest.raises(ConfigError, match="shipped"):
        resolve_config("no-such-config")
