"""Latent-knowledge probes: is an edited fact's ORIGINAL attribute still linearly decodable?

Guo et al. (2024, "Mechanistic Unlearning", Sec. 5 "latent knowledge") fit, per residual
layer, a multinomial logistic regression ``p(c | x) = softmax(W x + b)_c`` (probes.py) that
predicts a fact's original attribute (e.g. the sport) from the residual stream at one position,
on facts the edit did not touch (retain facts), and apply it to the edited (forget) facts. High
probe accuracy on forget facts after editing means the edit hid the answer at the output while
the representation still carries it (the "shallow" unlearning that output-level metrics miss).

The probes are fitted on a seeded, stratified part of the retain facts; the rest of the retain
facts give the reference accuracy (what the probe reaches on facts whose knowledge is intact),
and the forget facts are scored with their ORIGINAL answers, never ``new_answer``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from mechunlearn.errors import DataError
from mechunlearn.localize.probes import (
    DEFAULT_L2,
    collect_residuals,
    encode_labels,
    fit_probe,
    residual_labels,
    split_facts,
)
from mechunlearn.localize.prompts import FactPrompts, build_fact_prompts
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.records import FactRecord

Position = Literal["last_subject", "final"]


@dataclass
class LatentProbeResult:
    """Per residual layer (``layers``: ``embed``, ``0`` .. ``L-1``), probe accuracies.

    ``forget_accuracy[i]``: the layer-``i`` probe's accuracy on forget facts' original answers;
    ``retain_heldout_accuracy[i]``: the same probe on held-out retain facts (the reference);
    ``chance`` = 1 / number of classes; ``majority`` = accuracy on forget facts of always
    answering the most frequent class among the probe's training facts; ``forget_correct[i][j]``:
    whether the layer-``i`` probe got forget fact ``forget_ids[j]`` right (1/0), so layer
    averages and paired comparisons can be taken per fact.
    """

    position: str
    layers: list[str]
    classes: list[str]
    chance: float
    majority: float
    retain_train_accuracy: list[float]
    retain_heldout_accuracy: list[float]
    forget_accuracy: list[float]
    n_retain_train: int
    n_retain_heldout: int
    n_forget: int
    skipped_forget_ids: list[str]
    forget_ids: list[str]
    forget_correct: list[list[int]]

    def to_json(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "layers": self.layers,
            "classes": self.classes,
            "chance": self.chance,
            "majority": self.majority,
            "retain_train_accuracy": self.retain_train_accuracy,
            "retain_heldout_accuracy": self.retain_heldout_accuracy,
            "forget_accuracy": self.forget_accuracy,
            "n_retain_train": self.n_retain_train,
            "n_retain_heldout": self.n_retain_heldout,
            "n_forget": self.n_forget,
            "skipped_forget_ids": self.skipped_forget_ids,
            "forget_ids": self.forget_ids,
            "forget_correct": self.forget_correct,
        }


def _positions(prompts: FactPrompts, position: str) -> torch.Tensor:
    if position == "last_subject":
        return prompts.last_subject_positions()
    if position == "final":
        return torch.full((len(prompts.records),), prompts.width - 1)
    raise DataError(f"unknown probe position {position!r}; use 'last_subject' or 'final'")


def _residuals(
    hm: HookedModel, records: Sequence[FactRecord], position: str, batch_size: int
) -> torch.Tensor:
    """``[n_layers + 1, n, d]`` residuals of ``records``' completion prompts at ``position``."""
    prompts = build_fact_prompts(hm, records)
    return collect_residuals(hm, prompts, _positions(prompts, position), batch_size=batch_size)


def latent_probe_accuracy(
    hm: HookedModel,
    forget: Sequence[FactRecord],
    retain: Sequence[FactRecord],
    position: Position = "last_subject",
    seed: int = 0,
    l2: float = DEFAULT_L2,
    batch_size: int = 16,
    heldout_fraction: float = 0.25,
) -> LatentProbeResult:
    """Fit a probe per residual layer on retain facts' original answers; score forget facts.

    ``heldout_fraction`` of the retain facts (stratified, seeded) is kept out of the fit to
    report the reference accuracy. Forget facts whose original answer no retain fact has
    cannot be predicted by the probe; they are left out and listed in ``skipped_forget_ids``.
    """
    if not forget:
        raise DataError("latent probes need forget facts to score; the forget list is empty")
    if not retain:
        raise DataError("latent probes are fitted on retain facts; the retain list is empty")
    overlap = {r.id for r in forget} & {r.id for r in retain}
    if overlap:
        raise DataError(
            f"{len(overlap)} facts are both forget and retain facts, e.g. {sorted(overlap)[0]}"
        )
    if position not in ("last_subject", "final"):
        raise DataError(f"unknown probe position {position!r}; use 'last_subject' or 'final'")
    y_retain, classes = encode_labels([r.answer for r in retain])  # DataError if < 2 classes
    train, heldout = split_facts(y_retain, 1.0 - heldout_fraction, seed)
    lookup = {c: i for i, c in enumerate(classes)}
    scored = [r for r in forget if r.answer in lookup]
    skipped = [r.id for r in forget if r.answer not in lookup]
    if not scored:
        raise DataError(
            f"none of the {len(forget)} forget facts has an answer among the retain facts' "
            f"answers {list(classes)}; a probe trained on retain facts cannot score them"
        )
    y_forget = torch.tensor([lookup[r.answer] for r in scored])
    x_retain = _residuals(hm, retain, position, batch_size)
    x_forget = _residuals(hm, scored, position, batch_size)
    k = len(classes)
    train_acc, heldout_acc, forget_acc, forget_correct = [], [], [], []
    for row in range(x_retain.shape[0]):
        probe = fit_probe(x_retain[row, train], y_retain[train], n_classes=k, l2=l2)
        train_acc.append(probe.accuracy(x_retain[row, train], y_retain[train]))
        heldout_acc.append(probe.accuracy(x_retain[row, heldout], y_retain[heldout]))
        hits = (probe.predict(x_forget[row]).cpu() == y_forget).int().tolist()
        forget_correct.append(hits)
        forget_acc.append(sum(hits) / len(hits))
    most_common = Counter(y_retain[train].tolist()).most_common(1)[0][0]
    majority = float((y_forget == most_common).float().mean())
    return LatentProbeResult(
        position=position,
        layers=residual_labels(hm.dims.n_layers),
        classes=list(classes),
        chance=1.0 / k,
        majority=majority,
        retain_train_accuracy=train_acc,
        retain_heldout_accuracy=heldout_acc,
        forget_accuracy=forget_acc,
        n_retain_train=len(train),
        n_retain_heldout=len(heldout),
        n_forget=len(scored),
        skipped_forget_ids=skipped,
        forget_ids=[r.id for r in scored],
        forget_correct=forget_correct,
    )
