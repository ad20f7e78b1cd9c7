"""Causal scrubbing of the backward-chaining hypothesis, per layer and path length: the depth
bound (Brinkmann et al. 2024, arXiv:2402.11917, causal scrubbing; the reference's
``test_hypothesis_1``).

Hypothesis: at the first query position (the root, which predicts ``p_1``), the attention
output of layer ``l`` carries only the backward-chain node ``a_l = p_{max(L - l, 1)}``: the
goal after layer 0, its parent after layer 1, ... (one level per layer, stopping at the answer
``p_1``; ``common`` defines the chain).

Resampling ablation: for every clean tree ``x`` and layer ``l``, draw a donor tree ``x'`` from a
fresh pool whose chain has not stopped before layer ``l`` (``L' - 1 >= l``) and whose node ``l``
levels above its goal equals ``a_l(x)``; replace ``blocks.l.attn_out`` at the root position by
the donor's (everything else stays clean). If the hypothesis holds, the output does not change.
With ``y`` the clean run's arg-max token at the root position,

    loss_recovered(l, L) = (log V - E[-log p_patched(y)]) / (log V - E[-log p_clean(y)])

averaged over the clean trees of path length ``L`` (``V``: vocabulary size, so a uniform
prediction scores 0 and the clean model 1). The *control* patches a donor that satisfies only
``L' - 1 >= l`` (any chain node): a low control and a high matched recovery mean the layer's
attention output matters and carries what the hypothesis says.

Depth bound: layer 0 copies the goal and each further layer climbs one edge, so pure
backward chaining at the root answers paths of length ``L <= n_layers``. For those lengths the
hypothesis should recover most of the loss; for longer paths the model must use more than the
single chain (registers, ``registers``), so matched recovery collapses in the layers that
merge that extra information. ``short``/``long`` summarise recovery for ``L <= n_layers`` and
``L > n_layers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field

from mechunlearn.models.handle import HookedModel
from mechunlearn.models.hooks import Patch
from mechunlearn.reasoning.analysis.common import (
    AnalysisSettings,
    TreeData,
    analysis_trees,
    check_tree_model,
)
from mechunlearn.reasoning.trees import TreeTaskConfig, generate_trees, stream_seed

DONOR_STREAM = 0xD0
MIN_DENOMINATOR = 1e-3


class ScrubbingSettings(AnalysisSettings):
    donors: int = Field(default=4096, ge=16, description="donor pool size")


@dataclass
class ScrubbingResult:
    lengths: list[int]
    recovered: list[list[float | None]]  # [layer][length index]
    control: list[list[float | None]]  # [layer][length index]
    clean_loss: list[float]  # [length index]
    matched: list[list[int]]  # [layer][length index]: clean trees with a matching donor
    depth_bound: int
    n_trees: int
    edge_order: str

    def _mean(self, table: list[list[float | None]], layer: int, long: bool) -> float | None:
        values = [
            v
            for length, v in zip(self.lengths, table[layer], strict=True)
            if v is not None and (length > self.depth_bound) == long
        ]
        return sum(values) / len(values) if values else None

    def short(self, layer: int) -> float | None:
        """Mean matched recovery over path lengths ``<= depth_bound``."""
        return self._mean(self.recovered, layer, long=False)

    def long(self, layer: int) -> float | None:
        """Mean matched recovery over path lengths ``> depth_bound`` (None if there are none)."""
        return self._mean(self.recovered, layer, long=True)

    def to_json(self) -> dict[str, Any]:
        layers = range(len(self.recovered))
        return {
            "lengths": self.lengths,
            "recovered": self.recovered,
            "control": self.control,
            "clean_loss": self.clean_loss,
            "matched": self.matched,
            "depth_bound": self.depth_bound,
            "short_recovered": [self.short(layer) for layer in layers],
            "long_recovered": [self.long(layer) for layer in layers],
            "short_control": [self._mean(self.control, layer, False) for layer in layers],
            "long_control": [self._mean(self.control, layer, True) for layer in layers],
            "n_trees": self.n_trees,
            "edge_order": self.edge_order,
        }


@torch.no_grad()
def _root_run(
    hm: HookedModel, data: TreeData, batch_size: int, patches: dict[int, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities ``[B, V]`` at the root position, and ``attn_out`` there ``[L, B, d]``;
    ``patches``: layer -> ``[B, d]`` attention output to put at the root position."""
    root = data.layout.root
    sites = [f"blocks.{layer}.attn_out" for layer in range(hm.dims.n_layers)]
    logps, attn = [], []
    for start, part in data.batches(batch_size):
        interventions = []
        for layer, values in (patches or {}).items():
            mask = torch.zeros(len(part), part.layout.n_positions, dtype=torch.bool)
            mask[:, root] = True
            value = values[start : start + len(part)][:, None, :]
            interventions.append(Patch(f"blocks.{layer}.attn_out", value, mask))
        with hm.hooks(interventions=interventions, cache=sites) as cache:
            logits = hm.model(input_ids=part.inputs.to(hm.device)).logits
        logps.append(logits[:, root].float().log_softmax(-1).cpu())
        attn.append(torch.stack([cache[site][:, root].float().cpu() for site in sites]))
    return torch.cat(logps), torch.cat(attn, 1)


def chain_value(trees, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tree, ``a_layer`` at the root query, and whether the chain is still climbing at
    ``layer`` (``L - 1 >= layer``, the donor condition)."""
    lengths = trees.path_length
    index = torch.clamp(lengths - layer, min=1)
    rows = torch.arange(len(trees))
    return trees.path[rows, index], lengths - 1 >= layer


def _pick(
    candidates: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random True column per row of ``candidates [B, M]``; and whether the row had one."""
    scores = torch.rand(candidates.shape, generator=generator).masked_fill(~candidates, -1.0)
    return scores.argmax(1), candidates.any(1)


def scrubbing_analysis(
    hm: HookedModel, task: TreeTaskConfig, settings: ScrubbingSettings | None = None
) -> ScrubbingResult:
    """Matched and control resampling of ``attn_out`` at the root, per layer and path length."""
    settings = settings or ScrubbingSettings()
    check_tree_model(hm, task)
    clean = analysis_trees(task, settings)
    donors = TreeData(
        generate_trees(
            task.n_nodes,
            settings.donors,
            stream_seed(settings.seed, DONOR_STREAM),
            edge_order=settings.edge_order,
            second_branch=task.second_branch,
        )
    )
    generator = torch.Generator().manual_seed(settings.seed)
    clean_logp, _ = _root_run(hm, clean, settings.batch_size)
    _, donor_attn = _root_run(hm, donors, settings.batch_size)
    reference = clean_logp.argmax(-1)
    rows = torch.arange(len(clean))
    clean_loss = -clean_logp[rows, reference]
    uniform = math.log(hm.dims.vocab_size)
    lengths = sorted(set(clean.trees.path_length.tolist()))
    length_of = clean.trees.path_length
    recovered, control, matched = [], [], []
    for layer in range(hm.dims.n_layers):
        wanted, _ = chain_value(clean.trees, layer)
        have, eligible = chain_value(donors.trees, layer)
        same = (have[None, :] == wanted[:, None]) & eligible[None, :]
        pick, found = _pick(same, generator)
        pick_control, _ = _pick(eligible[None, :].expand(len(clean), -1), generator)
        losses = {}
        for name, chosen in (("matched", pick), ("control", pick_control)):
            logp, _ = _root_run(hm, clean, settings.batch_size, {layer: donor_attn[layer, chosen]})
            losses[name] = -logp[rows, reference]
        row_rec, row_ctl, row_n = [], [], []
        for length in lengths:
            keep = (length_of == length) & found
            row_n.append(int(keep.sum()))
            orig = float(clean_loss[keep].mean()) if keep.any() else float("nan")
            denominator = uniform - orig
            if not keep.any() or denominator < MIN_DENOMINATOR:
                row_rec.append(None)
                row_ctl.append(None)
                continue
            row_rec.append((uniform - float(losses["matched"][keep].mean())) / denominator)
            row_ctl.append((uniform - float(losses["control"][keep].mean())) / denominator)
        recovered.append(row_rec)
        control.append(row_ctl)
        matched.append(row_n)
    return ScrubbingResult(
        lengths=lengths,
        recovered=recovered,
        control=control,
        clean_loss=[float(clean_loss[length_of == length].mean()) for length in lengths],
        matched=matched,
        depth_bound=hm.dims.n_layers,
        n_trees=len(clean),
        edge_order=settings.edge_order,
    )
