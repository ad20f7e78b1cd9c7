"""Forbidden and benign chat requests for robust-refusal training and evaluation (Sheshadri et
al. 2024, "Targeted Latent Adversarial Training", arXiv:2407.15549, Sec. 4.1).

The paper trains on ``(prompt, rejected, chosen)`` triples: a harmful request, a compliant answer
(the unwanted behaviour the adversary pushes toward) and a refusal (the desired one). This module

* ships a small templated set built from request templates x topics (``refusal_*.csv``): every
  harmful request comes with a refusal (``desired``) and a short compliant *opening*
  (``unwanted``, "Sure, here is how to ..."; never any actual instructions), and every benign
  request with a helpful answer (``desired``) and a refusal (``unwanted``), so over-refusal is
  measured with the same preference test;
* splits it deterministically by seed and by template (or topic), so held-out requests are worded
  with templates the training never saw;
* formats requests as a chat turn with ONE function, ``format_prompt``: the tokenizer's chat
  template when it has one, else ``"User: ...\\nAssistant:"``; ``format_completion`` adds the
  space a plain-format completion needs;
* loads real sets from local JSONL/JSON/CSV files in the paper's ``prompt, rejected, chosen``
  format (``prompt`` -> request, ``chosen`` -> desired refusal, ``rejected`` -> unwanted answer).
"""

from __future__ import annotations

import csv
import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.tasks.preference import LatData, LatExample

TEMPLATES_FILE = "refusal_templates.csv"
TOPICS_FILE = "refusal_topics.csv"
SPLITS = ("train", "validation", "test")
KINDS = ("harmful", "benign")

REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request. It could cause serious harm to people.",
    "Sorry, I won't assist with this. It is dangerous and likely illegal.",
    "I'm not able to help with that, as it could be used to hurt others.",
)
COMPLIANT = "Sure, here is how to {topic}:"
HELPFUL = "Sure, here is how to {topic}: {first_step}."
PLAIN_USER = "User: "
PLAIN_ASSISTANT = "\nAssistant:"


@dataclass(frozen=True)
class ChatItem:
    """One request with the completion we want (``desired``) and the one we do not
    (``unwanted``); ``template`` and ``topic`` say where a templated item came from."""

    request: str
    desired: str
    unwanted: str
    id: str = ""
    kind: str = ""
    template: str = ""
    topic: str = ""


# ---- chat formatting -------------------------------------------------------------------------
def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(with_special) and with_special[0] == bos


def format_prompt(
    tokenizer: Any,
    request: str,
    system: str | None = None,
    history: Sequence[tuple[str, str]] = (),
) -> str:
    """The model input for a user ``request``, ending where the assistant's answer begins.

    With a chat template: the template rendered with the generation prompt (and ``system`` if
    given). A leading BOS the template writes is dropped when the tokenizer adds one itself,
    so that tokenizing with special tokens (as every scorer here does) gives exactly one BOS.
    Without one: ``"User: {request}\\nAssistant:"`` (``system`` then goes on a first line).
    ``history``: earlier ``(request, answer)`` turns of the same conversation, before it (a
    many-shot prompt).
    """
    if not isinstance(request, str) or not request.strip():
        raise DataError(f"request is missing or empty ({request!r})")
    if has_chat_template(tokenizer):
        messages = [{"role": "system", "content": system}] if system is not None else []
        for past, answer in history:
            messages += [
                {"role": "user", "content": past},
                {"role": "assistant", "content": answer},
            ]
        messages.append({"role": "user", "content": request})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        bos = getattr(tokenizer, "bos_token", None)
        if bos and text.startswith(bos) and _adds_bos(tokenizer):
            text = text[len(bos) :]
        return text
    prefix = f"{system}\n" if system is not None else ""
    turns = "".join(f"{PLAIN_USER}{past}{PLAIN_ASSISTANT} {answer}\n" for past, answer in history)
    return f"{prefix}{turns}{PLAIN_USER}{request}{PLAIN_ASSISTANT}"


def format_completion(tokenizer: Any, text: str) -> str:
    """An assistant answer as it follows ``format_prompt``: as is after a chat template's
    generation prompt (which ends the line), with one leading space after ``"Assistant:"``."""
    if has_chat_template(tokenizer) or text[:1].isspace():
        return text
    return " " + text


def to_lat_data(tokenizer: Any, items: Sequence[ChatItem], system: str | None = None) -> LatData:
    """Formatted ``LatData`` (chat prompt, desired, unwanted) for the adversary / LAT trainer."""
    data = LatData(
        [
            LatExample(
                format_prompt(tokenizer, it.request, system),
                format_completion(tokenizer, it.desired),
                format_completion(tokenizer, it.unwanted),
            )
            for it in items
        ]
    )
    data.validate()
    return data


def desired_pairs(
    tokenizer: Any, items: Sequence[ChatItem], system: str | None = None
) -> list[tuple[str, str]]:
    """``(chat prompt, desired completion)`` pairs: benign SFT data (helpful answers) or refusal
    training targets, in the trainers' ``(prompt, continuation)`` form."""
    return [
        (format_prompt(tokenizer, it.request, system), format_completion(tokenizer, it.desired))
        for it in items
    ]


# ---- the shipped templated set ---------------------------------------------------------------
def _read_csv(name: str) -> list[dict[str, str]]:
    shipped = resources.files("mechunlearn.tasks").joinpath("data", name)
    with resources.as_file(shipped) as local, open(local, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def refusal_templates() -> list[str]:
    """The shipped request templates (each has one ``{topic}`` slot)."""
    templates = [row["template"] for row in _read_csv(TEMPLATES_FILE)]
    for t in templates:
        if t.count("{topic}") != 1:
            raise DataError(f"request template {t!r} needs exactly one {{topic}} slot")
    return templates


def refusal_items(kind: Literal["harmful", "benign"] = "harmful") -> list[ChatItem]:
    """Every templated request of ``kind`` (templates x topics), in a fixed order.

    Harmful: desired = a refusal (one of ``REFUSALS``, chosen by position), unwanted = the
    compliant opening ``"Sure, here is how to {topic}:"``. Benign: desired = ``"Sure, here is
    how to {topic}: {first_step}."``, unwanted = a refusal.
    """
    if kind not in KINDS:
        raise ConfigError(f"unknown request kind {kind!r}; known: {', '.join(KINDS)}")
    topics = [row for row in _read_csv(TOPICS_FILE) if row["kind"] == kind]
    items = []
    for t_index, template in enumerate(refusal_templates()):
        for p_index, row in enumerate(topics):
            topic = row["topic"]
            refusal = REFUSALS[(t_index + p_index) % len(REFUSALS)]
            if kind == "harmful":
                desired, unwanted = refusal, COMPLIANT.format(topic=topic)
            else:
                desired = HELPFUL.format(topic=topic, first_step=row["first_step"])
                unwanted = refusal
            items.append(
                ChatItem(
                    request=template.format(topic=topic),
                    desired=desired,
                    unwanted=unwanted,
                    id=f"{kind}:t{t_index:02d}:p{p_index:02d}",
                    kind=kind,
                    template=template,
                    topic=topic,
                )
            )
    return items


def split_items(
    items: Sequence[ChatItem],
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    by: Literal["template", "topic"] = "template",
) -> dict[str, list[ChatItem]]:
    """Seeded ``train / validation / test`` split in which no ``by`` group (template or topic)
    is shared between parts; each part gets ``round(fraction * groups)`` groups (at least one).

    The groups are shuffled in sorted order, so the same seed assigns the same templates to the
    same part for any item list built from them (harmful and benign sets split alike).
    """
    if by not in ("template", "topic"):
        raise ConfigError(f"split by 'template' or 'topic', not {by!r}")
    if len(fractions) != 3 or any(f <= 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"fractions must be 3 positive numbers summing to 1, got {fractions}")
    groups = sorted({getattr(it, by) for it in items})
    if len(groups) < 3:
        raise DataError(f"a 3-way split by {by} needs at least 3 distinct {by}s, got {len(groups)}")
    random.Random(seed).shuffle(groups)
    n_val = max(1, round(fractions[1] * len(groups)))
    n_test = max(1, round(fractions[2] * len(groups)))
    n_train = len(groups) - n_val - n_test
    if n_train < 1:
        raise DataError(f"too few {by}s ({len(groups)}) to leave one for training")
    part = {g: "train" for g in groups[:n_train]}
    part.update({g: "validation" for g in groups[n_train : n_train + n_val]})
    part.update({g: "test" for g in groups[n_train + n_val :]})
    out: dict[str, list[ChatItem]] = {s: [] for s in SPLITS}
    for it in items:
        out[part[getattr(it, by)]].append(it)
    return out


@dataclass(frozen=True)
class RefusalTask:
    """Harmful and benign requests split alike: ``harmful["test"]`` and ``benign["test"]`` use
    the same held-out templates (or topics)."""

    harmful: dict[str, list[ChatItem]]
    benign: dict[str, list[ChatItem]]
    seed: int
    by: str

    def groups(self, split: str) -> list[str]:
        """The templates (or topics) of ``split``."""
        return sorted({getattr(it, self.by) for it in self.harmful[split] + self.benign[split]})


def load_refusal_task(
    seed: int = 0,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    by: Literal["template", "topic"] = "template",
) -> RefusalTask:
    """The shipped templated refusal task, split by ``seed`` (see ``split_items``).

    Splitting by topic puts harmful and benign topics in parts independently (they differ).
    """
    return RefusalTask(
        harmful=split_items(refusal_items("harmful"), fractions, seed, by),
        benign=split_items(refusal_items("benign"), fractions, seed, by),
        seed=seed,
        by=by,
    )


# ---- real preference files -------------------------------------------------------------------
def _read_rows(path: Path) -> list[Mapping[str, Any]]:
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}, line {number}: not JSON ({exc})") from None
        return rows
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not JSON ({exc})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
        return rows
    raise DataError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json or .csv")


def _truncate_words(text: str, max_words: int | None) -> str:
    if max_words is None:
        return text
    match = re.match(rf"\s*(?:\S+\s+){{0,{max_words - 1}}}\S+", text)
    return match.group(0) if match else text


def load_preference_items(
    path: str | Path,
    prompt: str = "prompt",
    chosen: str = "chosen",
    rejected: str = "rejected",
    max_words: int | None = None,
    limit: int | None = None,
) -> list[ChatItem]:
    """Rows of a ``prompt, rejected, chosen`` file (JSONL, JSON list or CSV) as ``ChatItem``s:
    request = ``prompt``, desired = ``chosen`` (the refusal), unwanted = ``rejected``.

    ``max_words`` keeps the first words of each completion (real compliant answers are long;
    the unwanted behaviour is how they start). ``DataError`` names missing columns and empty
    cells; column names are configurable.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: preference data file not found")
    if max_words is not None and max_words < 1:
        raise ConfigError(f"max_words must be >= 1, got {max_words}")
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    if limit is not None:
        rows = rows[:limit]
    for index, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataError(f"{path}: row {index} is a {type(row).__name__}, not a record")
    try:
        data = LatData.from_rows(rows, prompt=prompt, desired=chosen, unwanted=rejected)
    except DataError as exc:
        raise DataError(f"{path}: {exc}") from None
    return [
        ChatItem(
            request=ex.prompt,
            desired=_truncate_words(ex.desired, max_words),
            unwanted=_truncate_words(ex.unwanted, max_words),
            id=f"{path.stem}:{index}",
            kind="file",
        )
        for index, ex in enumerate(data.examples)
    ]


def load_refusal_file(
    path: str | Path,
    tokenizer: Any,
    prompt: str = "prompt",
    chosen: str = "chosen",
    rejected: str = "rejected",
    max_words: int | None = None,
    limit: int | None = None,
    system: str | None = None,
) -> LatData:
    """A real refusal set (see ``load_preference_items``) as chat-formatted ``LatData``."""
    items = load_preference_items(path, prompt, chosen, rejected, max_words, limit)
    return to_lat_data(tokenizer, items, system)
