"""Tests for tasks: loaders, prompt formats, splits and their error messages."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.tasks import (
    FORMATS,
    SPORTS,
    SPORTS_SHOT,
    TASKS,
    FactRecord,
    Split,
    filter_known,
    format_records,
    get_formatter,
    load_counterfact,
    load_general_text,
    load_sports,
    load_task,
    split_by_group,
    split_random,
)
from mechunlearn.tasks.formats import capitalize_answer, dash_answer
from mechunlearn.tasks.sports import make_record

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHIPPED = Path(__file__).resolve().parents[1] / "src" / "mechunlearn" / "tasks" / "data"


# --- fixtures -------------------------------------------------------------------------------


def cf_raw(case_id: int = 0, **rewrite_overrides: object) -> dict:
    """A minimal valid CounterFact record in the ROME schema."""
    rewrite = {
        "prompt": "The mother tongue of {} is",
        "relation_id": "P103",
        "subject": "Danielle Darrieux",
        "target_new": {"id": "Q1860", "str": "English"},
        "target_true": {"id": "Q150", "str": "French"},
    }
    rewrite.update(rewrite_overrides)
    return {
        "case_id": case_id,
        "pararel_idx": 2796,
        "requested_rewrite": rewrite,
        "paraphrase_prompts": [
            "Danielle Darrieux, a native",
            "Danielle Darrieux spoke the language",
        ],
        "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
        "attribute_prompts": [],
        "generation_prompts": [],
    }


def write_json(tmp_path: Path, data: object, name: str = "cf.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def write_text(tmp_path: Path, text: str, name: str = "athletes.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def sports_record() -> FactRecord:
    return make_record("LeBron James", "basketball")


@pytest.fixture
def cf_record(tmp_path: Path) -> FactRecord:
    return load_counterfact(write_json(tmp_path, [cf_raw()]))[0]


def many_sports() -> list[FactRecord]:
    return [make_record(f"Athlete {i}", SPORTS[i % 3]) for i in range(30)]


# --- sports loader --------------------------------------------------------------------------


def test_sports_record_fields(sports_record: FactRecord) -> None:
    r = sports_record
    assert r.id == "sports:LeBron James"
    assert r.prompt() == "Fact: LeBron James plays the sport of"
    assert r.options == SPORTS == ("baseball", "basketball", "football")
    assert r.answer == "basketball"
    assert r.relation == "sport"
    assert r.question == "What sport does {subject} play?"
    assert r.new_answer is None and r.neighborhood == ()
    assert 2 <= len(r.paraphrases) <= 3
    assert all("LeBron James" in p and "{subject}" not in p for p in r.paraphrases)
    assert "LeBron James is a professional athlete who plays" in r.paraphrases


def test_load_sports_csv(tmp_path: Path) -> None:
    path = write_text(
        tmp_path,
        "athlete,sport,extra\nLeBron James,basketball,x\n Mike Trout , Baseball ,y\n"
        "LeBron James,basketball,z\n",
    )
    records = load_sports(path)
    assert [r.subject for r in records] == ["LeBron James", "Mike Trout"]
    assert [r.answer for r in records] == ["basketball", "baseball"]
    assert load_sports(str(path)) == records


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("", ["empty"]),
        ("athlete,sport\n", ["no data rows"]),
        ("name,sport\nA,football\n", ["athlete", "needs athlete, sport", "found name, sport"]),
        ("athlete,sport\nA,football\n,baseball\n", ["line 3", "blank"]),
        ("athlete,sport\nA,golf\n", ["line 2", "'golf'", "baseball, basketball, football"]),
        ("athlete,sport\nA,football\n", []),
        ("athlete,sport\nA,football\nB,baseball\nA,baseball\n", ["line 4", "line 2", "'A'"]),
        ("athlete,sport\nA\n", ["line 2", "''"]),
    ],
)
def test_load_sports_errors(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write_text(tmp_path, text)
    if not fragments:
        assert len(load_sports(path)) == 1
        return
    with pytest.raises(DataError) as info:
        load_sports(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_load_sports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_sports(tmp_path / "nope.csv")


def test_shipped_sports_data() -> None:
    if not (SHIPPED / "athletes.csv").is_file():
        pytest.skip("shipped athletes.csv not written yet")
    records = load_sports()
    assert len(records) >= 300
    assert {r.answer for r in records} == set(SPORTS)
    assert len({r.id for r in records}) == len(records)


def test_shared_sports_data() -> None:
    path = SHARED / "sports_athletes.csv"
    if not path.is_file():
        pytest.skip("shared sports data not available")
    records = load_sports(path)
    assert len(records) == 1559
    counts = {s: sum(r.answer == s for r in records) for s in SPORTS}
    assert counts == {"football": 583, "basketball": 490, "baseball": 486}


# --- CounterFact loader ---------------------------------------------------------------------


def test_counterfact_record_fields(cf_record: FactRecord) -> None:
    r = cf_record
    assert r.id == "counterfact:0"
    assert r.subject == "Danielle Darrieux"
    assert r.template == "The mother tongue of {subject} is"
    assert r.prompt() == "The mother tongue of Danielle Darrieux is"
    assert r.answer == "French" and r.new_answer == "English"
    assert r.options == ("French", "English")
    assert r.relation == "P103"
    assert r.question is None
    assert r.paraphrases == ("Danielle Darrieux, a native", "Danielle Darrieux spoke the language")
    assert r.neighborhood == ("The mother tongue of Léon Blum is",)


def test_counterfact_strips_template_and_targets(tmp_path: Path) -> None:
    raw = cf_raw(
        prompt="{} was born in ", target_true={"str": " Paris"}, target_new={"str": "Rome"}
    )
    record = load_counterfact(write_json(tmp_path, [raw]))[0]
    assert record.template == "{subject} was born in"
    assert record.answer == "Paris"


def test_counterfact_optional_prompt_lists(tmp_path: Path) -> None:
    raw = cf_raw()
    del raw["paraphrase_prompts"], raw["neighborhood_prompts"]
    record = load_counterfact(write_json(tmp_path, [raw]))[0]
    assert record.paraphrases == () and record.neighborhood == ()


def _without(key: str) -> dict:
    raw = cf_raw(case_id=7)
    del raw["requested_rewrite"][key]
    return raw


@pytest.mark.parametrize(
    ("data", "fragments"),
    [
        ({"a": 1}, ["must be a JSON list"]),
        ([], ["no records"]),
        ([cf_raw(), "x"], ["record 1", "object"]),
        ([{"requested_rewrite": {}}], ["record 0", "'case_id'"]),
        ([{"case_id": 3}], ["case_id 3", "'requested_rewrite'"]),
        ([_without("prompt")], ["case_id 7", "'requested_rewrite.prompt'"]),
        ([_without("subject")], ["'requested_rewrite.subject'"]),
        ([_without("target_true")], ["'requested_rewrite.target_true'"]),
        ([_without("target_new")], ["'requested_rewrite.target_new'"]),
        ([cf_raw(target_new={"id": "Q1"})], ["'requested_rewrite.target_new.str'"]),
        ([cf_raw(target_true="French")], ["'requested_rewrite.target_true'", "object"]),
        ([cf_raw(prompt="The mother tongue is")], ["'{}'", "exactly one"]),
        ([cf_raw(target_new={"str": "French "})], ["target_true and target_new", "'French'"]),
        ([cf_raw(subject="  ")], ["record 0", "invalid record"]),
        ([cf_raw(), cf_raw()], ["record 1", "duplicate id counterfact:0"]),
        ([{**cf_raw(), "paraphrase_prompts": "x"}], ["'paraphrase_prompts'", "list of strings"]),
    ],
)
def test_counterfact_errors(tmp_path: Path, data: object, fragments: list[str]) -> None:
    path = write_json(tmp_path, data)
    with pytest.raises(DataError) as info:
        load_counterfact(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message


def test_counterfact_missing_file_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_counterfact(tmp_path / "missing.json")
    bad = write_text(tmp_path, "[{", name="bad.json")
    with pytest.raises(DataError, match="invalid JSON"):
        load_counterfact(bad)


def test_shared_counterfact_data() -> None:
    path = SHARED / "counterfact_subset.json"
    if not path.is_file():
        pytest.skip("shared CounterFact data not available")
    records = load_counterfact(path)
    assert len(records) == 2189
    first = records[0]
    assert first.prompt() == "The mother tongue of Danielle Darrieux is"
    assert first.options == ("French", "English")
    assert all(len(r.paraphrases) == 2 and len(r.neighborhood) == 10 for r in records)


# --- formats --------------------------------------------------------------------------------


def items_of(name: str, record: FactRecord, seed: int = 0, **options: object):
    return get_formatter(name, **options).items(record, random.Random(seed))


def test_registered_formats() -> None:
    assert FORMATS.names() == [
        "capitalized",
        "completion",
        "dashed",
        "mcq",
        "options_word",
        "paraphrase",
        "question",
    ]
    for name in FORMATS:
        assert get_formatter(name).name == name


def test_completion_sports(sports_record: FactRecord) -> None:
    (item,) = items_of("completion", sports_record)
    assert (
        item.prompt
        == "Fact: Tiger Woods plays the sport of golf\nFact: LeBron James plays the sport of"
    )
    assert item.prompt == SPORTS_SHOT + sports_record.prompt()
    assert item.continuations == (" baseball", " basketball", " football")
    assert item.labels == SPORTS
    assert item.correct == 1
    assert item.format == "completion" and item.record_id == "sports:LeBron James"
    assert item.single_token is False


def test_completion_counterfact_and_options(cf_record: FactRecord, sports_record) -> None:
    (item,) = items_of("completion", cf_record)
    assert item.prompt == "The mother tongue of Danielle Darrieux is"
    assert item.continuations == (" French", " English")
    assert item.correct == 0 and item.labels == ("French", "English")
    (custom,) = items_of("completion", cf_record, shot="Fact: X\n")
    assert custom.prompt == "Fact: X\nThe mother tongue of Danielle Darrieux is"
    (bare,) = items_of("completion", sports_record, few_shot=False)
    assert bare.prompt == "Fact: LeBron James plays the sport of"


def test_question_formats(sports_record: FactRecord, cf_record: FactRecord) -> None:
    (item,) = items_of("question", sports_record)
    assert item.prompt == "Question: What sport does LeBron James play?\nAnswer:"
    assert item.continuations == (" baseball", " basketball", " football")
    assert item.correct == 1
    (cf_item,) = items_of("question", cf_record)
    assert cf_item.prompt == (
        "Question: Complete the sentence: The mother tongue of Danielle Darrieux is ...\nAnswer:"
    )
    assert cf_item.continuations == (" French", " English") and cf_item.correct == 0


def test_mcq_fixed(sports_record: FactRecord, cf_record: FactRecord) -> None:
    (item,) = items_of("mcq", sports_record)
    assert item.prompt == (
        "Question: What sport does LeBron James play?\n"
        "A. baseball\nB. basketball\nC. football\nAnswer:"
    )
    assert item.continuations == (" A", " B", " C")
    assert item.labels == SPORTS and item.correct == 1
    assert item.single_token is True
    (cf_item,) = items_of("mcq", cf_record)
    assert cf_item.prompt == (
        "Question: Complete the sentence: The mother tongue of Danielle Darrieux is ...\n"
        "A. French\nB. English\nAnswer:"
    )
    assert cf_item.continuations == (" A", " B") and cf_item.correct == 0


def _letter_lines(prompt: str) -> dict[str, str]:
    lines = prompt.split("\n")[1:-1]
    return {line[0]: line[3:] for line in lines}


def test_mcq_shuffle_consistent_and_reproducible(sports_record: FactRecord) -> None:
    seen = set()
    for seed in range(20):
        (item,) = items_of("mcq", sports_record, seed=seed, option_order="shuffle")
        shown = _letter_lines(item.prompt)
        assert tuple(shown.values()) == item.labels
        assert sorted(item.labels) == sorted(SPORTS)
        assert item.labels[item.correct] == "basketball"
        assert item.continuations[item.correct] == " " + "ABC"[item.correct]
        again = items_of("mcq", sports_record, seed=seed, option_order="shuffle")
        assert again == [item]
        seen.add(item.labels)
    assert len(seen) > 1


def test_mcq_all_orders(sports_record: FactRecord) -> None:
    items = items_of("mcq", sports_record, option_order="all")
    assert len(items) == 6
    assert len({i.labels for i in items}) == 6
    assert all(i.labels[i.correct] == "basketball" for i in items)


def test_options_word_lists_the_options_and_is_answered_by_the_word(sports_record) -> None:
    (item,) = items_of("options_word", sports_record)
    assert item.prompt == (
        "Question: What sport does LeBron James play?\n"
        "Options: baseball, basketball, football\nAnswer:"
    )
    assert item.continuations == (" baseball", " basketball", " football")
    assert item.labels[item.correct] == "basketball" and not item.single_token
    every = items_of("options_word", sports_record, option_order="all")
    listed = {i.prompt.split("Options: ")[1].split("\n")[0] for i in every}
    assert len(every) == 6 and len(listed) == 6
    assert all(i.labels[i.correct] == "basketball" for i in every)  # the words, not the order
    with pytest.raises(ConfigError, match="unknown option_order 'x' for options_word"):
        get_formatter("options_word", option_order="x")


def test_capitalized_format_capitalises_the_example_and_the_options(sports_record) -> None:
    (item,) = items_of("capitalized", sports_record)
    assert item.prompt == (
        "Fact: Tiger Woods plays the sport of Golf\nFact: LeBron James plays the sport of"
    )
    assert item.continuations == (" Baseball", " Basketball", " Football")
    assert item.labels[item.correct] == "basketball"
    # with golf among the options (an edit target) the example switches sport, capitalised too
    golf = sports_record.model_copy(update={"options": (*sports_record.options, "golf")})
    (item,) = items_of("capitalized", golf)
    assert item.prompt.startswith("Fact: Serena Williams plays the sport of Tennis\n")
    assert capitalize_answer("BBC") == "BBC" and capitalize_answer("ice hockey") == "Ice hockey"


def test_dashed_format_spells_every_option_and_drops_the_subjects_own_example(
    sports_record,
) -> None:
    (item,) = items_of("dashed", sports_record)
    assert item.continuations == (" b-a-s-e-b-a-l-l", " b-a-s-k-e-t-b-a-l-l", " f-o-o-t-b-a-l-l")
    assert item.labels[item.correct] == "basketball"
    lines = item.prompt.split("\n")
    assert lines[-1] == "Fact: LeBron James plays the sport of"
    assert "Fact: Tom Brady plays the sport of f-o-o-t-b-a-l-l" in lines
    assert not any("LeBron" in line for line in lines[:-1])  # its own example is left out
    assert len(lines) == 4
    other = make_record("Someone Else", "football")
    assert len(items_of("dashed", other)[0].prompt.split("\n")) == 5
    assert dash_answer("ice hockey") == "i-c-e h-o-c-k-e-y"


def test_paraphrase_format(sports_record: FactRecord, cf_record: FactRecord) -> None:
    items = items_of("paraphrase", sports_record)
    assert [i.prompt for i in items] == list(sports_record.paraphrases)
    assert all(i.continuations == (" baseball", " basketball", " football") for i in items)
    assert all(i.correct == 1 and i.format == "paraphrase" for i in items)
    cf_items = items_of("paraphrase", cf_record)
    assert [i.prompt for i in cf_items] == [
        "Danielle Darrieux, a native",
        "Danielle Darrieux spoke the language",
    ]
    assert all(i.correct == 0 for i in cf_items)
    bare = cf_record.model_copy(update={"paraphrases": ()})
    assert items_of("paraphrase", bare) == []


def test_get_formatter_errors() -> None:
    with pytest.raises(
        ConfigError, match="known: capitalized, completion, dashed, mcq, options_word, paraphrase"
    ):
        get_formatter("cloze")
    with pytest.raises(ConfigError, match="option_order"):
        get_formatter("mcq", option_order="random")
    with pytest.raises(ConfigError, match="accepted: option_order"):
        get_formatter("mcq", shuffle=True)
    with pytest.raises(ConfigError, match="accepted: "):
        get_formatter("question", few_shot=2)


def test_format_records_deterministic_and_order_free() -> None:
    records = many_sports()
    names = ["completion", "mcq", "question", "paraphrase"]
    opts = {"mcq": {"option_order": "shuffle"}}
    first = format_records(records, names, seed=3, options=opts)
    assert first == format_records(records, names, seed=3, options=opts)
    assert len(first) == len(records) * (1 + 1 + 1 + 3)
    assert [i.format for i in first[: len(records)]] == ["completion"] * len(records)
    reversed_items = format_records(records[::-1], ["mcq"], seed=3, options=opts)
    mcq = [i for i in first if i.format == "mcq"]
    assert sorted(reversed_items, key=lambda i: i.record_id) == sorted(
        mcq, key=lambda i: i.record_id
    )
    other = format_records(records, ["mcq"], seed=4, options=opts)
    assert other != mcq


def test_format_records_accepts_instances_and_strings(sports_record: FactRecord) -> None:
    fmt = get_formatter("completion", few_shot=False)
    (item,) = format_records([sports_record], [fmt])
    assert item.prompt == sports_record.prompt()
    assert len(format_records([sports_record], "question")) == 1
    with pytest.raises(ConfigError, match="no prompt formats"):
        format_records([sports_record], [])
    with pytest.raises(ConfigError, match="unknown prompt format"):
        format_records([sports_record], ["nope"])


# --- splits and filtering -------------------------------------------------------------------


def test_split_by_group() -> None:
    records = many_sports()
    split = split_by_group(records, "football")
    assert isinstance(split, Split)
    assert len(split.forget) == 10 and all(r.answer == "football" for r in split.forget)
    assert len(split.retain) == 20 and all(r.answer != "football" for r in split.retain)
    by_subject = split_by_group(records, "Athlete 0", key=lambda r: r.subject)
    assert [r.subject for r in by_subject.forget] == ["Athlete 0"]
    forget_ids, retain_ids = split.ids()
    assert set(forget_ids).isdisjoint(retain_ids)


def test_split_by_group_errors() -> None:
    records = many_sports()
    with pytest.raises(DataError, match="available: baseball, basketball, football"):
        split_by_group(records, "golf")
    only_football = [r for r in records if r.answer == "football"]
    with pytest.raises(DataError, match="retain split is empty"):
        split_by_group(only_football, "football")
    with pytest.raises(DataError, match="empty"):
        split_by_group([], "football")


def test_split_random() -> None:
    records = many_sports()
    split = split_random(records, 7, seed=1)
    assert len(split.forget) == 7 and len(split.retain) == 23
    assert {r.id for r in split.forget} | {r.id for r in split.retain} == {r.id for r in records}
    assert split_random(records, 7, seed=1) == split
    assert {r.id for r in split_random(records[::-1], 7, seed=1).forget} == {
        r.id for r in split.forget
    }
    assert split_random(records, 7, seed=2).forget != split.forget


@pytest.mark.parametrize("n", [0, -1, 30, 31])
def test_split_random_bad_sizes(n: int) -> None:
    with pytest.raises(DataError, match="n_forget"):
        split_random(many_sports(), n, seed=0)


def test_split_random_non_integer() -> None:
    with pytest.raises(ConfigError):
        split_random(many_sports(), 2.5, seed=0)  # type: ignore[arg-type]


def test_filter_known() -> None:
    records = many_sports()[:3]
    scores = {records[0].id: 0.9, records[1].id: 0.5, records[2].id: 0.1}
    assert filter_known(records, scores, 0.5) == records[:2]
    with pytest.raises(DataError, match="knows none of the 3 facts at threshold 0.95"):
        filter_known(records, scores, 0.95)
    with pytest.raises(DataError, match=r"1 record\(s\) have no score: sports:Athlete 2"):
        filter_known(records, {records[0].id: 0.9, records[1].id: 0.9}, 0.5)
    with pytest.raises(ConfigError):
        filter_known(records, scores, 1.5)


# --- general text and task registry ---------------------------------------------------------


def test_general_text(tmp_path: Path) -> None:
    path = write_text(tmp_path, "The sky is blue.\n\n  Water is wet.  \n", name="t.txt")
    assert load_general_text(path) == ["The sky is blue.", "Water is wet."]
    with pytest.raises(DataError, match="empty"):
        load_general_text(write_text(tmp_path, "\n  \n", name="e.txt"))
    with pytest.raises(DataError, match="not found"):
        load_general_text(tmp_path / "missing.txt")


def test_shipped_general_text() -> None:
    if not (SHIPPED / "general_text.txt").is_file():
        pytest.skip("shipped general_text.txt not written yet")
    lines = load_general_text()
    assert lines and all(line.strip() == line and line for line in lines)


def test_task_registry(tmp_path: Path) -> None:
    assert TASKS.names() == ["counterfact", "sports"]
    cf = load_task("counterfact", str(write_json(tmp_path, [cf_raw()])))
    assert [r.id for r in cf] == ["counterfact:0"]
    sports = load_task("sports", write_text(tmp_path, "athlete,sport\nA,football\n"))
    assert [r.id for r in sports] == ["sports:A"]
    with pytest.raises(DataError, match="--data"):
        load_task("counterfact")
    with pytest.raises(ConfigError, match="known: counterfact, sports"):
        load_task("zsre")


def test_one_shot_example_is_never_one_of_the_options(sports_record):
    from mechunlearn.tasks.formats import default_shot

    assert default_shot(sports_record) == SPORTS_SHOT  # golf is not a sports option
    with_golf = sports_record.model_copy(update={"options": sports_record.options + ("golf",)})
    shot = default_shot(with_golf)
    assert "golf" not in shot and "tennis" in shot
    prompt = format_records([with_golf], ["completion"])[0].prompt
    assert prompt.startswith(shot)
