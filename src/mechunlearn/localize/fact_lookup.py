"""Fact-lookup localization (FLU): the MLPs that look a subject's attribute up.

Guo et al. (2024, "Mechanistic Unlearning"), following Nanda et al. (2023, "Fact Finding"),
localize factual recall to *fact-lookup MLPs*: early/mid MLPs at the subject tokens write the
attribute (e.g. the sport) into the residual stream, and later *extraction* attention heads
move it to the final position. Editing only the lookup MLPs removes the fact more robustly
than editing the components output-tracing methods find. The method combines three analyses,
all kept in ``evidence``:

1. **Probes** (``probes.py``): per residual row (``blocks.0.resid_pre`` then each
   ``blocks.L.resid_post``) a multinomial logistic-regression probe for the answer at the last
   subject token and at the final token, fitted on ``options.probe_split`` of the facts and
   scored on the rest (chance = 1/k). The *probe row* is the first row whose held-out
   last-subject accuracy is within ``PROBE_SATURATION_TOLERANCE`` of the best.
2. **Extraction heads by path patching** to the logits. With subject-corrupted partners
   (``pair_corruptions``), the direct effect of head ``(L, h)`` is the change in
   ``answer_logit_diff`` when only its residual contribution at the final position is
   replaced by the corrupted run's, everything downstream frozen at clean and the final norm's
   scale frozen at its clean value. This is exactly linear:

       DE(L, h) = mean_i  r_i . (c^clean_{L,h,i} - c^corr_{L,h,i}),
       r_i = P (g * (W_U[a_i] - mean_{j != a_i} W_U[o_ij])) / sigma_i

   (``c`` from ``head_contributions``; ``g`` the final norm's gain; ``P`` mean-centring for
   LayerNorm, identity for RMSNorm; ``sigma_i`` the clean final-norm scale; Gemma 2's final
   logit soft-capping is ignored, i.e. the change is measured before it). Positive = the head
   carries the clean answer. Extraction heads: heads with ``DE >= EXTRACTION_FRACTION * max
   DE``, at most ``MAX_EXTRACTION_HEADS`` (the top head alone when no head has a positive
   effect).
3. **MLP enrichment**: for each MLP layer ``l``, the corrupted run's ``mlp_out`` is patched
   into the clean run at the subject positions only (all layers batched, one row per fact and
   layer with per-row masks), and we measure the drop of (a) the extraction heads' summed
   direct contribution ``sum_{(L,h) in E} r_i . c_{L,h,i}`` at the final position (same frozen
   readout) and (b) the last-subject probe's true-class margin (true logit minus the mean of
   the others) at the probe row. Patching (rather than mean-ablation) keeps the activations on
   distribution and asks exactly "does this MLP's subject-specific output carry the fact".

Scores: ``blocks.L.mlp`` = (a) divided by its maximum over layers (signed: a negative value
means the MLP's subject output works against the extracted answer). Selection: among the MLPs
before the earliest extraction head's layer, those with (a) ``>= LOOKUP_FRACTION`` x the
largest candidate's (a); with ``options.budget`` / ``options.top_k`` the best-scoring
candidates that fit instead. FLU edits MLPs only: ``restrict_to="attn"`` is a ``ConfigError``.

``position_scores`` (rows = layers): ``probe_last_subject`` / ``probe_final`` ``[L][0]``
(held-out accuracy at ``blocks.L.resid_post``), ``head_direct_effect`` ``[L][h]``,
``mlp_enrichment`` ``[L][0]`` (the normalised score); ``evidence["position_score_columns"]``
names the columns of each.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from pydantic import Field

from mechunlearn.localize.common import fact_batches, facts_with_partners
from mechunlearn.localize.options import LocalizeOptions, MethodOptions
from mechunlearn.localize.probes import (
    DEFAULT_L2,
    Probe,
    ProbeSweep,
    encode_labels,
    probe_accuracy_by_layer,
    residual_labels,
    residual_sites,
    split_facts,
)
from mechunlearn.localize.prompts import FactPrompts, answer_logit_diff
from mechunlearn.localize.protocol import Scores
from mechunlearn.localize.registry import LOCALIZERS
from mechunlearn.models.adapters import head_contributions
from mechunlearn.models.batches import Batch
from mechunlearn.models.handle import HookedModel
from mechunlearn.models.hooks import Handler, Patch
from mechunlearn.progress import progress_bar
from mechunlearn.tasks.records import FactRecord

EXTRACTION_FRACTION = 0.1
"""A head is an extraction head if its direct effect is at least this fraction of the max."""
MAX_EXTRACTION_HEADS = 8
LOOKUP_FRACTION = 0.2
"""A candidate MLP is selected if its enrichment effect is at least this fraction of the max."""
PROBE_SATURATION_TOLERANCE = 0.05
ROWS_PER_FACT_BATCH = 4
"""Enrichment forwards hold up to this many x ``batch_size`` rows (facts x patched layers)."""


# ---- the frozen-scale readout of answer_logit_diff ----------------------------------------
def final_norm_scale(
    hm: HookedModel, resid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The final norm at ``resid [n, d]`` as ``(gain [d], sigma [n], centred)``.

    The norm is ``gain * P(x) / sigma(x) (+ bias)``; freezing ``sigma`` at its clean value
    makes it linear. The adapter says whether ``P`` centres (LayerNorm: GPT-2, NeoX; not
    RMSNorm) and what the gain adds to the weight (Gemma: ``1 + weight``).
    """
    adapter = hm.require_adapter()
    norm = hm.model.get_submodule(adapter.final_norm)
    x = resid.float()
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    if weight is None:
        gain = torch.ones(x.shape[-1], device=x.device)
    else:
        gain = adapter.final_norm_gain_offset + weight.float()
    if adapter.final_norm_centred:
        return gain, torch.sqrt(x.var(-1, unbiased=False) + eps), True
    return gain, torch.sqrt(x.pow(2).mean(-1) + eps), False


def logit_diff_readout(
    hm: HookedModel, prompts: FactPrompts, final_resid: torch.Tensor
) -> torch.Tensor:
    """Per fact, ``r_i [n, d]``: ``r_i . delta`` is the change in ``answer_logit_diff`` when the
    final residual moves by ``delta`` with the final norm's scale frozen at ``final_resid``."""
    unembed = hm.model.get_output_embeddings().weight
    device = unembed.device
    options = unembed[prompts.option_ids.to(device)].float()  # [n, k, d]
    correct = prompts.correct.to(device)
    true = options[torch.arange(options.shape[0], device=device), correct]
    k = options.shape[1]
    direction = true - (options.sum(1) - true) / (k - 1)
    gain, sigma, centred = final_norm_scale(hm, final_resid.to(device))
    readout = direction * gain.to(device)
    if centred:
        readout = readout - readout.mean(-1, keepdim=True)
    return readout / sigma[:, None]


# ---- pass 1: probes' residuals and head direct effects ------------------------------------
def _repeat(batch: Batch, times: int) -> Batch:
    return Batch(
        batch.input_ids.repeat(times, 1),
        batch.attention_mask.repeat(times, 1),
        batch.position_ids.repeat(times, 1),
        batch.lengths * times,
    )


def _final_position_reader(store: dict[str, torch.Tensor], name: str) -> Handler:
    def read(activation: torch.Tensor) -> None:
        store[name] = activation[:, -1].detach()

    return read


def _position_reader(store: dict[str, torch.Tensor], name: str, index: torch.Tensor) -> Handler:
    def read(activation: torch.Tensor) -> None:
        rows = torch.arange(activation.shape[0], device=activation.device)
        store[name] = activation[rows, index.to(activation.device)].detach()

    return read


@dataclass
class _Pass1:
    resid_subject: torch.Tensor  # [rows, n, d]
    resid_final: torch.Tensor  # [rows, n, d]
    head_effects: torch.Tensor  # [n, L, H]
    logit_diff_clean: torch.Tensor  # [n]
    logit_diff_corrupt: torch.Tensor  # [n]


def _head_contribution_at_final(
    hm: HookedModel, store: dict[str, torch.Tensor], layer: int
) -> torch.Tensor:
    z = store[f"blocks.{layer}.head"][:, None]  # [b, 1, H, d_head]
    return head_contributions(hm.model, hm.require_adapter(), layer, z)[:, 0].float()  # [b, H, d]


@torch.no_grad()
def _clean_and_corrupt_pass(
    hm: HookedModel, batches: Sequence[tuple[FactPrompts, FactPrompts]], advance
) -> _Pass1:
    n_layers = hm.dims.n_layers
    sites = residual_sites(n_layers)
    subject_rows, final_rows, effects, clean_ld, corrupt_ld = [], [], [], [], []
    for clean, corrupt in batches:
        last_subject = clean.last_subject_positions()
        store: dict[str, torch.Tensor] = {}
        handlers = [(s, _position_reader(store, f"subj:{s}", last_subject)) for s in sites]
        handlers += [(s, _final_position_reader(store, f"final:{s}")) for s in sites]
        handlers += [
            (f"blocks.{L}.head", _final_position_reader(store, f"blocks.{L}.head"))
            for L in range(n_layers)
        ]
        with hm.hooks(handlers=handlers):
            logits = hm.forward_for_activations(**clean.batch.model_inputs()).logits[:, -1]
        clean_ld.append(answer_logit_diff(logits.float(), clean).cpu())
        subject_rows.append(torch.stack([store[f"subj:{s}"].float().cpu() for s in sites]))
        final_rows.append(torch.stack([store[f"final:{s}"].float().cpu() for s in sites]))
        readout = logit_diff_readout(hm, clean, store[f"final:{sites[-1]}"])
        clean_heads = [_head_contribution_at_final(hm, store, L) for L in range(n_layers)]

        store_corrupt: dict[str, torch.Tensor] = {}
        handlers = [
            (f"blocks.{L}.head", _final_position_reader(store_corrupt, f"blocks.{L}.head"))
            for L in range(n_layers)
        ]
        with hm.hooks(handlers=handlers):
            logits = hm.forward_for_activations(**corrupt.batch.model_inputs()).logits[:, -1]
        corrupt_ld.append(answer_logit_diff(logits.float(), clean).cpu())
        per_layer = []
        for L in range(n_layers):
            delta = clean_heads[L] - _head_contribution_at_final(hm, store_corrupt, L)
            per_layer.append(torch.einsum("bhd,bd->bh", delta, readout.to(delta.device)))
        effects.append(torch.stack(per_layer, dim=1).cpu())
        advance(len(clean.records))
    return _Pass1(
        torch.cat(subject_rows, dim=1),
        torch.cat(final_rows, dim=1),
        torch.cat(effects),
        torch.cat(clean_ld),
        torch.cat(corrupt_ld),
    )


def select_extraction_heads(
    effects: torch.Tensor,
    fraction: float = EXTRACTION_FRACTION,
    max_heads: int = MAX_EXTRACTION_HEADS,
) -> list[tuple[int, int]]:
    """(layer, head) pairs with direct effect ``>= fraction * max``, best first, at most
    ``max_heads``; the single best head when none is positive."""
    flat = effects.flatten()
    order = torch.argsort(flat, descending=True).tolist()
    n_heads = effects.shape[1]
    best = float(flat[order[0]])
    if best <= 0:
        chosen = order[:1]
    else:
        chosen = [i for i in order if float(flat[i]) >= fraction * best][:max_heads]
    return [(i // n_heads, i % n_heads) for i in chosen]


# ---- pass 2: MLP enrichment -----------------------------------------------------------------
@dataclass
class _Enrichment:
    heads: torch.Tensor  # [n_layers] mean drop of the extraction heads' direct contribution
    probe: torch.Tensor  # [n_layers] mean drop of the probe margin


@dataclass
class _Readers:
    """What the enrichment forwards read: the extraction heads' outputs and the final residual
    at the final token, and the probe row at the last subject token."""

    hm: HookedModel
    extraction: Sequence[tuple[int, int]]
    probe_site: str | None

    @property
    def head_layers(self) -> list[int]:
        return sorted({L for L, _ in self.extraction})

    def handlers(
        self, store: dict[str, torch.Tensor], last_subject: torch.Tensor
    ) -> list[tuple[str, Handler]]:
        handlers = [
            (f"blocks.{L}.head", _final_position_reader(store, f"blocks.{L}.head"))
            for L in self.head_layers
        ]
        final_site = residual_sites(self.hm.dims.n_layers)[-1]
        handlers.append((final_site, _final_position_reader(store, "final")))
        if self.probe_site is not None:
            handlers.append((self.probe_site, _position_reader(store, "probe", last_subject)))
        return handlers

    def extracted(self, store: dict[str, torch.Tensor], readout: torch.Tensor) -> torch.Tensor:
        """Per row, the extraction heads' summed direct contribution to the logit difference."""
        total = torch.zeros(readout.shape[0], device=readout.device)
        for L in self.head_layers:
            contributions = _head_contribution_at_final(self.hm, store, L).to(readout.device)
            heads = [h for layer, h in self.extraction if layer == L]
            total += torch.einsum("bd,bd->b", contributions[:, heads].sum(1), readout)
        return total


def _layer_patches(
    corrupt_cache: dict[str, torch.Tensor], chunk: Sequence[int], subject: torch.Tensor
) -> list[Patch]:
    """Row block j of a ``len(chunk)``-times repeated batch gets layer ``chunk[j]``'s corrupted
    ``mlp_out`` at its subject positions; every other row and position stays clean."""
    g, b = len(chunk), subject.shape[0]
    patches = []
    for j, L in enumerate(chunk):
        mask = torch.zeros(g * b, subject.shape[1], dtype=torch.bool, device=subject.device)
        mask[j * b : (j + 1) * b] = subject
        value = corrupt_cache[f"blocks.{L}.mlp_out"].repeat(g, 1, 1)
        patches.append(Patch(f"blocks.{L}.mlp_out", value, mask))
    return patches


@torch.no_grad()
def _enrichment_pass(
    hm: HookedModel,
    batches: Sequence[tuple[FactPrompts, FactPrompts]],
    layers: Sequence[int],
    readers: _Readers,
    probe: Probe,
    labels: torch.Tensor,
    rows_per_forward: int,
    advance,
) -> _Enrichment:
    n_layers = hm.dims.n_layers
    heads_sum = torch.zeros(n_layers, dtype=torch.float64)
    probe_sum = torch.zeros(n_layers, dtype=torch.float64)
    with_probe = readers.probe_site is not None
    offset = 0
    for clean, corrupt in batches:
        b = len(clean.records)
        y = labels[offset : offset + b]
        offset += b
        last_subject = clean.last_subject_positions()
        store: dict[str, torch.Tensor] = {}
        with hm.hooks(handlers=readers.handlers(store, last_subject)):
            hm.forward_for_activations(**clean.batch.model_inputs())
        readout = logit_diff_readout(hm, clean, store["final"])
        base_heads = readers.extracted(store, readout)
        base_probe = probe.margin(store["probe"], y) if with_probe else None

        with hm.hooks(cache=[f"blocks.{L}.mlp_out" for L in layers]) as corrupt_cache:
            hm.forward_for_activations(**corrupt.batch.model_inputs())
        subject = clean.subject_mask().to(hm.device)
        group = max(1, rows_per_forward // b)
        for start in range(0, len(layers), group):
            chunk = list(layers[start : start + group])
            g = len(chunk)
            patched: dict[str, torch.Tensor] = {}
            with hm.hooks(
                _layer_patches(corrupt_cache, chunk, subject),
                handlers=readers.handlers(patched, last_subject.repeat(g)),
            ):
                hm.forward_for_activations(**_repeat(clean.batch, g).model_inputs())
            after = readers.extracted(patched, readout.repeat(g, 1)).view(g, b)
            heads_drop = (base_heads[None] - after).sum(1).double().cpu()
            if with_probe:
                margin = probe.margin(patched["probe"], y.repeat(g)).view(g, b)
                probe_drop = (base_probe[None] - margin).sum(1).double().cpu()
            for j, L in enumerate(chunk):
                heads_sum[L] += heads_drop[j]
                if with_probe:
                    probe_sum[L] += probe_drop[j]
        advance(b)
    return _Enrichment((heads_sum / offset).float(), (probe_sum / offset).float())


# ---- the method -------------------------------------------------------------------------------
def _normalise(values: torch.Tensor) -> torch.Tensor:
    top = float(values.max()) if values.numel() else 0.0
    scale = top if top > 0 else float(values.abs().max()) if values.numel() else 0.0
    return values / scale if scale > 0 else torch.zeros_like(values)


def _sweep_evidence(sweep: ProbeSweep) -> dict[str, list[float]]:
    return {"test_accuracy": sweep.test_accuracy, "train_accuracy": sweep.train_accuracy}


class FactLookupOptions(MethodOptions):
    """Fact lookup's own options. Its readout is fixed: the enrichment projection needs a
    readout linear in the final residual (the logit difference through a frozen final norm)."""

    probe_split: float = Field(
        default=0.5, gt=0, lt=1, description="fraction of facts that train the probes"
    )


@LOCALIZERS.method("fact_lookup", options=FactLookupOptions, needs_pairs=True)
def fact_lookup(
    hm: HookedModel,
    records: Sequence[FactRecord],
    options: LocalizeOptions,
    method_options: FactLookupOptions,
) -> Scores:
    """Select the fact-lookup MLPs: those before the extraction heads whose subject-position
    output carries the attribute the extraction heads read (see the module docstring).

    Candidates are the MLPs before the extraction heads; without a budget or ``top_k`` those
    with enrichment at least ``LOOKUP_FRACTION`` of the best candidate's are selected."""
    n_layers, n_heads = hm.dims.n_layers, hm.dims.n_heads
    records, unpaired = facts_with_partners(hm, records)
    labels, classes = encode_labels([r.answer for r in records])
    train, test = split_facts(labels, method_options.probe_split, options.seed)
    batches, partners = fact_batches(hm, records, options)
    n_facts = len(records)
    hm.model.eval()

    with progress_bar(2 * n_facts, "fact lookup", enabled=options.progress) as advance:
        first = _clean_and_corrupt_pass(hm, batches, advance)
        row_labels = residual_labels(n_layers)
        subject_sweep = probe_accuracy_by_layer(
            first.resid_subject, labels, train, test, DEFAULT_L2, classes, row_labels
        )
        final_sweep = probe_accuracy_by_layer(
            first.resid_final, labels, train, test, DEFAULT_L2, classes, row_labels
        )
        probe_row = subject_sweep.saturation_row(PROBE_SATURATION_TOLERANCE)
        probe_site = residual_sites(n_layers)[probe_row] if probe_row > 0 else None
        probe = subject_sweep.probes[probe_row]

        head_effects = first.head_effects.mean(0)  # [L, H]
        extraction = select_extraction_heads(head_effects)
        first_extraction = min(L for L, _ in extraction)
        last_extraction = max(L for L, _ in extraction)
        # MLP l can change the extraction heads only if l < their last layer, and the probe
        # row r (= resid_post r-1) only if l < r.
        reach = max(last_extraction, probe_row)
        layers = list(range(reach))
        enrichment = _enrichment_pass(
            hm,
            batches,
            layers,
            _Readers(hm, extraction, probe_site),
            probe,
            labels,
            ROWS_PER_FACT_BATCH * options.batch_size,
            advance,
        )

    normalised = _normalise(enrichment.heads)
    scores = {f"blocks.{L}.mlp": float(normalised[L]) for L in range(n_layers)}
    candidates = list(range(first_extraction))
    candidate_rule = "MLPs before the earliest extraction head's layer"
    if not candidates:
        candidates = list(range(last_extraction)) or list(range(n_layers))
        candidate_rule = (
            "no MLP precedes the earliest extraction head: MLPs before the latest extraction "
            "head's layer (or all MLPs)"
        )
    candidate_scores = {f"blocks.{L}.mlp": scores[f"blocks.{L}.mlp"] for L in candidates}
    best = max(candidate_scores.values())
    selected = sorted(
        (c for c, s in candidate_scores.items() if s > 0 and s >= LOOKUP_FRACTION * best),
        key=lambda c: candidate_scores[c],
        reverse=True,
    )
    rule = f"candidate MLPs with enrichment >= {LOOKUP_FRACTION} x the best candidate's"
    if options.budget is not None or options.top_k is not None:
        rule = "best-scoring candidate MLPs under the budget / top_k"

    head_matrix = head_effects.tolist()
    evidence: dict[str, object] = {
        "metric": "answer_logit_diff (true answer logit minus mean of the other options)",
        "corruption": "subject-corrupted partner facts (pair_corruptions), same token layout",
        "patching": "corrupted run's mlp_out patched into the clean run at the subject positions",
        "n_facts": n_facts,
        "skipped_without_partner": unpaired,
        "partners": partners,
        "logit_diff": {
            "clean": float(first.logit_diff_clean.mean()),
            "corrupt": float(first.logit_diff_corrupt.mean()),
        },
        "probe": {
            "rows": row_labels,
            "sites": residual_sites(n_layers),
            "classes": list(classes),
            "chance": subject_sweep.chance,
            "n_train": int(train.numel()),
            "n_test": int(test.numel()),
            "l2": DEFAULT_L2,
            "last_subject": _sweep_evidence(subject_sweep),
            "final": _sweep_evidence(final_sweep),
            "probe_row": probe_row,
            "probe_site": residual_sites(n_layers)[probe_row],
        },
        "head_direct_effect": head_matrix,
        "extraction_heads": [
            {
                "component": f"blocks.{L}.attn.head{h}",
                "layer": L,
                "head": h,
                "direct_effect": float(head_effects[L, h]),
            }
            for L, h in extraction
        ],
        "mlp_enrichment_heads": enrichment.heads.tolist(),
        "mlp_enrichment_probe": enrichment.probe.tolist(),
        "mlp_layers_patched": layers,
        "candidate_layers": candidates,
        "candidate_rule": candidate_rule,
        "selection_rule": rule,
        "thresholds": {
            "extraction_fraction": EXTRACTION_FRACTION,
            "max_extraction_heads": MAX_EXTRACTION_HEADS,
            "lookup_fraction": LOOKUP_FRACTION,
            "probe_saturation_tolerance": PROBE_SATURATION_TOLERANCE,
        },
        "position_score_columns": {
            "probe_last_subject": ["resid_post held-out accuracy"],
            "probe_final": ["resid_post held-out accuracy"],
            "head_direct_effect": [f"head{h}" for h in range(n_heads)],
            "mlp_enrichment": ["normalised enrichment (a)"],
        },
    }
    if not selected and options.budget is None and options.top_k is None:
        evidence["warning"] = (
            "no candidate MLP's subject output supports the extracted answer (no positive "
            "enrichment); nothing selected - pass a budget or top_k to force a selection"
        )
    position_scores = {
        "probe_last_subject": [[a] for a in subject_sweep.test_accuracy[1:]],
        "probe_final": [[a] for a in final_sweep.test_accuracy[1:]],
        "head_direct_effect": head_matrix,
        "mlp_enrichment": [[float(v)] for v in normalised],
    }
    return Scores(
        scores,
        candidates=candidate_scores,
        selected=selected,
        position_scores=position_scores,
        evidence=evidence,
        n_facts=n_facts,
    )
