"""Attribution patching (Nanda 2023, "Attribution Patching: Activation Patching At Industrial
Scale"; Syed, Rager & Conmy 2023, "Attribution Patching Outperforms Automated Circuit Discovery").

Activation patching asks, per component ``c``, how much the metric moves when ``c``'s clean
activation is replaced by its activation on a corrupted input (one forward per component).
Attribution patching linearises that around the clean run, so every component is scored from
one clean forward + backward and one corrupted forward:

    M(clean; a_c := a_c^corr) - M(clean)  ~=  grad_{a_c} M(clean) . (a_c^corr - a_c^clean)

We report the estimated *drop* of the metric when ``c`` is noised (the sign flipped), summed
over positions and features:

    A(c) = sum_{pos, feat} dM/da_c(clean) * (a_c^clean - a_c^corr)

so ``A(c) > 0`` means ``c`` carries clean-fact information that supports the true answer.
``M`` is ``answer_logit_diff`` (true-answer logit minus the mean of the other options' logits)
averaged over facts; corrupted inputs are the ``pair_corruptions`` partners (another fact with
a different answer and the same token layout). Component score = ``|A(c)|``; signed values are
in ``evidence``.

Components and the activation each is read at:

- ``blocks.L.attn``: ``attn_out`` (the attention sub-block's residual contribution);
- ``blocks.L.attn.head{H}``: the ``head`` site ``z`` (input of o_proj, ``[b, s, H, d_head]``),
  summed over head H's features. o_proj is linear and its bias is the same in both runs, so
  for families without a post-attention norm the heads' estimates sum exactly to the layer's;
  Gemma's post-attention norm makes the two differ slightly;
- ``blocks.L.mlp``: ``mlp_out``.

Per-position scores (``position_scores["attn"|"mlp"]``, ``[layer][role]``) sum ``A`` over the
positions of each role (``POSITION_ROLES``, relative to each prompt's subject), averaged over
facts, magnitudes; signed values in ``evidence["position_scores_signed"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mechunlearn.localize.common import (
    fact_batches,
    facts_with_partners,
    final_logits,
    heads_have_parameters,
)
from mechunlearn.localize.options import LocalizeOptions, ReadoutOptions
from mechunlearn.localize.prompts import FactPrompts, check_same_layout
from mechunlearn.localize.protocol import Scores, component_kind
from mechunlearn.localize.readouts import LOGIT_DIFF, READOUTS, Readout
from mechunlearn.localize.registry import LOCALIZERS
from mechunlearn.models.handle import HookedModel
from mechunlearn.progress import progress_bar
from mechunlearn.tasks.records import FactRecord

POSITION_ROLES: tuple[str, ...] = (
    "before subject",
    "first subject",
    "middle subject",
    "last subject",
    "after subject",
    "last token",
)
"""Position roles, relative to each prompt's subject. A one-token subject is its ``last
subject`` token; the final token is always ``last token`` (even if it ends the subject);
padding has no role."""

SIGN_CONVENTION = (
    "A(c) = sum grad_M(clean) * (a_clean - a_corrupt): the first-order estimate of how much the "
    "mean readout M (evidence['metric']) drops when c's corrupted activation is patched into the clean run "
    "(positive = c supports the true answer)"
)


# ---- shared helpers (also used by edge attribution patching) -----------------------------


def position_roles(prompts: FactPrompts) -> torch.Tensor:
    """Role index (into ``POSITION_ROLES``) per ``[row, position]``; ``-1`` on padding."""
    n, width = len(prompts.records), prompts.width
    roles = torch.full((n, width), -1, dtype=torch.long)
    for row, subject in enumerate(prompts.subject_positions):
        pad = width - prompts.batch.lengths[row]
        roles[row, pad : subject[0]] = 0
        roles[row, subject[0]] = 1
        roles[row, subject[1:-1]] = 2
        roles[row, subject[-1]] = 3
        roles[row, subject[-1] + 1 :] = 4
        roles[row, width - 1] = 5
    return roles


# ---- one batch ------------------------------------------------------------------------------
@dataclass
class AttributionBatch:
    """Per-fact, per-position signed estimates ``A`` for one batch (metric = sum over rows).

    ``head``: ``[layers, batch, seq, heads]``; ``attn`` and ``mlp``: ``[layers, batch, seq]``.
    """

    head: torch.Tensor
    attn: torch.Tensor
    mlp: torch.Tensor
    metric_clean: torch.Tensor  # [batch]
    metric_corrupt: torch.Tensor  # [batch]


def attribution_batch(
    hm: HookedModel,
    clean: FactPrompts,
    corrupt: FactPrompts,
    readout: Readout = LOGIT_DIFF,
) -> AttributionBatch:
    """One corrupted forward (no grad), one clean forward + backward: estimates for every
    component at every position. Rows are independent, so differentiating the *sum* of the
    rows' readouts gives each fact its own estimate."""
    check_same_layout(clean, corrupt)
    n_layers = hm.dims.n_layers
    kinds = ("head", "attn_out", "mlp_out")
    names = [f"blocks.{layer}.{kind}" for layer in range(n_layers) for kind in kinds]

    with torch.no_grad(), hm.hooks(cache=names) as corrupt_cache:
        corrupt_logits = final_logits(hm, corrupt)
        metric_corrupt = readout(corrupt_logits, clean)

    stash: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def handler(activation: torch.Tensor) -> torch.Tensor:
            fresh = (
                activation.clone()
            )  # the tensor the model reads from here on: its grad is defined
            stash[name] = fresh
            return fresh

        return handler

    def leaf(activation: torch.Tensor) -> torch.Tensor:
        # gradients must flow even if the model's parameters are frozen; none go to the weights
        return activation.detach().requires_grad_(True)

    handlers = [("embed", leaf)] + [(name, keep(name)) for name in names]
    with torch.enable_grad(), hm.hooks(handlers=handlers):
        metric = readout(final_logits(hm, clean), clean)
        grads = torch.autograd.grad(metric.sum(), [stash[name] for name in names])

    estimates: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, grad in zip(names, grads, strict=True):
            delta = stash[name].detach().float() - corrupt_cache[name].float()
            estimates[name] = (grad.float() * delta).sum(-1)  # heads: [b, s, H]
    return AttributionBatch(
        head=torch.stack([estimates[f"blocks.{layer}.head"] for layer in range(n_layers)]).cpu(),
        attn=torch.stack(
            [estimates[f"blocks.{layer}.attn_out"] for layer in range(n_layers)]
        ).cpu(),
        mlp=torch.stack([estimates[f"blocks.{layer}.mlp_out"] for layer in range(n_layers)]).cpu(),
        metric_clean=metric.detach().float().cpu(),
        metric_corrupt=metric_corrupt.cpu(),
    )


def component_estimates(batch: AttributionBatch) -> dict[str, float]:
    """Signed ``A`` per component, summed over the batch's facts and positions."""
    scores: dict[str, float] = {}
    head = batch.head.sum(dim=(1, 2))
    attn, mlp = batch.attn.sum(dim=(1, 2)), batch.mlp.sum(dim=(1, 2))
    for layer in range(head.shape[0]):
        scores[f"blocks.{layer}.attn"] = float(attn[layer])
        for h in range(head.shape[1]):
            scores[f"blocks.{layer}.attn.head{h}"] = float(head[layer, h])
        scores[f"blocks.{layer}.mlp"] = float(mlp[layer])
    return scores


def attribution_scores(
    hm: HookedModel,
    clean: FactPrompts,
    corrupt: FactPrompts,
    readout: Readout = LOGIT_DIFF,
) -> dict[str, float]:
    """Signed ``A`` per component, averaged over the facts of one clean/corrupted batch."""
    batch = attribution_batch(hm, clean, corrupt, readout)
    n = len(clean.records)
    return {c: s / n for c, s in component_estimates(batch).items()}


# ---- the registered method ------------------------------------------------------------------
@LOCALIZERS.method("attribution_patching", options=ReadoutOptions, needs_pairs=True)
def attribution_patching(
    hm: HookedModel,
    records: Sequence[FactRecord],
    options: LocalizeOptions,
    method_options: ReadoutOptions,
) -> Scores:
    """Score every attention layer, head and MLP by |attribution patching estimate|.

    Heads and whole attention layers overlap, so selection picks among heads + MLPs where heads
    have their own parameters (Llama, Gemma) and among attention layers + MLPs otherwise; all
    are scored. Facts without a same-layout partner are skipped and listed in
    ``evidence["skipped_without_partner"]``.
    """
    readout = READOUTS.get(method_options.metric)
    records, unpaired = facts_with_partners(hm, records)
    batches, partners = fact_batches(hm, records, options)
    n_layers, n_roles, n_facts = hm.dims.n_layers, len(POSITION_ROLES), len(records)
    signed: dict[str, float] = {}
    role_sums = {
        kind: torch.zeros(n_layers, n_roles, dtype=torch.float64) for kind in ("attn", "mlp")
    }
    metric_clean = metric_corrupt = 0.0
    with progress_bar(n_facts, "attribution patching", enabled=options.progress) as advance:
        for clean, corrupt in batches:
            batch = attribution_batch(hm, clean, corrupt, readout)
            for component, value in component_estimates(batch).items():
                signed[component] = signed.get(component, 0.0) + value
            roles = position_roles(clean)
            valid = roles >= 0
            for kind, per_position in (("attn", batch.attn), ("mlp", batch.mlp)):
                for layer in range(n_layers):
                    role_sums[kind][layer].index_add_(
                        0, roles[valid], per_position[layer][valid].double()
                    )
            metric_clean += float(batch.metric_clean.sum())
            metric_corrupt += float(batch.metric_corrupt.sum())
            advance(len(clean.records))

    signed = {c: s / n_facts for c, s in signed.items()}
    scores = {c: abs(s) for c, s in signed.items()}
    position_signed = {kind: (sums / n_facts).tolist() for kind, sums in role_sums.items()}
    position_scores = {kind: (sums / n_facts).abs().tolist() for kind, sums in role_sums.items()}

    per_head = heads_have_parameters(hm)
    candidates = {
        c: s
        for c, s in scores.items()
        if component_kind(c) == "mlp" or ((".head" in c) == per_head)
    }
    n_heads = hm.dims.n_heads
    evidence = {
        "sign_convention": SIGN_CONVENTION,
        "metric": f"{readout.name} (mean over facts): {readout.description}",
        "signed_scores": signed,
        "head_scores_signed": [
            [signed[f"blocks.{layer}.attn.head{h}"] for h in range(n_heads)]
            for layer in range(n_layers)
        ],
        "attn_scores_signed": [signed[f"blocks.{layer}.attn"] for layer in range(n_layers)],
        "mlp_scores_signed": [signed[f"blocks.{layer}.mlp"] for layer in range(n_layers)],
        "position_scores_signed": position_signed,
        "metric_clean": metric_clean / n_facts,
        "metric_corrupt": metric_corrupt / n_facts,
        "corruption": f"pair_corruptions(seed={options.seed})",
        "partners": partners,
        "skipped_without_partner": unpaired,
        "selection_granularity": "heads" if per_head else "attention layers",
    }
    return Scores(
        scores,
        candidates=candidates,
        position_scores=position_scores,
        position_labels=list(POSITION_ROLES),
        evidence=evidence,
        n_facts=n_facts,
    )
