"""Fact prompts prepared for localization: token batch, subject positions, answer tokens.

Every localization method needs the same things: the clean prompts left-padded into one batch
(so the final token is at index -1 for every row), where the subject's tokens are, and the
first token of each option's answer (the attribute the model must produce). Corrupted inputs
for patching are other facts of the same token layout, paired here so every method uses the
same clean/corrupt pairs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mechunlearn.errors import DataError
from mechunlearn.localize.readouts import logit_diff
from mechunlearn.models.batches import Batch, left_pad
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.formats import get_formatter
from mechunlearn.tasks.records import FactRecord


@dataclass
class FactPrompts:
    """Clean prompts of several facts in one left-padded batch.

    ``subject_positions[i]`` are row i's subject token indices in the padded batch;
    ``option_ids[i, j]`` is the first token of option j's answer and ``correct[i]`` the
    index of the true option.
    """

    records: list[FactRecord]
    texts: list[str]
    batch: Batch
    subject_positions: list[list[int]]
    option_ids: torch.Tensor  # [n, k]
    correct: torch.Tensor  # [n]

    @property
    def width(self) -> int:
        return self.batch.input_ids.shape[1]

    @property
    def answer_ids(self) -> torch.Tensor:
        return self.option_ids.gather(1, self.correct[:, None]).squeeze(1)

    def last_subject_positions(self) -> torch.Tensor:
        return torch.tensor([p[-1] for p in self.subject_positions])

    def subject_mask(self) -> torch.Tensor:
        """Boolean ``[n, width]``: true on subject tokens."""
        mask = torch.zeros(len(self.records), self.width, dtype=torch.bool)
        for row, positions in enumerate(self.subject_positions):
            mask[row, positions] = True
        return mask

    def relative_layout(self) -> list[tuple[int, ...]]:
        """Per row: (padding, subject start, subject end, prompt length) - equal layouts can be patched."""
        layout = []
        for row, positions in enumerate(self.subject_positions):
            pad = self.width - self.batch.lengths[row]
            layout.append((pad, positions[0] - pad, positions[-1] - pad, self.batch.lengths[row]))
        return layout


def subject_token_span(hm: HookedModel, prompt: str, subject: str) -> tuple[list[int], list[int]]:
    """Tokens of ``prompt`` and the indices of the subject's tokens (its last occurrence)."""
    start = prompt.rfind(subject)
    if start < 0:
        raise DataError(f"subject {subject!r} not found in the prompt {prompt!r}")
    before = prompt[:start].rstrip(" ")
    spaced = prompt[len(before) : start + len(subject)]  # the subject with its leading space
    tokens = hm.tokenize(prompt)
    head, through = hm.tokenize(before), hm.tokenize(before + spaced)
    n_before, n_through = len(head), len(through)
    if tokens[:n_through] != through or through[:n_before] != head or n_through <= n_before:
        raise DataError(f"subject {subject!r} does not fall on token boundaries in {prompt!r}")
    return tokens, list(range(n_before, n_through))


def subject_aligned(hm: HookedModel, record: FactRecord, fmt: str = "completion") -> bool:
    """Whether ``record``'s subject falls on token boundaries of its ``fmt`` prompt (e.g. not
    CounterFact's "Trafigura Beheer B.V." + "'s", whose final "." merges with "'s"): only such
    facts can be localized, probed or patched at the subject's tokens."""
    items = get_formatter(fmt).items(record, random.Random(0))
    try:
        for item in items:
            subject_token_span(hm, item.prompt, record.subject)
    except DataError:
        return False
    return True


def build_fact_prompts(
    hm: HookedModel, records: Sequence[FactRecord], fmt: str = "completion"
) -> FactPrompts:
    """Prompts of ``records`` in format ``fmt`` (one item per record), ready for patching."""
    if not records:
        raise DataError("no facts to localize: the record list is empty")
    formatter = get_formatter(fmt)
    token_lists, spans, texts, options, correct = [], [], [], [], []
    for record in records:
        items = formatter.items(record, random.Random(0))
        if len(items) != 1:
            raise DataError(
                f"format {fmt!r} gives {len(items)} prompts for {record.id}; localization needs exactly one"
            )
        item = items[0]
        tokens, span = subject_token_span(hm, item.prompt, record.subject)
        token_lists.append(tokens)
        spans.append(span)
        texts.append(item.prompt)
        options.append([hm.tokenize(c, add_special_tokens=False)[0] for c in item.continuations])
        correct.append(item.correct)
    if len({len(o) for o in options}) != 1:
        raise DataError("all facts must have the same number of options to be localized together")
    batch = left_pad(token_lists, hm.pad_id)
    width = batch.input_ids.shape[1]
    positions = [
        [width - len(t) + p for p in span] for t, span in zip(token_lists, spans, strict=True)
    ]
    return FactPrompts(
        list(records), texts, batch, positions, torch.tensor(options), torch.tensor(correct)
    )


def check_same_layout(clean: FactPrompts, corrupt: FactPrompts) -> None:
    """Clean and corrupted prompts must align token by token for patching to mean anything."""
    if len(clean.records) != len(corrupt.records):
        raise DataError(
            f"{len(clean.records)} clean prompts but {len(corrupt.records)} corrupted ones"
        )
    for row, (a, b) in enumerate(
        zip(clean.relative_layout(), corrupt.relative_layout(), strict=True)
    ):
        if a != b or clean.width != corrupt.width:
            raise DataError(
                f"clean prompt {clean.texts[row]!r} and corrupted prompt {corrupt.texts[row]!r} have different "
                f"token layouts (padding, subject start, subject end, length) {a} vs {b}; patching needs equal lengths"
            )


def pair_corruptions(
    hm: HookedModel, records: Sequence[FactRecord], seed: int = 0
) -> list[FactRecord]:
    """For each fact, another fact with a different answer and the same token layout.

    Subject-corrupted inputs (Mechanistic Unlearning): swapping in a subject of the same token
    length keeps every position aligned while changing the attribute the model should recall.
    """
    prompts = build_fact_prompts(hm, records)
    layouts = [(lay[1], lay[2], lay[3]) for lay in prompts.relative_layout()]
    rng = random.Random(seed)
    partners = []
    for row, record in enumerate(records):
        candidates = [
            other
            for j, other in enumerate(records)
            if layouts[j] == layouts[row] and other.answer != record.answer
        ]
        if not candidates:
            raise DataError(
                f"no corrupting partner for {record.subject!r}: no other fact with a different answer has "
                f"the same token layout; add more facts"
            )
        partners.append(rng.choice(candidates))
    return partners


def answer_logit_diff(logits: torch.Tensor, prompts: FactPrompts) -> torch.Tensor:
    """Per row: logit of the true answer minus the mean logit of the other options (the
    ``logit_diff`` readout, in the logits' dtype).

    ``logits`` are the final-position logits ``[n, vocab]``; a logit difference is linear in
    the residual stream's final state, which makes it the natural patching metric.
    """
    device = logits.device
    return logit_diff(logits, prompts.option_ids.to(device), prompts.correct.to(device))


def choose_pairable_facts(
    hm: HookedModel, pool: Sequence[FactRecord], n: int, seed: int = 0
) -> list[FactRecord]:
    """About ``n`` facts from ``pool`` such that each has a corrupting partner among them.

    Patching needs, for every fact, another fact with the same token layout and a different
    answer; a plain random sample rarely has that, so facts are drawn in partner pairs.
    """
    prompts = build_fact_prompts(hm, pool)
    groups: dict[tuple[int, ...], list[FactRecord]] = {}
    for record, layout in zip(pool, prompts.relative_layout(), strict=True):
        groups.setdefault(layout[1:], []).append(record)
    pairs_available = [g for g in groups.values() if len({r.answer for r in g}) > 1]
    if not pairs_available:
        raise DataError(
            "no two facts share a token layout with different answers; patching needs such pairs"
        )
    rng = random.Random(seed)
    anchors = [r for g in pairs_available for r in g]
    rng.shuffle(anchors)
    chosen: dict[str, FactRecord] = {}
    layout_of = {r.id: key for key, g in groups.items() for r in g}
    for anchor in anchors:
        if len(chosen) >= n:
            break
        if anchor.id in chosen:
            continue
        partners = [
            r
            for r in groups[layout_of[anchor.id]]
            if r.answer != anchor.answer and r.id not in chosen
        ]
        if not partners:
            continue
        chosen[anchor.id] = anchor
        partner = rng.choice(partners)
        chosen[partner.id] = partner
    return sorted(chosen.values(), key=lambda r: r.id)
