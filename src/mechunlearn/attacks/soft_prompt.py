"""Soft-prompt attack: a few trainable input vectors that try to make an edited model say the
original answers again (prompt tuning, Lester et al. 2021, used as an unlearning attack by
Guo et al. 2024, "Mechanistic Unlearning", Sec. 5, following Schwinn et al. 2024).

``n_tokens`` vectors ``v_1..v_n`` replace the ``embed`` site output at ``n`` placeholder
positions inserted in front of every prompt (after a leading BOS, which many models use as an
attention sink). Writing at the ``embed`` site rather than into the embedding matrix means the
vectors live in the space the first block reads (Gemma's ``sqrt(d)`` scale included). They
minimise the cross-entropy of the TRUE answers,

    min_v  -(1/N) sum_{facts in the train half} sum_i log p(a_i | [v_1..v_n; prompt], a_<i)
    s.t.   ||v_j||_2 <= max_norm * median_t ||e_t||_2   for every j,

with AdamW and a projection onto the ball after every step, where ``e_t`` are the embedding-
site outputs of the attacked prompts' real tokens. The bound keeps the vectors in the range of
real token embeddings, so success means the knowledge is reachable from ordinary inputs. The
attack is scored on the held-out half (completion format; probability of the true answer
renormalised over the options, and accuracy) without the soft prompt, with the initial vectors
and with the trained ones. The model's weights are never changed.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from mechunlearn.attacks.split import split_records
from mechunlearn.edit.objectives import edit_loss, sequence_logprobs
from mechunlearn.errors import DataError, TokenizationError
from mechunlearn.evals.metrics import mean_and_sem
from mechunlearn.evals.scoring import ItemScore, score_items
from mechunlearn.models.batches import TargetBatch
from mechunlearn.models.handle import HookedModel
from mechunlearn.models.hooks import Apply
from mechunlearn.progress import progress_bar
from mechunlearn.schema import STRICT_CONFIG
from mechunlearn.tasks.formats import format_records
from mechunlearn.tasks.records import FactRecord, PromptItem

FORMAT = "completion"


class SoftPromptConfig(BaseModel):
    """Soft-prompt attack settings. ``lr`` is in units of the typical per-coordinate size of an
    embedding (median norm / sqrt(d_model)), so one setting suits models of any scale."""

    model_config = STRICT_CONFIG

    n_tokens: int = Field(4, ge=1)
    steps: int = Field(30, ge=0)
    lr: float = Field(1e-2, gt=0)
    max_norm: float = Field(1.0, gt=0, description="L2 bound per vector / median embedding norm")
    train_fraction: float = Field(0.5, gt=0, lt=1)
    batch_size: int = Field(16, ge=1)
    init: Literal["mean", "random"] = "mean"


@dataclass
class SoftPromptResult:
    """Held-out scores ``before`` (no soft prompt), ``initial`` (untrained vectors) and
    ``after`` (trained vectors): metric -> {"mean", "sem"} over held-out facts."""

    config: dict[str, Any]
    train_ids: list[str]
    heldout_ids: list[str]
    median_norm: float
    bound: float
    before: dict[str, dict[str, float]]
    initial: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    chance: float
    losses: list[float]
    train_loss_initial: float
    train_loss_final: float
    vector_norms: list[float]
    vectors: torch.Tensor = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """Everything but the vectors; flat ``accuracy_<when>`` and ``p_true_<when>`` (the
        renormalised probability of the true answer) means for tables."""
        flat = {
            f"{name}_{when}": getattr(self, when)[metric]["mean"]
            for name, metric in (("accuracy", "accuracy"), ("p_true", "prob_renorm"))
            for when in ("before", "initial", "after")
        }
        return {
            **flat,
            "config": self.config,
            "format": FORMAT,
            "train_ids": self.train_ids,
            "heldout_ids": self.heldout_ids,
            "median_norm": self.median_norm,
            "bound": self.bound,
            "chance": self.chance,
            "before": self.before,
            "initial": self.initial,
            "after": self.after,
            "losses": self.losses,
            "train_loss_initial": self.train_loss_initial,
            "train_loss_final": self.train_loss_final,
            "vector_norms": self.vector_norms,
        }


# ---- the soft prompt --------------------------------------------------------------------------
class SoftPrompt:
    """``n`` vectors ``unit * u_j`` (``u`` trainable) written over placeholder tokens.

    ``unit`` = median embedding norm / sqrt(d) makes ``u``'s coordinates O(1) on every model.
    """

    def __init__(self, init: torch.Tensor, unit: float, bound: float) -> None:
        self.unit = unit
        self.bound = bound
        self.u = torch.nn.Parameter(init.detach().float() / unit)
        self.project()

    @property
    def vectors(self) -> torch.Tensor:
        return self.u * self.unit

    @torch.no_grad()
    def project(self) -> None:
        """Scale every vector whose L2 norm exceeds ``bound`` back onto the ball."""
        norms = self.vectors.norm(dim=-1, keepdim=True)
        self.u.mul_((self.bound / norms.clamp_min(1e-12)).clamp(max=1.0))

    def intervention(self, slots: torch.Tensor) -> Apply:
        """Replace the ``embed`` output where ``slots >= 0`` by vector ``slots[b, t]``."""

        def write(activation: torch.Tensor) -> torch.Tensor:
            index = slots.to(activation.device)
            values = self.vectors.to(activation.device, activation.dtype)[index.clamp(min=0)]
            return torch.where((index >= 0)[..., None], values, activation)

        return Apply("embed", write)


def insert_placeholders(hm: HookedModel, tokens: Sequence[int], n: int) -> tuple[list[int], int]:
    """``tokens`` with ``n`` placeholder ids inserted after a leading BOS (if any); returns the
    new tokens and the index of the first placeholder."""
    bos = hm.tokenizer.bos_token_id if hm.tokenizer is not None else None
    start = 1 if tokens and bos is not None and tokens[0] == bos else 0
    tokens = list(tokens)
    return tokens[:start] + [hm.pad_id] * n + tokens[start:], start


def _slot_index(starts: Sequence[int], lengths: Sequence[int], width: int, n: int) -> torch.Tensor:
    """``[b, width]``: vector index at each placeholder position (left padding), else -1."""
    slots = torch.full((len(starts), width), -1, dtype=torch.long)
    for row, (start, length) in enumerate(zip(starts, lengths, strict=True)):
        first = width - length + start
        slots[row, first : first + n] = torch.arange(n)
    return slots


def _pairs_batch(
    hm: HookedModel, pairs: Sequence[tuple[list[int], list[int]]], n: int
) -> tuple[TargetBatch, torch.Tensor]:
    """Prompt tokens (with placeholders) + continuation tokens, and the slot index."""
    prompts, starts = zip(*(insert_placeholders(hm, p, n) for p, _ in pairs), strict=True)
    conts = [c for _, c in pairs]
    batch = TargetBatch.from_tokens(prompts, conts, hm.pad_id).to(hm.device)
    lengths = [len(p) + len(c) for p, c in zip(prompts, conts, strict=True)]
    return batch, _slot_index(starts, lengths, batch.input_ids.shape[1], n)


# ---- data --------------------------------------------------------------------------------------
def _tokens(hm: HookedModel, text: str, special: bool) -> list[int]:
    tokens = hm.tokenize(text, add_special_tokens=special)
    if not tokens:
        raise TokenizationError(f"{text!r} tokenizes to nothing")
    return tokens


def _items(records: Sequence[FactRecord]) -> list[PromptItem]:
    items = format_records(records, [FORMAT])
    if len(items) != len(records):
        raise DataError("the completion format must give exactly one prompt per fact")
    return items


def _answer_pairs(hm: HookedModel, items: Sequence[PromptItem]) -> list[tuple[list, list]]:
    """(prompt tokens, TRUE answer tokens) per item: the attack's training targets."""
    return [
        (_tokens(hm, i.prompt, True), _tokens(hm, i.continuations[i.correct], False)) for i in items
    ]


@torch.no_grad()
def embedding_stats(
    hm: HookedModel, texts: Sequence[str], batch_size: int = 16
) -> tuple[float, torch.Tensor]:
    """Median L2 norm and mean vector of the ``embed`` site output over real tokens."""
    norms, total, count = [], None, 0
    for start in range(0, len(texts), batch_size):
        batch = hm.batch(texts[start : start + batch_size])
        with hm.hooks(cache=["embed"]) as cache:
            hm.forward_for_activations(**batch.model_inputs())
        real = cache["embed"].float()[batch.attention_mask.bool()]  # [tokens, d]
        norms.append(real.norm(dim=-1).cpu())
        summed = real.sum(0).cpu()
        total = summed if total is None else total + summed
        count += real.shape[0]
    if count == 0:
        raise DataError("no tokens to measure embedding norms on")
    return float(torch.cat(norms).median()), total / count


# ---- scoring -----------------------------------------------------------------------------------
@torch.no_grad()
def _soft_scores(
    hm: HookedModel, soft: SoftPrompt, items: Sequence[PromptItem], batch_size: int
) -> list[ItemScore]:
    """Like ``score_items``, with the soft prompt in front of every prompt."""
    units = []  # (item index, option index, prompt tokens, option tokens)
    for index, item in enumerate(items):
        prompt = _tokens(hm, item.prompt, True)
        for option, text in enumerate(item.continuations):
            units.append((index, option, prompt, _tokens(hm, text, False)))
    logprobs = [[0.0] * len(i.continuations) for i in items]
    n_tokens = [[0] * len(i.continuations) for i in items]
    for start in range(0, len(units), batch_size):
        chunk = units[start : start + batch_size]
        batch, slots = _pairs_batch(hm, [(u[2], u[3]) for u in chunk], soft.u.shape[0])
        with hm.hooks(interventions=[soft.intervention(slots)]):
            totals = sequence_logprobs(hm, batch).tolist()
        for (index, option, _, cont), total in zip(chunk, totals, strict=True):
            logprobs[index][option] = total
            n_tokens[index][option] = len(cont)
    return [
        ItemScore(item, tuple(lp), tuple(nt))
        for item, lp, nt in zip(items, logprobs, n_tokens, strict=True)
    ]


def _summary(scores: Sequence[ItemScore]) -> dict[str, dict[str, float]]:
    out = {}
    for metric in ("accuracy", "prob_renorm"):
        mean, sem = mean_and_sem([getattr(s, metric) for s in scores])
        out[metric] = {"mean": mean, "sem": sem}
    return out


def _loss(hm: HookedModel, soft: SoftPrompt, pairs: Sequence[tuple[list, list]]) -> torch.Tensor:
    batch, slots = _pairs_batch(hm, pairs, soft.u.shape[0])
    with hm.hooks(interventions=[soft.intervention(slots)]):
        return edit_loss(hm, batch)


@torch.no_grad()
def _full_loss(
    hm: HookedModel, soft: SoftPrompt, pairs: Sequence[tuple[list, list]], batch_size: int
) -> float:
    """Mean NLL per answer token over all ``pairs`` (token-weighted, batch by batch)."""
    total, count = 0.0, 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        n = sum(len(c) for _, c in chunk)
        total += float(_loss(hm, soft, chunk)) * n
        count += n
    return total / count


# ---- the attack --------------------------------------------------------------------------------
def soft_prompt_attack(
    hm: HookedModel,
    forget: Sequence[FactRecord],
    config: SoftPromptConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> SoftPromptResult:
    """Train a bounded soft prompt toward the TRUE answers of half of ``forget``; score the other
    half before and after (see the module docstring). Model weights are left untouched."""
    config = config or SoftPromptConfig()
    train, heldout = split_records(forget, config.train_fraction, seed)
    train_items, heldout_items = _items(train), _items(heldout)
    train_pairs = _answer_pairs(hm, train_items)
    model = hm.model
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        median, mean = embedding_stats(
            hm, [i.prompt for i in train_items + heldout_items], config.batch_size
        )
        d = mean.shape[0]
        bound = config.max_norm * median
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(config.n_tokens, d, generator=generator) * (median / math.sqrt(d))
        init = mean.expand(config.n_tokens, d) + 0.1 * noise if config.init == "mean" else noise
        soft = SoftPrompt(init.to(hm.device), median / math.sqrt(d), bound)
        before = _summary(score_items(hm, heldout_items, batch_size=config.batch_size))
        initial = _summary(_soft_scores(hm, soft, heldout_items, config.batch_size))
        loss_initial = _full_loss(hm, soft, train_pairs, config.batch_size)
        losses = _train(hm, soft, train_pairs, config, seed, progress)
        after = _summary(_soft_scores(hm, soft, heldout_items, config.batch_size))
        loss_final = _full_loss(hm, soft, train_pairs, config.batch_size)
    finally:
        for p, flag in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    chance = sum(1 / len(i.continuations) for i in heldout_items) / len(heldout_items)
    return SoftPromptResult(
        config=config.model_dump(),
        train_ids=[r.id for r in train],
        heldout_ids=[r.id for r in heldout],
        median_norm=median,
        bound=bound,
        before=before,
        initial=initial,
        after=after,
        chance=chance,
        losses=losses,
        train_loss_initial=loss_initial,
        train_loss_final=loss_final,
        vector_norms=soft.vectors.detach().norm(dim=-1).cpu().tolist(),
        vectors=soft.vectors.detach().cpu(),
    )


def _train(
    hm: HookedModel,
    soft: SoftPrompt,
    pairs: Sequence[tuple[list, list]],
    config: SoftPromptConfig,
    seed: int,
    progress: bool,
) -> list[float]:
    """AdamW on the soft prompt, minibatches cycling through a seeded shuffle, projecting after
    every step; returns each step's minibatch loss (before its update)."""
    optimizer = torch.optim.AdamW([soft.u], lr=config.lr, weight_decay=0.0)
    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    with progress_bar(config.steps, "soft-prompt attack", progress) as advance:
        for _ in range(config.steps):
            if len(order) < min(config.batch_size, len(pairs)):
                fresh = list(range(len(pairs)))
                rng.shuffle(fresh)
                order += fresh
            chosen, order = order[: config.batch_size], order[config.batch_size :]
            loss = _loss(hm, soft, [pairs[i] for i in dict.fromkeys(chosen)])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            soft.project()
            losses.append(float(loss.detach()))
            advance(1)
    return losses
