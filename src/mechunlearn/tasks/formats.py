"""Prompt formats: the different ways a fact is put to a model.

Unlearning that only removes one phrasing of a fact is shallow, so every fact is probed in
several formats (cloze completion, question, multiple choice, paraphrases). Each format turns a
``FactRecord`` into ``PromptItem``s that the scorer evaluates identically (probability of each
option's continuation), and is registered by name in ``FORMATS`` so configs pick formats by name
and a new format is one decorated class.
"""

from __future__ import annotations

import inspect
import itertools
import math
import random
import string
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.registry import Registry
from mechunlearn.tasks.records import FactRecord, PromptItem

SPORTS_SHOT = "Fact: Tiger Woods plays the sport of golf\n"
"""One-shot prefix for sports facts: tells a small base model the answer should be a sport."""

SPORTS_SHOTS = (
    ("golf", SPORTS_SHOT),
    ("tennis", "Fact: Serena Williams plays the sport of tennis\n"),
    ("boxing", "Fact: Muhammad Ali plays the sport of boxing\n"),
)
"""Alternatives, so the example's answer is never one of the options it would prime."""

LETTERS = string.ascii_uppercase
OPTION_ORDERS = ("fixed", "shuffle", "all")
MAX_ALL_ORDERS = 120  # option_order="all" emits k! items; refuse beyond 5 options


class PromptFormat(ABC):
    """A way of asking for a fact; ``items`` may use ``rng`` (e.g. to shuffle options)."""

    name: ClassVar[str]

    @abstractmethod
    def items(self, record: FactRecord, rng: random.Random) -> list[PromptItem]:
        """The prompts this format makes for ``record`` (possibly none)."""


FORMATS: Registry[type[PromptFormat]] = Registry("prompt format")


def _register(cls: type[PromptFormat]) -> type[PromptFormat]:
    """Register a format under its own ``name`` so the two cannot drift apart."""
    return FORMATS.register(cls.name)(cls)


def fill(template: str, subject: str) -> str:
    """Insert the subject; ``replace`` rather than ``format`` so braces in data are harmless."""
    return template.replace("{subject}", subject)


def default_shot(record: FactRecord) -> str:
    """The few-shot prefix used when none is configured: for sports facts, a worked example
    whose sport is not among the record's options (an example answer that is also an option
    primes that option: with golf added as an edit target, the golf example would)."""
    if record.relation != "sport":
        return ""
    for answer, shot in SPORTS_SHOTS:
        if answer not in record.options:  # e.g. golf facts (edited to golf) get the tennis shot
            return shot
    raise DataError(f"{record.id}: every one-shot example's sport is among its options")


def question_text(record: FactRecord) -> str:
    """The record's question with the subject filled in, or a sentence-completion fallback."""
    if record.question:
        return fill(record.question, record.subject)
    return f"Complete the sentence: {record.prompt()} ..."


def cloze_item(record: FactRecord, fmt: str, prompt: str) -> PromptItem:
    """An item whose continuations are the options themselves, each after a space."""
    return PromptItem(
        record_id=record.id,
        format=fmt,
        prompt=prompt,
        continuations=tuple(" " + option for option in record.options),
        correct=record.options.index(record.answer),
        labels=record.options,
    )


@_register
class CompletionFormat(PromptFormat):
    """Few-shot cloze: ``shot`` prefix followed by the record's own prompt."""

    name = "completion"

    def __init__(self, shot: str | None = None, few_shot: bool = True) -> None:
        self.shot = shot
        self.few_shot = few_shot

    def prefix(self, record: FactRecord) -> str:
        if not self.few_shot:
            return ""
        return default_shot(record) if self.shot is None else self.shot

    def items(self, record: FactRecord, rng: random.Random) -> list[PromptItem]:
        return [cloze_item(record, self.name, self.prefix(record) + record.prompt())]


@_register
class QuestionFormat(PromptFormat):
    """Zero-shot question/answer, so knowledge is probed outside the training-like cloze."""

    name = "question"

    def items(self, record: FactRecord, rng: random.Random) -> list[PromptItem]:
        prompt = f"Question: {question_text(record)}\nAnswer:"
        return [cloze_item(record, self.name, prompt)]


def check_option_order(option_order: str, fmt: str) -> str:
    if option_order not in OPTION_ORDERS:
        raise ConfigError(
            f"unknown option_order {option_order!r} for {fmt}; known: {', '.join(OPTION_ORDERS)}"
        )
    return option_order


def shown_orders(
    options: tuple[str, ...], option_order: str, rng: random.Random
) -> list[tuple[str, ...]]:
    """The orders in which a prompt lists ``options``: the record's (``fixed``), one drawn from
    ``rng`` (``shuffle``) or every permutation (``all``, one item each, to cancel order bias)."""
    if option_order == "fixed":
        return [options]
    if option_order == "shuffle":
        shown = list(options)
        rng.shuffle(shown)
        return [tuple(shown)]
    if math.factorial(len(options)) > MAX_ALL_ORDERS:
        raise DataError(f"option_order='all' with {len(options)} options makes too many items")
    return list(itertools.permutations(options))


@_register
class MCQFormat(PromptFormat):
    """Multiple choice answered by a letter: the answer is recognised, not generated.

    ``option_order``: ``"fixed"`` (the record's order), ``"shuffle"`` (one order drawn from the
    caller's ``rng``) or ``"all"`` (one item per permutation, to cancel letter bias).
    """

    name = "mcq"

    def __init__(self, option_order: str = "fixed") -> None:
        self.option_order = check_option_order(option_order, self.name)

    def items(self, record: FactRecord, rng: random.Random) -> list[PromptItem]:
        if len(record.options) > len(LETTERS):
            raise DataError(f"record {record.id} has more options than letters for mcq")
        question = question_text(record)
        orders = shown_orders(record.options, self.option_order, rng)
        return [self._item(record, question, shown) for shown in orders]

    def _item(self, record: FactRecord, question: str, shown: tuple[str, ...]) -> PromptItem:
        letters = LETTERS[: len(shown)]
        lines = [f"Question: {question}"]
        lines += [f"{letter}. {option}" for letter, option in zip(letters, shown, strict=True)]
        lines.append("Answer:")
        return PromptItem(
            record_id=record.id,
            format=self.name,
            prompt="\n".join(lines),
            continuations=tuple(" " + letter for letter in letters),
            correct=shown.index(record.answer),
            labels=shown,
            single_token=True,
        )


@_register
class OptionsWordFormat(PromptFormat):
    """The options listed in the prompt, answered with the option's own word.

    Between the free question and the letter MCQ: the model sees the candidates (so it is a
    recognition test, as MCQ is) but answers in words, which a small base model does far better
    than with letters: on Gemma 3 270M, 61% against the letter MCQ's 33% (chance) on 300 random
    athletes, 0-shot (completion 73%; ``mechunlearn eval --formats
    completion,options_word,mcq,question --limit 300``). Scored like a cloze over the options'
    words; ``option_order`` as for ``mcq``.
    """

    name = "options_word"

    def __init__(self, option_order: str = "fixed") -> None:
        self.option_order = check_option_order(option_order, self.name)

    def items(self, record: FactRecord, rng: random.Random) -> list[PromptItem]:
        question = question_text(record)
        items = []
        for shown in shown_orders(record.options, self.option_order, rng):
            prompt = f"Question: {question}\nOptions: {', '.join(shown)}\nAnswer:"
            items.append(cloze_item(record, self.name, prompt))
        return items


def capitalize_answer(option: str) -> str:
    """``"football"`` -> ``"Football"`` (only the first letter; ``str.capitalize`` would also
    lower-case the rest, e.g. CounterFact's ``"BBC"``)."""
    return option[:1].upper() + option[1:]


def dash_answer(option: str) -> str:
    """Every word spelled out with dashes: ``"ice hockey"`` -> ``"i-c-e h-o-c-k-e-y"``."""
    return " ".join("-".join(word) for word in option.split(" "))


def _shot_answer_as(shot: str, answer: str, spelled: str) -> str:
    """A one-shot example line whose final answer word is written as ``spelled``."""
    head, sep, tail = shot.rstrip("\n").rpartition(" " + answer)
    if not sep or tail:
        raise DataError(f"one-shot example {shot!r} does not end with its answer {answer!r}")
    return f"{head} {spelled}\n"


@_register
class CapitalizedFormat(PromptFormat):
    """The completion cloze answered with a capitalised word (" Football" for " football").

    Mechanistic Unlearning's "Capitalized" evaluation (Guo et al. 2024, App.; the authors'
    ``SportsTask_Capitalized``): the one-shot example's answer is capitalised too, so a model
    that still knows the fact answers in the new spelling, whose tokens the edit never trained
    on. An edit that only suppressed the lower-case answer token leaves this format untouched.
    Gemma 3 270M: 71.0% on 300 athletes (completion 73.0%).
    """

    name = "capitalized"

    def items(self, record: FactRecord, rng: random.Random) -> list[PromptItem]:
        shot = ""
        if record.relation == "sport":
            answer, example = next((a, s) for a, s in SPORTS_SHOTS if s == default_shot(record))
            shot = _shot_answer_as(example, answer, capitalize_answer(answer))
        spelled = tuple(" " + capitalize_answer(option) for option in record.options)
        return [
            PromptItem(
                record_id=record.id,
                format=self.name,
                prompt=shot + record.prompt(),
                continuations=spelled,
                correct=record.options.index(record.answer),
                labels=record.options,
            )
        ]


DASHED_SHOTS = (
    ("Tom Brady", "football"),
    ("Bryce Harper", "baseball"),
    ("LeBron James", "basketball"),
    ("Tiger Woods", "golf"),
)
"""The four worked examples of the authors' ``SportsTask_Dashed`` (in-context by default)."""


@_register
class DashedFormat(PromptFormat):
    """The completion cloze answered letter by letter: " f-o-o-t-b-a-l-l".

    Mechanistic Unlearning's "Dashed" evaluation (Guo et al. 2024, App.; ``SportsTask_Dashed``):
    four in-context examples spell their sport with dashes, and each option is scored by the
    summed log-probability of its dashed spelling (many tokens, none of which the edit trained
    on), renormalised over the options. Sports facts get the authors' examples (an example
    whose athlete is the record's own subject is left out; the golf example stays when golf is
    an edit target, as in the authors' evaluation); other relations get none. Gemma 3 270M
    cannot spell sports this way (31.7% on 300 athletes, chance 33.3%), so there it is reported
    and left out of verdicts.
    """

    name = "dashed"

    def items(self, record: FactRecord, rng: random.Random) -> list[PromptItem]:
        shots = ""
        if record.relation == "sport":
            shots = "".join(
                f"Fact: {athlete} plays the sport of {dash_answer(sport)}\n"
                for athlete, sport in DASHED_SHOTS
                if athlete != record.subject
            )
        return [
            PromptItem(
                record_id=record.id,
                format=self.name,
                prompt=shots + record.prompt(),
                continuations=tuple(" " + dash_answer(option) for option in record.options),
                correct=record.options.index(record.answer),
                labels=record.options,
            )
        ]


@_register
class ParaphraseFormat(PromptFormat):
    """One cloze item per stored paraphrase, to test that an edit generalises across wording.

    ``shot`` is an optional prefix (default none: CounterFact paraphrases carry their own
    context sentence).
    """

    name = "paraphrase"

    def __init__(self, shot: str = "") -> None:
        self.shot = shot

    def items(self, record: FactRecord, rng: random.Random) -> list[PromptItem]:
        return [cloze_item(record, self.name, self.shot + text) for text in record.paraphrases]


def get_formatter(name: str, **options: Any) -> PromptFormat:
    """Build the format registered as ``name``; unknown names or options raise ``ConfigError``."""
    cls = FORMATS.get(name)
    try:
        inspect.signature(cls).bind(**options)
    except TypeError:
        accepted = [p for p in inspect.signature(cls).parameters] or ["(none)"]
        raise ConfigError(
            f"invalid options {sorted(options)} for prompt format {name!r}; "
            f"accepted: {', '.join(accepted)}"
        ) from None
    return cls(**options)


def record_rng(seed: int, fmt: str, record_id: str) -> random.Random:
    """A generator keyed by (seed, format, record) so results do not depend on record order."""
    return random.Random(f"{seed}\x1f{fmt}\x1f{record_id}")


def _resolve(
    formats: str | Sequence[str | PromptFormat],
    options: Mapping[str, Mapping[str, Any]],
) -> list[PromptFormat]:
    if isinstance(formats, str):
        formats = [formats]
    resolved = [
        f if isinstance(f, PromptFormat) else get_formatter(f, **options.get(f, {}))
        for f in formats
    ]
    if not resolved:
        raise ConfigError(f"no prompt formats given; known: {', '.join(FORMATS.names())}")
    return resolved


def format_records(
    records: Iterable[FactRecord],
    formats: str | Sequence[str | PromptFormat],
    seed: int = 0,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[PromptItem]:
    """All items of every record in every format (format-major order); same seed, same items.

    ``formats`` are names (built with ``options[name]``) or ready ``PromptFormat`` objects.
    """
    built = _resolve(formats, options or {})
    records = list(records)
    return [
        item
        for fmt in built
        for record in records
        for item in fmt.items(record, record_rng(seed, fmt.name, record.id))
    ]
