"""Localization plumbing: prompts and subject spans, pairing, result type, budget selection,
baselines, figures and the ``localize`` command (with a baseline method on a tiny model)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mechunlearn.cli import app
from mechunlearn.errors import ConfigError, DataError
from mechunlearn.localize import (
    LOCALIZERS,
    Localization,
    LocalizeOptions,
    build_fact_prompts,
    pair_corruptions,
)
from mechunlearn.localize.prompts import (
    answer_logit_diff,
    check_same_layout,
    choose_pairable_facts,
    subject_aligned,
    subject_token_span,
)
from mechunlearn.localize.result import select_under_budget
from mechunlearn.report.figures import localization_figures
from mechunlearn.tasks import load_sports
from mechunlearn.tasks.records import FactRecord
from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer


def test_subject_span_tokens(tiny_llama):
    prompt = "Fact: Tiger Woods plays the sport of golf\nFact: LeBron James plays the sport of"
    tokens, span = subject_token_span(tiny_llama, prompt, "LeBron James")
    decoded = tiny_llama.tokenizer.decode([tokens[i] for i in span])
    assert decoded.strip() == "LeBron James"
    with pytest.raises(DataError, match="not found"):
        subject_token_span(tiny_llama, prompt, "Serena Williams")


class MergingTokenizer:
    """Word pieces, but ".'" is one token (as BPE vocabularies often have it)."""

    vocab: dict[str, int] = {}

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        import re

        return [
            self.vocab.setdefault(t, len(self.vocab)) for t in re.findall(r"\.'|\w+|\s|\S", text)
        ]


def test_a_subject_cut_inside_a_token_is_not_aligned():
    def fact(subject):
        return FactRecord(id=subject, subject=subject, template="{subject}'s headquarters are in",
                          answer="Paris", options=("Paris", "Rome"))  # fmt: skip

    hm = MergingTokenizer()
    assert subject_aligned(hm, fact("Acme Holdings"))
    assert not subject_aligned(hm, fact("Trafigura Beheer B.V."))  # "." + "'s" -> ".'" "s"


def test_fact_prompts_positions_in_padded_batch(tiny_llama):
    records = load_sports()[:6]
    prompts = build_fact_prompts(tiny_llama, records)
    ids = prompts.batch.input_ids
    for row, record in enumerate(records):
        text = tiny_llama.tokenizer.decode(ids[row, prompts.subject_positions[row]].tolist())
        assert text.strip() == record.subject
    assert prompts.option_ids.shape == (6, 3)
    assert torch.equal(prompts.answer_ids, prompts.option_ids[torch.arange(6), prompts.correct])
    assert prompts.subject_mask().sum() == sum(len(p) for p in prompts.subject_positions)


def test_logit_diff_metric():
    class P:  # minimal stand-in with the two fields the metric reads
        option_ids = torch.tensor([[0, 1, 2]])
        correct = torch.tensor([1])

    logits = torch.tensor([[1.0, 4.0, 3.0, 100.0]])
    assert answer_logit_diff(logits, P).item() == pytest.approx(4.0 - 2.0)


def test_pair_corruptions_same_layout_different_answer(tiny_llama):
    facts = choose_pairable_facts(tiny_llama, load_sports(), 12, seed=0)
    assert 12 <= len(facts) <= 13
    assert facts == choose_pairable_facts(tiny_llama, load_sports(), 12, seed=0)
    partners = pair_corruptions(tiny_llama, facts, seed=0)
    assert all(p.answer != f.answer for p, f in zip(partners, facts, strict=True))
    check_same_layout(
        build_fact_prompts(tiny_llama, facts), build_fact_prompts(tiny_llama, partners)
    )
    assert partners == pair_corruptions(tiny_llama, facts, seed=0)


def test_layout_mismatch_is_an_error(tiny_llama):
    records = sorted(load_sports(), key=lambda r: len(tiny_llama.tokenize(r.subject)))
    short, long = records[0], records[-1]
    with pytest.raises(DataError, match="different token layouts"):
        check_same_layout(
            build_fact_prompts(tiny_llama, [short]), build_fact_prompts(tiny_llama, [long])
        )


def test_no_partner_is_an_error(tiny_llama):
    lone = [r for r in load_sports() if r.answer == "baseball"][:3]
    with pytest.raises(DataError, match="no corrupting partner"):
        pair_corruptions(tiny_llama, lone)


def test_budget_selection(tiny_llama):
    scores = {"blocks.0.mlp": 3.0, "blocks.1.mlp": 2.0, "blocks.2.attn": 1.0}
    mlp = 3 * 64 * 128
    assert select_under_budget(tiny_llama, scores, budget=mlp) == ["blocks.0.mlp"]
    assert select_under_budget(tiny_llama, scores, budget=2 * mlp) == [
        "blocks.0.mlp",
        "blocks.1.mlp",
    ]
    assert select_under_budget(tiny_llama, scores, budget=None, top_k=1) == ["blocks.0.mlp"]
    with pytest.raises(ConfigError, match="smaller than the smallest component"):
        select_under_budget(tiny_llama, scores, budget=10)


def test_baselines(tiny_llama):
    budget = 3 * 64 * 128
    random_loc = LOCALIZERS.get("random")(tiny_llama, [], LocalizeOptions(budget=budget, seed=1))
    assert random_loc.n_params <= budget
    assert (
        random_loc.selected
        == LOCALIZERS.get("random")(tiny_llama, [], LocalizeOptions(budget=budget, seed=1)).selected
    )
    assert (
        random_loc.selected
        != LOCALIZERS.get("random")(tiny_llama, [], LocalizeOptions(budget=budget, seed=2)).selected
    )
    mlps = LOCALIZERS.get("random_mlps")(tiny_llama, [], LocalizeOptions(budget=budget))
    assert len(mlps.selected) == 1 and mlps.selected[0].endswith(".mlp")
    assert LOCALIZERS.get("all_mlps")(tiny_llama, [], LocalizeOptions()).n_params == 3 * budget
    full = LOCALIZERS.get("nonlocalized")(tiny_llama, [], LocalizeOptions())
    assert full.n_params == sum(
        p.numel()
        for n, p in tiny_llama.model.named_parameters()
        if ".layers." in n and "layernorm" not in n
    )
    with pytest.raises(ConfigError, match="needs a parameter budget"):
        LOCALIZERS.get("random")(tiny_llama, [], LocalizeOptions())
    last = LOCALIZERS.get("last_layer")(tiny_llama, [], LocalizeOptions(budget=budget))
    n_layers = tiny_llama.dims.n_layers
    assert last.selected == [f"blocks.{n_layers - 1}.attn", f"blocks.{n_layers - 1}.mlp"]
    assert last.n_params == sum(
        p.numel()
        for n, p in tiny_llama.model.named_parameters()
        if f".layers.{n_layers - 1}." in n and "layernorm" not in n
    )  # the budget is ignored: this control is defined by its scope


def test_localization_roundtrip_and_model_check(tiny_llama, tmp_path):
    loc = LOCALIZERS.get("random_mlps")(tiny_llama, [], LocalizeOptions(top_k=2))
    loc = loc.model_copy(
        update={
            "position_scores": {"mlp": [[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]},
            "position_labels": ["a", "b"],
        }
    )
    path = loc.save(tmp_path / "loc.json")
    again = Localization.load(path)
    assert again == loc
    again.check_model(tiny_llama)
    from mechunlearn.models import HookedModel

    other = HookedModel(tiny_model("gpt2"), tiny_tokenizer())
    with pytest.raises(ConfigError, match="computed on"):
        again.check_model(other)
    (tmp_path / "bad.json").write_text(json.dumps({"method": "x"}))
    with pytest.raises(DataError, match="not a valid localization"):
        Localization.load(tmp_path / "bad.json")
    figures = localization_figures(loc, tmp_path / "figures")
    assert all(p.is_file() and p.stat().st_size > 1000 for p in figures)


def test_localize_cli_with_baseline(saved_llama, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "localize",
            "--model",
            str(saved_llama),
            "--method",
            "random_mlps",
            "--budget",
            "30000",
            "--all-facts",
            "--n-facts",
            "8",
            "--out",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    loc = Localization.load(out / "localization.json")
    assert loc.method == "random_mlps" and loc.n_facts == 8 and loc.n_params <= 30000
    assert (out / "config.yaml").is_file() and len(
        json.loads((out / "facts.json").read_text())
    ) == 8
    assert list((out / "figures").glob("*.png"))
    # the budget of an earlier localization can be reused
    result = CliRunner().invoke(
        app,
        [
            "localize",
            "--model",
            str(saved_llama),
            "--method",
            "random",
            "--budget-from",
            str(out / "localization.json"),
            "--all-facts",
            "--n-facts",
            "4",
            "--out",
            str(tmp_path / "run2"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert Localization.load(tmp_path / "run2" / "localization.json").budget == loc.n_params


def test_localize_cli_sets_a_methods_own_options(saved_llama, tmp_path):
    out = tmp_path / "run"
    args = ["localize", "--model", str(saved_llama), "--method", "causal_tracing",
            "--budget", "30000", "--all-facts", "--n-facts", "3", "--out", str(out), "--quiet",
            "--set", "method_options.causal_tracing.metric=answer_logprob",
            "--set", "method_options.causal_tracing.window=2"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    loc = Localization.load(out / "localization.json")
    assert loc.evidence["metric"] == "answer_logprob" and loc.evidence["window"] == 2
    assert loc.evidence["method_options"]["noise_scale"] == 3.0  # the rest: the defaults


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "no_such_method"], "unknown localization method"),
        (["--method", "random", "--budget", "5"], "smaller than the smallest component"),
        (["--method", "random", "--budget-from", "missing.json"], "does not exist"),
        (
            ["--method", "causal_tracing", "--set", "method_options.causal_tracing.windw=3"],
            "causal_tracing options: windw",
        ),
        (
            ["--method", "random", "--set", "method_options.tracing.window=3"],
            "unknown localization",
        ),
    ],
)
def test_localize_cli_bad_input(saved_llama, tmp_path, args, message):
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "localize",
            "--model",
            str(saved_llama),
            "--all-facts",
            "--n-facts",
            "4",
            "--out",
            str(out),
            "--quiet",
            *args,
        ],
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not out.exists()


def test_records_fixture_types():
    assert isinstance(load_sports()[0], FactRecord)


def test_default_budget_is_fact_lookups(saved_llama, tmp_path):
    """Without a budget, a method gets fact_lookup's parameter count on the same facts."""
    out = tmp_path / "run"
    args = ["localize", "--model", str(saved_llama), "--method", "random", "--all-facts"]
    result = CliRunner().invoke(
        app, [*args, "--n-facts", "32", "--seed", "0", "--out", str(out), "--quiet"]
    )
    assert result.exit_code == 0, result.output
    loc = Localization.load(out / "localization.json")
    assert loc.evidence["budget_source"].startswith("fact_lookup on the same facts")
    assert loc.budget == 3 * 64 * 128  # fact_lookup selects one tiny MLP here
    assert 0 < loc.n_params <= loc.budget
    # opting out leaves random without a size, which is an error naming the problem
    result = CliRunner().invoke(
        app,
        [*args, "--no-default-budget", "--n-facts", "8", "--out", str(tmp_path / "x"), "--quiet"],
    )
    assert result.exit_code == 2 and "needs a parameter budget" in result.output
