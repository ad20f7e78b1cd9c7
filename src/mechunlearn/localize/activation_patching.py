"""Activation patching per component (denoising, clean -> corrupted), readout as a parameter.

The output-tracing localization of Mechanistic Unlearning (Guo et al. 2024) asks which
components carry the fact to the output; activation patching answers it directly (Wang et al.
2022; Heimersheim & Nanda 2024, "How to use and interpret activation patching"). For each fact
``f`` with clean prompt ``x_f`` and a subject-corrupted partner ``x~_f`` (another athlete with a
different sport and the same token layout, from ``pair_corruptions``):

- ``LD(x)``: the readout at the final position, always w.r.t. the clean fact's answer; by
  default the logit difference ``logit(answer_f) - mean_{o != answer_f} logit(o)`` (the
  ``metric`` option picks another of ``READOUTS``, e.g. ``answer_prob``);
- ``LD_patched(c)``: the corrupted run with component ``c``'s activation replaced by its clean
  value at every (real) position; ``c`` is an attention layer (``attn_out``), one head (the
  ``head`` site, restricted to that head) or an MLP (``mlp_out``);
- ``recovery(c) = (mean_f LD_patched(c) - mean_f LD_corr) / (mean_f LD_clean - mean_f LD_corr)``.

Numerators and the denominator are averaged over facts *separately* (a ratio of means, not a
mean of per-fact ratios), so facts whose corruption barely moves the logit difference cannot
blow the score up; a denominator that is still ~0 raises ``DataError``. ``scores`` holds
``|recovery|`` (a component that pushes against the answer matters as much as one that pushes
for it); the signed values are in ``evidence["recovery"]``. Selection chooses among heads and
MLPs (the paper's output-tracing granularity; whole attention layers overlap their heads), or
among attention layers and MLPs for families without per-head parameters (GPT-2, NeoX).

``position_scores["mlp"]``: ``[layer][role]`` recovery when the MLP is patched at one position
only, positions pooled by role as in causal tracing (positions before the subject are identical
in clean and corrupted prompts, so patching them does nothing and they are skipped).

Batched: the corrupted rows are replicated over many components per forward, each replica
patched at its own component through per-row masks; ``activation_patching_naive`` runs one
forward per fact and component and is the reference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from mechunlearn.errors import DataError
from mechunlearn.localize.causal_tracing import chunk_rows, pool_by_role
from mechunlearn.localize.common import final_logits, heads_have_parameters
from mechunlearn.localize.options import LocalizeOptions, ReadoutOptions
from mechunlearn.localize.prompts import (
    FactPrompts,
    build_fact_prompts,
    check_same_layout,
    pair_corruptions,
)
from mechunlearn.localize.protocol import LocalizationMethod, Scores
from mechunlearn.localize.readouts import READOUTS, Readout
from mechunlearn.localize.registry import LOCALIZERS
from mechunlearn.models.handle import HookedModel
from mechunlearn.models.hooks import Handler, Patch, position_mask
from mechunlearn.models.sites import Site
from mechunlearn.progress import progress_bar
from mechunlearn.tasks.records import FactRecord

MIN_DENOMINATOR = 1e-6
"""Smallest mean clean-minus-corrupted readout that can normalise a recovery."""

# A patch cell: (kind, layer, index). kind: "attn" | "head" (index = head) | "mlp" |
# "mlp_pos" (index = offset from the first subject token) | "none" (unpatched corrupted run).
Cell = tuple[str, int, int]
_SITE = {"attn": "attn_out", "head": "head", "mlp": "mlp_out", "mlp_pos": "mlp_out"}


def component_cells(n_layers: int, n_heads: int) -> list[Cell]:
    """Every whole-position component: per layer the attention layer, its heads and the MLP."""
    cells: list[Cell] = []
    for layer in range(n_layers):
        cells.append(("attn", layer, 0))
        cells.extend(("head", layer, h) for h in range(n_heads))
        cells.append(("mlp", layer, 0))
    return cells


def component_name(cell: Cell) -> str:
    kind, layer, index = cell
    return f"blocks.{layer}.attn.head{index}" if kind == "head" else f"blocks.{layer}.{kind}"


@dataclasses.dataclass
class _Patched:
    """Readouts (``ld``: the logit difference by default) of one patching run."""

    ld_clean: torch.Tensor  # [n]
    ld_corrupt: torch.Tensor  # [n]
    ld_components: dict[Cell, torch.Tensor]  # cell -> [n]
    ld_positions: list[torch.Tensor]  # per fact [layers, T_i] (MLP at one position)
    n_forwards: int
    n_rows: int


def _prepare(
    hm: HookedModel,
    records: Sequence[FactRecord],
    options: LocalizeOptions,
    corrupted: Sequence[FactRecord] | None,
) -> tuple[FactPrompts, FactPrompts]:
    clean = build_fact_prompts(hm, records)
    partners = pair_corruptions(hm, records, options.seed) if corrupted is None else corrupted
    corrupt = build_fact_prompts(hm, partners)
    check_same_layout(clean, corrupt)
    return clean, corrupt


def _rows(prompts: FactPrompts, rows: list[int]) -> FactPrompts:
    """The answer options of some rows (all a readout reads)."""
    return dataclasses.replace(
        prompts, option_ids=prompts.option_ids[rows], correct=prompts.correct[rows]
    )


def _patch_handler(value: torch.Tensor, mask: torch.Tensor) -> Handler:
    def patch(activation: torch.Tensor) -> torch.Tensor:
        m = mask.to(activation.device)  # sharded models: later layers may live elsewhere
        m = m.reshape(*m.shape, *([1] * (activation.dim() - m.dim())))
        return torch.where(
            m, value.to(device=activation.device, dtype=activation.dtype), activation
        )

    return patch


def _patch_batched(
    hm: HookedModel,
    clean: FactPrompts,
    corrupt: FactPrompts,
    options: LocalizeOptions,
    readout: Readout,
) -> _Patched:
    """Facts are taken ``batch_size`` at a time (so at most that many facts' clean activations
    are held); each group's corrupted rows, one per (fact, cell), run ``batch_size`` per forward."""
    n, dims, device = len(clean.records), hm.dims, hm.device
    sites = [
        Site(kind, layer).name
        for layer in range(dims.n_layers)
        for kind in ("attn_out", "head", "mlp_out")
    ]
    starts = [positions[0] for positions in clean.subject_positions]
    n_traced = [clean.width - start for start in starts]
    cells = component_cells(dims.n_layers, dims.n_heads)
    groups = [
        list(range(i, min(n, i + options.batch_size))) for i in range(0, n, options.batch_size)
    ]
    group_chunks = [
        chunk_rows(
            [
                (fact, cell)
                for fact in group
                for cell in [("none", 0, 0), *cells]
                + [
                    ("mlp_pos", lay, t)
                    for lay in range(dims.n_layers)
                    for t in range(n_traced[fact])
                ]
            ],
            options.batch_size,
        )
        for group in groups
    ]
    ld_clean, ld_corrupt = torch.zeros(n), torch.zeros(n)
    ld_components = {cell: torch.zeros(n) for cell in cells}
    ld_positions = [torch.zeros(dims.n_layers, t) for t in n_traced]
    n_forwards = n_rows = 0
    total = sum(len(chunks) for chunks in group_chunks)
    with (
        torch.no_grad(),
        progress_bar(total, "activation patching", options.progress) as advance,
    ):
        for group, chunks in zip(groups, group_chunks, strict=True):
            # the group's clean activations at every patched site, and its clean logit diffs
            inputs = {k: v[group].to(device) for k, v in clean.batch.model_inputs().items()}
            with hm.hooks(cache=sites) as clean_acts:
                logits = final_logits(hm, inputs)
            ld_clean[group] = readout(logits, _rows(clean, group)).cpu()
            local = {fact: row for row, fact in enumerate(group)}
            n_forwards, n_rows = n_forwards + 1, n_rows + len(group)
            for chunk in chunks:
                row_fact = [fact for fact, _ in chunk]
                keep = max(corrupt.batch.lengths[f] for f in row_fact)
                off = corrupt.width - keep
                inputs = {k: v[row_fact, off:] for k, v in corrupt.batch.model_inputs().items()}
                masks = _chunk_masks(
                    chunk, inputs["attention_mask"].bool(), starts, off, dims.n_heads
                )
                source = torch.tensor([local[f] for f in row_fact])
                handlers = [
                    (name, _patch_handler(_rows_of(clean_acts[name], source, off), mask))
                    for name, mask in masks.items()
                ]
                with hm.hooks(handlers=handlers):
                    logits = final_logits(hm, {k: v.to(device) for k, v in inputs.items()})
                ld = readout(logits, _rows(clean, row_fact)).cpu()
                for row, (fact, cell) in enumerate(chunk):
                    kind, layer, index = cell
                    if kind == "none":
                        ld_corrupt[fact] = ld[row]
                    elif kind == "mlp_pos":
                        ld_positions[fact][layer, index] = ld[row]
                    else:
                        ld_components[cell][fact] = ld[row]
                n_forwards, n_rows = n_forwards + 1, n_rows + len(chunk)
                advance(1)
    return _Patched(ld_clean, ld_corrupt, ld_components, ld_positions, n_forwards, n_rows)


def _rows_of(activation: torch.Tensor, rows: torch.Tensor, off: int) -> torch.Tensor:
    """Clean activations of ``rows``, without the first ``off`` (padding-only) columns."""
    return activation[rows.to(activation.device), off:]


def _chunk_masks(
    chunk: list[tuple[int, Cell]], real: torch.Tensor, starts: list[int], off: int, n_heads: int
) -> dict[str, torch.Tensor]:
    """Per patched site, which rows (and positions, heads) take the clean activation."""
    masks: dict[str, torch.Tensor] = {}
    width = real.shape[1]
    for row, (fact, (kind, layer, index)) in enumerate(chunk):
        if kind == "none":
            continue
        name = Site(_SITE[kind], layer).name
        shape = (len(chunk), width, n_heads) if kind == "head" else (len(chunk), width)
        mask = masks.setdefault(name, torch.zeros(shape, dtype=torch.bool))
        if kind == "head":
            mask[row, :, index] = real[row]
        elif kind == "mlp_pos":
            mask[row, starts[fact] + index - off] = True
        else:
            mask[row] = real[row]
    return masks


def _single_readout(
    hm: HookedModel,
    inputs: dict[str, torch.Tensor],
    target: FactPrompts,
    patches: list[Patch],
    readout: Readout,
) -> float:
    """One forward of a single corrupted row with ``patches``: the clean answer's readout."""
    with hm.hooks(patches):
        return float(readout(final_logits(hm, inputs), target)[0])


def _patch_naive(
    hm: HookedModel,
    clean: FactPrompts,
    corrupt: FactPrompts,
    options: LocalizeOptions,
    readout: Readout,
) -> _Patched:
    n, dims, device = len(clean.records), hm.dims, hm.device
    cells = component_cells(dims.n_layers, dims.n_heads)
    ld_clean, ld_corrupt = torch.zeros(n), torch.zeros(n)
    ld_components = {cell: torch.zeros(n) for cell in cells}
    ld_positions: list[torch.Tensor] = []
    n_forwards = 0
    with (
        torch.no_grad(),
        progress_bar(n, "activation patching (naive)", options.progress) as advance,
    ):
        for fact in range(n):
            good = build_fact_prompts(hm, [clean.records[fact]])
            bad = build_fact_prompts(hm, [corrupt.records[fact]])
            check_same_layout(good, bad)
            width, first = good.width, good.subject_positions[0][0]
            with hm.hooks(cache=["attn_out", "head", "mlp_out"]) as cache:
                logits = final_logits(hm, good.batch.to(device).model_inputs())
            ld_clean[fact] = float(readout(logits, good)[0])
            bad_inputs = bad.batch.to(device).model_inputs()
            ld_corrupt[fact] = _single_readout(hm, bad_inputs, good, [], readout)
            for cell in cells:
                kind, layer, index = cell
                site = Site(_SITE[kind], layer)
                mask = None
                if kind == "head":
                    mask = torch.zeros(1, width, dims.n_heads, dtype=torch.bool, device=device)
                    mask[..., index] = True
                patch = Patch(site, cache[site.name], mask)
                ld_components[cell][fact] = _single_readout(hm, bad_inputs, good, [patch], readout)
            positions = torch.zeros(dims.n_layers, width - first)
            for layer in range(dims.n_layers):
                site = Site("mlp_out", layer)
                for offset in range(width - first):
                    mask = position_mask(1, width, [first + offset], device=device)
                    patch = Patch(site, cache[site.name], mask)
                    positions[layer, offset] = _single_readout(
                        hm, bad_inputs, good, [patch], readout
                    )
            ld_positions.append(positions)
            n_forwards += 2 + len(cells) + positions.numel()
            advance(1)
    return _Patched(ld_clean, ld_corrupt, ld_components, ld_positions, n_forwards, n_forwards)


def _summarise(
    hm: HookedModel,
    clean: FactPrompts,
    corrupt: FactPrompts,
    patched: _Patched,
    readout: Readout,
    implementation: str,
) -> Scores:
    mean_clean, mean_corrupt = float(patched.ld_clean.mean()), float(patched.ld_corrupt.mean())
    denominator = mean_clean - mean_corrupt
    if abs(denominator) < MIN_DENOMINATOR:
        raise DataError(
            f"the corruption does not change the answer's {readout.name} on average (clean "
            f"{mean_clean:.4g}, corrupted {mean_corrupt:.4g}); recovery cannot be normalised - use "
            "facts the model knows, or other corrupting partners"
        )
    recovery = {
        component_name(cell): (float(ld.mean()) - mean_corrupt) / denominator
        for cell, ld in patched.ld_components.items()
    }
    scores = {name: abs(value) for name, value in recovery.items()}
    if heads_have_parameters(hm):
        candidates = {name: s for name, s in scores.items() if not name.endswith(".attn")}
        selection = "heads and MLPs by |recovery|; blocks.L.attn scored but not selected"
    else:
        candidates = {name: s for name, s in scores.items() if ".head" not in name}
        selection = "attention layers and MLPs by |recovery| (no per-head parameters here)"
    n_subject = [len(p) for p in clean.subject_positions]
    effects = [ld - patched.ld_corrupt[f] for f, ld in enumerate(patched.ld_positions)]
    labels, pooled = pool_by_role(effects, n_subject, keep_dims=1)  # [layers, roles]
    evidence = {
        "implementation": implementation,
        "metric": readout.name,
        "recovery": recovery,
        "ld_clean": patched.ld_clean.tolist(),
        "ld_corrupt": patched.ld_corrupt.tolist(),
        "mean_ld_clean": mean_clean,
        "mean_ld_corrupt": mean_corrupt,
        "pairs": [
            [a.subject, b.subject] for a, b in zip(clean.records, corrupt.records, strict=True)
        ],
        "selection": selection,
        "n_forwards": patched.n_forwards,
        "n_rows": patched.n_rows,
    }
    return Scores(
        scores,
        candidates=candidates,
        position_scores={"mlp": (pooled / denominator).tolist()},
        position_labels=labels,
        evidence=evidence,
        n_facts=len(clean.records),
    )


def _score(
    hm: HookedModel,
    records: Sequence[FactRecord],
    options: LocalizeOptions,
    method_options: ReadoutOptions,
    corrupted: Sequence[FactRecord] | None,
    patch,
    implementation: str,
) -> Scores:
    readout = READOUTS.get(method_options.metric)
    clean, corrupt = _prepare(hm, records, options, corrupted)
    patched = patch(hm, clean, corrupt, options, readout)
    return _summarise(hm, clean, corrupt, patched, readout, implementation)


@LOCALIZERS.method("activation_patching", options=ReadoutOptions, needs_pairs=True)
def activation_patching(
    hm: HookedModel,
    records: Sequence[FactRecord],
    options: LocalizeOptions,
    method_options: ReadoutOptions,
    corrupted: Sequence[FactRecord] | None = None,
) -> Scores:
    """Denoising activation patching of every attention layer, head and MLP, batched.

    ``corrupted``: the corrupted partner of each record (default: ``pair_corruptions`` with
    ``options.seed``); it must have the same token layout, else ``DataError``.
    """
    return _score(hm, records, options, method_options, corrupted, _patch_batched, "batched")


def _activation_patching_naive(
    hm: HookedModel,
    records: Sequence[FactRecord],
    options: LocalizeOptions,
    method_options: ReadoutOptions,
    corrupted: Sequence[FactRecord] | None = None,
) -> Scores:
    """Reference implementation: one unpadded single-row forward per fact and component,
    patching from a cached clean run with ``Patch``; same numbers as ``activation_patching``."""
    return _score(hm, records, options, method_options, corrupted, _patch_naive, "naive")


activation_patching_naive = LocalizationMethod(
    "activation_patching", _activation_patching_naive, ReadoutOptions, needs_pairs=True
)
"""The reference as a (not registered) method: same protocol, same options."""


__all__ = [
    "MIN_DENOMINATOR",
    "activation_patching",
    "activation_patching_naive",
    "component_cells",
    "component_name",
]
