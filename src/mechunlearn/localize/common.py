"""Helpers shared by the patching-based localization methods (one place, so they agree)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from mechunlearn.errors import DataError
from mechunlearn.localize.options import LocalizeOptions
from mechunlearn.localize.prompts import (
    FactPrompts,
    build_fact_prompts,
    check_same_layout,
    pair_corruptions,
)
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.records import FactRecord


def final_logits(hm: HookedModel, inputs: FactPrompts | Mapping[str, object]) -> torch.Tensor:
    """Logits at the last position ``[batch, vocab]``, unembedding only that position when the
    model supports it (a 256k vocabulary over every position would dominate the cost).

    ``inputs`` are prompts or forward keyword arguments (which may carry a KV cache and
    ``use_cache=True``; by default no cache is built).
    """
    if isinstance(inputs, FactPrompts):
        inputs = inputs.batch.to(hm.device).model_inputs()
    kwargs = {"use_cache": False, **inputs}
    if hm.keeps_logits:
        kwargs["logits_to_keep"] = 1
    return hm.model(**kwargs).logits[:, -1]


def heads_have_parameters(hm: HookedModel) -> bool:
    """Whether per-head components resolve to parameters (not for fused-qkv families), i.e.
    whether a trainer could update one head alone."""
    return hm.require_adapter().per_head_params


def facts_with_partners(
    hm: HookedModel, records: Sequence[FactRecord]
) -> tuple[list[FactRecord], list[str]]:
    """The facts that have a corrupting partner (same token layout, different answer), and
    the ids of those that have none: patching cannot score a fact without one."""
    prompts = build_fact_prompts(hm, records)
    layouts = [(lay[1], lay[2], lay[3]) for lay in prompts.relative_layout()]
    answers: dict[tuple[int, ...], set[str]] = {}
    for layout, record in zip(layouts, records, strict=True):
        answers.setdefault(layout, set()).add(record.answer)
    kept, dropped = [], []
    for layout, record in zip(layouts, records, strict=True):
        (kept if len(answers[layout]) > 1 else dropped).append(record)
    if not kept:
        raise DataError(
            f"none of the {len(records)} facts has a corrupting partner (another fact with a "
            "different answer and the same token layout); add more facts"
        )
    return kept, [r.id for r in dropped]


def fact_batches(
    hm: HookedModel, records: Sequence[FactRecord], options: LocalizeOptions
) -> tuple[list[tuple[FactPrompts, FactPrompts]], dict[str, str]]:
    """Clean and corrupted prompts per batch of ``options.batch_size`` facts, layouts checked.

    ``records`` must all have partners (see ``facts_with_partners``). Also returns record id
    -> corrupting partner's id, for the evidence.
    """
    partners = pair_corruptions(hm, records, seed=options.seed)
    batches = []
    for start in range(0, len(records), options.batch_size):
        chunk = list(records[start : start + options.batch_size])
        clean = build_fact_prompts(hm, chunk)
        corrupt = build_fact_prompts(hm, partners[start : start + options.batch_size])
        check_same_layout(clean, corrupt)
        batches.append((clean, corrupt))
    return batches, {r.id: p.id for r, p in zip(records, partners, strict=True)}
