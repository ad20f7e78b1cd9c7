"""Causal tracing (ROME: Meng et al. 2022, "Locating and Editing Factual Associations in GPT").

Semantics follow kmeng01/rome ``experiments/causal_trace.py``:

- clean run: the fact prompt; ``P* = P(answer | clean)`` at the final position, for the first
  token of the true answer;
- corrupted run: ``e_i <- e_i + eps_i`` with ``eps_i ~ N(0, (nu * sigma)^2 I)`` added to the
  token embeddings (the ``embed`` site) at every subject position ``i``, where ``sigma`` is the
  standard deviation of the embedding vectors of all subject tokens of the given facts and
  ``nu = noise_scale`` (ROME uses 3); ``P_corr = P(answer | corrupted)``;
- corrupted-with-restoration run: the corrupted run with one state ``h_t^(l)`` reset to its
  clean value: the layer's output (``resid`` = ``blocks.l.resid_post``), or the MLP / attention
  sub-block output (``mlp_out`` / ``attn_out``) at ``window`` consecutive layers centred on
  ``l`` (ROME's ``trace_important_window``: layers ``l - window // 2 .. l + ceil(window / 2) - 1``,
  clipped to the model);
- indirect effect ``IE(t, l) = P(answer | corrupted, restore h_t^(l)) - P_corr``, averaged over
  facts and noise draws (the same draw for every restoration of one fact, so rows differ only in
  the restored cell), with positions pooled by role as in ROME's averaged plots (first / middle /
  last subject token, first subsequent token, further tokens, last token).

Only positions from the first subject token on are traced: earlier positions see no noise
(causal attention), so restoring them is a no-op with an indirect effect of exactly zero.

Efficiency (KV-cache reuse, plain HF forwards with a ``DynamicCache``): with causal attention a
restoration at position ``t`` changes nothing before ``t``, so every restored run shares the
corrupted run's keys and values of positions ``< t`` (and positions before the first subject
token carry no noise). Per fact, the prompt up to the first subject token is run once into a
cache (one row per noise draw), which is then extended one corrupted token at a time (the last
step gives ``P_corr``); at each traced position ``t`` only the suffix
``t..end`` is run, for every (kind, layer, noise draw) cell as a batch row over a copy of the
``t``-token cache, with the noise added to the suffix's subject embeddings and the clean
activation (from one cached clean forward) restored at the suffix's first token. Each row
costs ``end - t`` tokens instead of the whole prompt. Every such forward also holds an
unrestored row per noise draw, and each restored row's effect is taken against it, so a
restoration that cannot reach the final position has an effect of exactly zero rather than
float noise between differently shaped forwards. Sliding-window layers (Gemma 2/3) are handled
by the cache itself. ``causal_trace_naive`` runs one full single-row forward per cell from a
cached clean run and is the reference.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from transformers import DynamicCache

from mechunlearn.errors import DataError
from mechunlearn.localize.common import final_logits
from mechunlearn.localize.options import LocalizeOptions, ReadoutName, ReadoutOptions
from mechunlearn.localize.prompts import FactPrompts, build_fact_prompts
from mechunlearn.localize.protocol import LocalizationMethod, Scores
from mechunlearn.localize.readouts import READOUTS, Readout
from mechunlearn.localize.registry import LOCALIZERS
from mechunlearn.models.handle import HookedModel, cache_argument
from mechunlearn.models.hooks import Intervention, Patch, Perturb, position_mask
from mechunlearn.models.sites import Site
from mechunlearn.progress import progress_bar
from mechunlearn.tasks.records import FactRecord

ROLES: tuple[str, ...] = (
    "first subject",
    "middle subject",
    "last subject",
    "first after",
    "further tokens",
    "last token",
)
SUBJECT_ROLES: tuple[str, ...] = ROLES[:3]
TRACE_KINDS: dict[str, str] = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}
"""Trace kind -> the site restored (ROME restores the layer output, MLP output, attention output)."""
SCORED_KINDS: dict[str, tuple[str, ...]] = {
    "subject": ("mlp_out", "attn_out"),
    "other": ("attn_out",),
}
"""``trace_cells="scored"``: the sites restored at subject positions and at the others, the
cells that the component scores read (see ``causal_trace``)."""


# ---- helpers shared with activation patching ---------------------------------------------
def role_offsets(n_subject: int, n_traced: int) -> dict[str, list[int]]:
    """Offsets (0 = first subject token) of each role among ``n_traced`` traced positions.

    Mirrors ROME's averaging: a one-token subject is both the first and the last subject token,
    and a prompt ending right after the subject has its first subsequent token also as last.
    """
    last_subject, last = n_subject - 1, n_traced - 1
    first_after = n_subject
    return {
        "first subject": [0],
        "middle subject": list(range(1, last_subject)),
        "last subject": [last_subject],
        "first after": [first_after] if first_after <= last else [],
        "further tokens": list(range(first_after + 1, last)),
        "last token": [last],
    }


def pool_by_role(
    per_fact: Sequence[torch.Tensor], n_subject: Sequence[int], keep_dims: int
) -> tuple[list[str], torch.Tensor]:
    """Average per-position values by role, pooling every (fact, ..., position) of a role.

    ``per_fact[i]`` has shape ``[*kept, *pooled, T_i]`` (``keep_dims`` leading dims kept, the
    rest pooled along with the fact's ``T_i`` traced positions). Roles no fact has are dropped.
    Returns the role labels and a ``[*kept, n_roles]`` tensor.
    """
    labels: list[str] = []
    columns: list[torch.Tensor] = []
    for role in ROLES:
        parts = []
        for values, n_subj in zip(per_fact, n_subject, strict=True):
            offsets = role_offsets(n_subj, values.shape[-1])[role]
            if offsets:
                parts.append(values[..., offsets].flatten(start_dim=keep_dims))
        if parts:
            labels.append(role)
            columns.append(torch.cat(parts, dim=-1).mean(dim=-1))
    return labels, torch.stack(columns, dim=-1)


def chunk_rows(jobs: Sequence[tuple], capacity: int, extra_per_fact: int = 0) -> list[list[tuple]]:
    """Split jobs (first element: fact index) into forwards of at most ``capacity`` rows,
    counting ``extra_per_fact`` rows (e.g. a clean row) for each distinct fact of a forward."""
    chunks: list[list[tuple]] = []
    current: list[tuple] = []
    facts: set[int] = set()
    for job in jobs:
        added = 1 + (0 if job[0] in facts else extra_per_fact)
        if current and len(current) + extra_per_fact * len(facts) + added > capacity:
            chunks.append(current)
            current, facts = [], set()
        current.append(job)
        facts.add(job[0])
    if current:
        chunks.append(current)
    return chunks


# ---- causal tracing ------------------------------------------------------------------------
def window_layers(layer: int, window: int, n_layers: int) -> range:
    """ROME's window of layers restored around ``layer``."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def embedding_std(hm: HookedModel, prompts: FactPrompts) -> float:
    """Std of all elements of the ``embed``-site vectors of every subject token (ROME's sigma)."""
    module = hm.model.get_submodule(hm.require_adapter().hook_point(Site("embed")).module)
    embedded = module(prompts.batch.input_ids.to(hm.device))
    vectors = embedded[prompts.subject_mask().to(embedded.device)].float()
    if vectors.numel() < 2:
        raise DataError("need at least two subject-token embedding values to estimate sigma")
    return float(vectors.std())


def noise_draws(
    prompts: FactPrompts, d_model: int, std: float, n_samples: int, seed: int
) -> list[list[torch.Tensor]]:
    """``[fact][sample] -> [n_subject_tokens, d_model]`` Gaussian noise, drawn on the CPU from
    ``seed`` in a fixed order so every implementation and device sees the same draws."""
    generator = torch.Generator().manual_seed(seed)
    return [
        [torch.randn(len(positions), d_model, generator=generator) * std for _ in range(n_samples)]
        for positions in prompts.subject_positions
    ]


@dataclass
class _Trace:
    """Raw readouts (``P``: ROME's answer probability by default) of one tracing run."""

    clean: torch.Tensor  # [n]
    corrupt: torch.Tensor  # [n, samples]
    effects: list[torch.Tensor]  # per fact [samples, kinds, layers, T_i]: P_restored - P_corr
    n_forwards: int
    n_rows: int


def _restored_layers(site_kind: str, layer: int, window: int, n_layers: int) -> Sequence[int]:
    """The layer output is restored at one layer; sub-block outputs over ROME's window."""
    return [layer] if site_kind == "resid_post" else window_layers(layer, window, n_layers)


def _last_logits(
    hm: HookedModel,
    input_ids: torch.Tensor,
    start: int,
    cache: DynamicCache,
    interventions: Sequence[Intervention] = (),
) -> torch.Tensor:
    """Final-position logits ``[rows, vocab]`` of unpadded ``input_ids`` that continue the
    ``start`` tokens held in ``cache`` (which the forward extends)."""
    end = start + input_ids.shape[1]
    kwargs = {
        "input_ids": input_ids,
        "position_ids": torch.arange(start, end, device=input_ids.device).expand_as(input_ids),
        cache_argument(hm.model): cache,
        "use_cache": True,
    }
    with hm.hooks(interventions):
        return final_logits(hm, kwargs)


def _rows_of(cache: DynamicCache, rows: torch.Tensor) -> DynamicCache:
    """A copy of ``cache`` holding its batch rows ``rows`` (repeats allowed)."""
    copied = copy.deepcopy(cache)
    copied.batch_select_indices(rows)
    return copied


def _restore_masks(
    cells: Sequence[tuple[str, int]], skip: int, width: int, window: int, n_layers: int
) -> dict[str, torch.Tensor]:
    """Site name -> ``[skip + len(cells), width]`` mask restoring each (site kind, layer) cell
    at the first position of its row (rows after the ``skip`` unrestored ones)."""
    masks: dict[str, torch.Tensor] = {}
    for row, (kind, layer) in enumerate(cells, start=skip):
        for lay in _restored_layers(kind, layer, window, n_layers):
            mask = masks.setdefault(
                Site(kind, lay).name, torch.zeros(skip + len(cells), width, dtype=torch.bool)
            )
            mask[row, 0] = True
    return masks


def _read_fact(
    readout: Readout, logits: torch.Tensor, prompts: FactPrompts, fact: int
) -> torch.Tensor:
    """The readout of every row of ``logits`` for fact ``fact``'s answer (on the CPU)."""
    n = logits.shape[0]
    option_ids = prompts.option_ids[fact].to(logits.device).expand(n, -1)
    correct = prompts.correct[fact].to(logits.device).expand(n)
    return readout.read(logits.float(), option_ids, correct).cpu()


def _trace_cached(
    hm: HookedModel,
    prompts: FactPrompts,
    noise: list[list[torch.Tensor]],
    options: LocalizeOptions,
    own: CausalTracingOptions,
) -> _Trace:
    n, n_layers, n_samples = len(prompts.records), hm.dims.n_layers, own.n_noise_samples
    kinds = list(TRACE_KINDS.values())

    def chunks_for(traced: Sequence[str]) -> list[list[tuple[int, int, int]]]:
        jobs = [
            (sample, kinds.index(kind), layer)
            for sample in range(n_samples)
            for kind in traced
            for layer in range(n_layers)
        ]
        # Each forward also holds an unrestored row per noise draw it serves: its P_corr.
        return chunk_rows(jobs, max(2, options.batch_size), extra_per_fact=1)

    every_kind = chunks_for(kinds)
    scored = {kind: chunks_for(traced) for kind, traced in SCORED_KINDS.items()}
    p_clean, p_corrupt, effects = torch.zeros(n), torch.zeros(n, n_samples), []
    device, n_forwards, n_rows = hm.device, 0, 0
    readout = READOUTS.get(own.metric)

    with torch.no_grad(), progress_bar(n, "causal tracing", options.progress) as advance:
        for fact in range(n):
            length = prompts.batch.lengths[fact]
            off = prompts.width - length
            ids = prompts.batch.input_ids[fact : fact + 1, off:].to(device)  # unpadded
            subject = [p - off for p in prompts.subject_positions[fact]]
            first = subject[0]
            with hm.hooks(cache=list(kinds)) as clean:
                logits = _last_logits(hm, ids, 0, DynamicCache(config=hm.model.config))
            p_clean[fact] = _read_fact(readout, logits, prompts, fact)[0]
            delta = torch.zeros(n_samples, length, noise[fact][0].shape[-1])
            delta[:, subject] = torch.stack(noise[fact])
            delta = delta.to(device)
            # The corrupted run's cache (a row per noise draw) up to the first subject token,
            # where the noise starts; extended by one corrupted token per traced position.
            prefix = DynamicCache(config=hm.model.config)
            if first > 0:
                _last_logits(hm, ids[:, :first].expand(n_samples, -1), 0, prefix)
            n_forwards, n_rows = n_forwards + 1 + (first > 0), n_rows + 1 + n_samples * (first > 0)
            # cells a scored trace skips stay NaN (dropped from the position scores)
            effect = torch.full(
                (n_samples, len(kinds), n_layers, length - first),
                0.0 if own.trace_cells == "all" else torch.nan,
            )
            for t in range(first, length):
                width = length - t
                chunks = every_kind
                if own.trace_cells == "scored":
                    chunks = scored["subject" if t in subject else "other"]
                for chunk in chunks:
                    draws = list(dict.fromkeys(sample for sample, _, _ in chunk))
                    # Row -> noise draw (on the CPU: it indexes caches on any shard).
                    rows = torch.tensor(draws + [sample for sample, _, _ in chunk])
                    cells = [(kinds[kind], layer) for _, kind, layer in chunk]
                    masks = _restore_masks(cells, len(draws), width, own.window, n_layers)
                    interventions: list[Intervention] = [Perturb("embed", delta[rows, t:])]
                    interventions += [
                        Patch(name, clean[name][:, t : t + 1], mask.to(device))
                        for name, mask in masks.items()
                    ]
                    cache = _rows_of(prefix, rows)
                    suffix = ids[:, t:].expand(len(rows), -1)
                    logits = _last_logits(hm, suffix, t, cache, interventions)
                    probs = _read_fact(readout, logits, prompts, fact)
                    for row, (sample, kind, layer) in enumerate(chunk, start=len(draws)):
                        corrupt = probs[draws.index(sample)]
                        effect[sample, kind, layer, t - first] = probs[row] - corrupt
                    if t == length - 1:
                        p_corrupt[fact, draws] = probs[: len(draws)]
                    n_forwards, n_rows = n_forwards + 1, n_rows + len(rows)
                if t < length - 1:
                    step = [Perturb("embed", delta[:, t : t + 1])]
                    _last_logits(hm, ids[:, t : t + 1].expand(n_samples, -1), t, prefix, step)
                    n_forwards, n_rows = n_forwards + 1, n_rows + n_samples
            effects.append(effect)
            advance(1)
    return _Trace(p_clean, p_corrupt, effects, n_forwards, n_rows)


def _single_readout(
    hm: HookedModel,
    inputs: dict[str, torch.Tensor],
    prompts: FactPrompts,
    readout: Readout,
    interventions: list,
) -> float:
    """The readout at the final position of a one-row forward under ``interventions``."""
    with hm.hooks(interventions):
        logits = final_logits(hm, inputs)
    return float(_read_fact(readout, logits, prompts, 0)[0])


def _trace_naive(
    hm: HookedModel,
    prompts: FactPrompts,
    noise: list[list[torch.Tensor]],
    options: LocalizeOptions,
    own: CausalTracingOptions,
) -> _Trace:
    n, n_layers, n_samples = len(prompts.records), hm.dims.n_layers, own.n_noise_samples
    kinds = list(TRACE_KINDS.values())
    p_clean, p_corrupt, effects = torch.zeros(n), torch.zeros(n, n_samples), []
    n_forwards, device = 0, hm.device
    readout = READOUTS.get(own.metric)
    with torch.no_grad(), progress_bar(n, "causal tracing (naive)", options.progress) as advance:
        for fact in range(n):
            single = build_fact_prompts(hm, [prompts.records[fact]])
            inputs = single.batch.to(device).model_inputs()
            width, subject = single.width, single.subject_positions[0]
            with hm.hooks(cache=list(kinds)) as cache:
                logits = final_logits(hm, inputs)
            n_forwards += 1
            p_clean[fact] = float(_read_fact(readout, logits, single, 0)[0])
            n_traced = width - subject[0]
            restored = torch.zeros(n_samples, len(kinds), n_layers, n_traced)
            for sample in range(n_samples):
                delta = torch.zeros(1, width, noise[fact][sample].shape[-1])
                delta[0, subject] = noise[fact][sample]
                corrupt = Perturb("embed", delta.to(device))
                p_corrupt[fact, sample] = _single_readout(hm, inputs, single, readout, [corrupt])
                for k, kind in enumerate(kinds):
                    for layer in range(n_layers):
                        layers = _restored_layers(kind, layer, own.window, n_layers)
                        for offset in range(n_traced):
                            mask = position_mask(1, width, [subject[0] + offset], device=device)
                            patches = [
                                Patch(Site(kind, lay), cache[Site(kind, lay).name], mask)
                                for lay in layers
                            ]
                            restored[sample, k, layer, offset] = _single_readout(
                                hm, inputs, single, readout, [corrupt, *patches]
                            )
            effects.append(restored - p_corrupt[fact][:, None, None, None])
            n_forwards += n_samples * (1 + restored[0].numel())
            advance(1)
    return _Trace(p_clean, p_corrupt, effects, n_forwards, n_forwards)


class CausalTracingOptions(ReadoutOptions):
    """Causal tracing's own options (ROME's defaults)."""

    metric: ReadoutName = Field(
        default="answer_prob",
        description="readout at the final position (ROME: the answer's probability)",
    )
    noise_scale: float = Field(
        default=3.0, gt=0, description="noise std in units of the subject embeddings' std"
    )
    n_noise_samples: int = Field(default=1, ge=1, description="noise draws per fact")
    window: int = Field(
        default=1, ge=1, description="restore sub-block outputs at this many consecutive layers"
    )
    trace_cells: Literal["all", "scored"] = Field(
        default="all",
        description="'all' restores every (kind, layer, position) cell for the heatmaps; "
        "'scored' only those the component scores read (MLP outputs at subject tokens, "
        "attention outputs everywhere): about half the work, the same scores",
    )


def _causal_trace(
    hm: HookedModel,
    records: Sequence[FactRecord],
    options: LocalizeOptions,
    own: CausalTracingOptions,
    tracer: Callable[..., _Trace],
    implementation: str,
) -> Scores:
    prompts = build_fact_prompts(hm, records)
    with torch.no_grad():
        sigma = embedding_std(hm, prompts)
    d_model = hm.model.get_input_embeddings().weight.shape[-1]
    noise_std = own.noise_scale * sigma
    noise = noise_draws(prompts, d_model, noise_std, own.n_noise_samples, options.seed)
    trace = tracer(hm, prompts, noise, options, own)

    effects = [
        e.permute(1, 2, 0, 3) for e in trace.effects
    ]  # per fact [kinds, layers, samples, T_i]
    n_subject = [len(p) for p in prompts.subject_positions]
    labels, pooled = pool_by_role(effects, n_subject, keep_dims=2)  # [kinds, layers, roles]
    position_scores = {kind: pooled[k].tolist() for k, kind in enumerate(TRACE_KINDS)}
    subject_columns = [c for c, label in enumerate(labels) if label in SUBJECT_ROLES]
    mlp, attn = list(TRACE_KINDS).index("mlp"), list(TRACE_KINDS).index("attn")
    columns: dict[str, list[str]] = {}
    if own.trace_cells == "scored":  # only what was traced
        del position_scores["resid"]
        position_scores["mlp"] = pooled[mlp][:, subject_columns].tolist()
        columns["mlp"] = [labels[c] for c in subject_columns]
    scores: dict[str, float] = {}
    for layer in range(hm.dims.n_layers):
        scores[f"blocks.{layer}.mlp"] = float(pooled[mlp, layer, subject_columns].max())
        scores[f"blocks.{layer}.attn"] = float(pooled[attn, layer].max())
    evidence = {
        "implementation": implementation,
        "embedding_std": sigma,
        "noise_scale": own.noise_scale,
        "noise_std": noise_std,
        "n_noise_samples": own.n_noise_samples,
        "window": own.window,
        "restored_sites": {k: v for k, v in TRACE_KINDS.items() if k in position_scores},
        "trace_cells": own.trace_cells,
        "position_score_columns": columns,
        "metric": own.metric,
        "metric_clean": trace.clean.tolist(),
        "metric_corrupt": trace.corrupt.mean(1).tolist(),
        "mean_metric_clean": float(trace.clean.mean()),
        "mean_metric_corrupt": float(trace.corrupt.mean()),
        "component_scores": "mlp: max IE over subject roles; attn: max IE over all roles",
        "n_forwards": trace.n_forwards,
        "n_rows": trace.n_rows,
    }
    return Scores(
        scores,
        position_scores=position_scores,
        position_labels=labels,
        evidence=evidence,
        n_facts=len(records),
    )


@LOCALIZERS.method("causal_tracing", options=CausalTracingOptions)
def causal_trace(
    hm: HookedModel,
    records: Sequence[FactRecord],
    options: LocalizeOptions,
    method_options: CausalTracingOptions,
) -> Scores:
    """ROME causal tracing, batched over cells and reusing the corrupted run's KV cache (see the
    module docstring); ``options.batch_size`` bounds the rows of one restoring forward (the
    restored cells plus an unrestored row per noise draw among them).

    ``position_scores``: ``resid`` / ``mlp`` / ``attn`` -> ``[layer][role]`` average indirect
    effects; ``scores``: ``blocks.L.mlp`` = max over subject roles of the MLP effect (ROME's
    site of factual recall), ``blocks.L.attn`` = max over all roles of the attention effect.

    ``trace_cells="scored"`` restores only the cells those scores read (MLP outputs at subject
    tokens, attention outputs at every traced token): the same scores from about half the rows
    (the layer-output trace and the MLP's later positions are what the heatmaps add);
    ``position_scores`` then holds ``mlp`` (subject roles, named in
    ``evidence["position_score_columns"]``) and ``attn``.
    """
    return _causal_trace(hm, records, options, method_options, _trace_cached, "cached")


def _causal_trace_naive(
    hm: HookedModel,
    records: Sequence[FactRecord],
    options: LocalizeOptions,
    method_options: CausalTracingOptions,
) -> Scores:
    """Reference implementation: one unpadded single-row forward per fact, noise draw and cell,
    restoring from a cached clean run with ``Patch``; same numbers as ``causal_trace``."""
    return _causal_trace(hm, records, options, method_options, _trace_naive, "naive")


causal_trace_naive = LocalizationMethod("causal_tracing", _causal_trace_naive, CausalTracingOptions)
"""The reference as a (not registered) method: same protocol, same options."""


__all__ = [
    "ROLES",
    "SUBJECT_ROLES",
    "TRACE_KINDS",
    "causal_trace",
    "causal_trace_naive",
    "chunk_rows",
    "embedding_std",
    "noise_draws",
    "pool_by_role",
    "role_offsets",
    "window_layers",
]
