"""Batched scoring of prompt items: log-probability of each option's continuation.

Every format is scored the same way: the model's log-probability of each candidate
continuation after the prompt. Items whose options are all single tokens cost one forward
(one kept logit row); multi-token options get one sequence each. Sequences are left-padded so
they all end at the last index, which lets ``logits_to_keep`` compute the unembedding only for
the few final positions (Gemma's 262k-token vocabulary makes full logits the dominant cost).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from mechunlearn.errors import TokenizationError
from mechunlearn.models.batches import left_pad
from mechunlearn.models.handle import HookedModel, cache_argument
from mechunlearn.tasks.records import PromptItem


@dataclass(frozen=True)
class ItemScore:
    """Scores of one prompt item: per option, total log-prob and number of tokens."""

    item: PromptItem
    logprobs: tuple[float, ...]
    n_tokens: tuple[int, ...]

    @property
    def correct(self) -> int:
        return self.item.correct

    def renormalised(self) -> list[float]:
        """Probabilities over the options only (sum to 1; chance = 1/k)."""
        return torch.tensor(self.logprobs, dtype=torch.float64).softmax(0).tolist()

    @property
    def prob_renorm(self) -> float:
        return self.renormalised()[self.correct]

    @property
    def prob_full(self) -> float:
        """Full-vocabulary probability of the whole correct continuation."""
        return float(torch.tensor(self.logprobs[self.correct], dtype=torch.float64).exp())

    @property
    def accuracy(self) -> float:
        best = max(range(len(self.logprobs)), key=lambda i: self.logprobs[i])
        return float(best == self.correct)

    def mean_nll(self, option: int) -> float:
        """Per-token negative log-likelihood (ROME's CounterFact comparison)."""
        return -self.logprobs[option] / self.n_tokens[option]


@dataclass
class _Unit:
    """One sequence to run: which (item, option) log-probs it yields and from which positions."""

    tokens: list[int]
    n_keep: int
    targets: list[tuple[int, int, list[int]]]  # (item index, option index, target token ids)


def _continuation_tokens(hm: HookedModel, item: PromptItem) -> list[list[int]]:
    token_lists = []
    for text in item.continuations:
        tokens = hm.tokenize(text, add_special_tokens=False)
        if not tokens:
            raise TokenizationError(
                f"continuation {text!r} of {item.record_id} ({item.format}) tokenizes to nothing"
            )
        if item.single_token and len(tokens) != 1:
            pieces = [hm.tokenizer.decode([t]) for t in tokens]
            raise TokenizationError(
                f"format {item.format!r} needs single-token answers, but {text!r} of {item.record_id} "
                f"is {len(tokens)} tokens {pieces}"
            )
        token_lists.append(tokens)
    return token_lists


def _units(hm: HookedModel, items: Sequence[PromptItem]) -> list[_Unit]:
    units: list[_Unit] = []
    for index, item in enumerate(items):
        prompt = hm.tokenize(item.prompt)
        options = _continuation_tokens(hm, item)
        if all(len(t) == 1 for t in options):
            units.append(_Unit(prompt, 1, [(index, o, t) for o, t in enumerate(options)]))
        else:
            units.extend(
                _Unit(prompt + t[:-1], len(t), [(index, o, t)]) for o, t in enumerate(options)
            )
    return units


MIN_SHARED_PREFIX = 4
"""A batch whose sequences share at least this many leading tokens runs them once."""


def _common_prefix(token_lists: Sequence[Sequence[int]]) -> int:
    first, n = token_lists[0], min(len(t) for t in token_lists)
    for i in range(n):
        if any(t[i] != first[i] for t in token_lists):
            return i
    return n


def last_logits(token_lists: Sequence[Sequence[int]], hm: HookedModel, keep: int) -> torch.Tensor:
    """Logits ``[batch, keep, vocab]`` at the last ``keep`` positions of each sequence.

    Sequences are left-padded to end together. When they share a prefix (a one-shot example,
    an instruction: 13 of the completion format's ~20 tokens on Gemma 3 270M), the prefix runs
    once into a KV cache that every row continues from, the padding between prefix and suffix
    masked out; equal to the plain forward up to float rounding. Keep the last ``keep`` tokens
    out of the prefix, so that every kept logit row is computed in the suffix. Call it with no
    position-dependent hook active (the prefix and the suffixes are separate forwards): scoring
    an intervened model has its own batch builders (e.g. ``attacks/soft_prompt.py``)."""
    device = hm.device
    shared = _common_prefix(token_lists) if hm.keeps_logits and len(token_lists) > 1 else 0
    shared = min(shared, min(len(t) for t in token_lists) - keep)
    # a sliding window counts cache slots, padding included: share only inside one window
    window = getattr(hm.model.config, "sliding_window", None)
    if window and max(len(t) for t in token_lists) + 1 > window:
        shared = 0
    if shared < MIN_SHARED_PREFIX:
        batch = left_pad(token_lists, hm.pad_id).to(device)
        return hm.model(**batch.model_inputs(), logits_to_keep=keep).logits
    prefix = torch.tensor([list(token_lists[0][:shared])], device=device)
    cache = DynamicCache(config=hm.model.config)
    argument = cache_argument(hm.model)
    hm.model(input_ids=prefix, use_cache=True, logits_to_keep=1, **{argument: cache})
    cache.batch_repeat_interleave(len(token_lists))
    suffix = left_pad([t[shared:] for t in token_lists], hm.pad_id).to(device)
    mask = torch.cat(
        [torch.ones(len(token_lists), shared, dtype=suffix.attention_mask.dtype, device=device),
         suffix.attention_mask], dim=1,
    )  # fmt: skip
    return hm.model(
        input_ids=suffix.input_ids,
        attention_mask=mask,
        position_ids=suffix.position_ids + shared,
        use_cache=True,
        logits_to_keep=keep,
        **{argument: cache},
    ).logits


@torch.no_grad()
def score_items(
    hm: HookedModel,
    items: Sequence[PromptItem],
    batch_size: int = 16,
    advance: Callable[[int], None] | None = None,
) -> list[ItemScore]:
    """Score every item; ``advance(n)`` is called after each batch with the items' units done."""
    if hm.tokenizer is None:
        raise TokenizationError(f"model {hm.name!r} has no tokenizer; scoring needs one")
    units = _units(hm, items)
    order = sorted(range(len(units)), key=lambda i: len(units[i].tokens))
    logprobs = [[0.0] * len(item.continuations) for item in items]
    n_tokens = [[0] * len(item.continuations) for item in items]
    for start in range(0, len(order), batch_size):
        chunk = [units[i] for i in order[start : start + batch_size]]
        keep = max(u.n_keep for u in chunk)
        logits = last_logits([u.tokens for u in chunk], hm, keep)
        log_probs = logits.float().log_softmax(-1)  # [batch, keep, vocab]
        for row, unit in enumerate(chunk):
            for item_index, option, target in unit.targets:
                positions = range(keep - unit.n_keep, keep - unit.n_keep + len(target))
                total = sum(
                    log_probs[row, p, t].item() for p, t in zip(positions, target, strict=True)
                )
                logprobs[item_index][option] = total
                n_tokens[item_index][option] = len(target)
        if advance is not None:
            advance(len(chunk))
    return [
        ItemScore(item, tuple(lp), tuple(nt))
        for item, lp, nt in zip(items, logprobs, n_tokens, strict=True)
    ]


def count_units(hm: HookedModel, items: Sequence[PromptItem]) -> int:
    """How many sequences ``score_items`` will run (for progress bars)."""
    return len(_units(hm, items))
