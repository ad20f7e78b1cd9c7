"""Readout metrics: what a patching method measures at the final position.

Each readout maps final-position logits ``[n, vocab]`` and the facts' answer options to one
number per row. Methods take the readout as a parameter (``metric`` in their options) instead
of hard-coding one, because the choice changes what "important" means (Heimersheim & Nanda
2024): the logit difference is linear in the final residual (so it decomposes over components
and suits attribution), the probability saturates (ROME's causal tracing reports it), and the
log-probability sits between the two.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mechunlearn.registry import Registry


@dataclass(frozen=True)
class Readout:
    """``read(logits [n, vocab], option_ids [n, k], correct [n]) -> [n]`` (float); ``short``
    names it in metric names (``p_clean``)."""

    name: str
    read: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    description: str
    short: str

    def __call__(self, logits: torch.Tensor, prompts) -> torch.Tensor:
        """The readout of ``prompts`` (anything with ``option_ids`` and ``correct`` rows
        matching ``logits``, e.g. ``FactPrompts``)."""
        device = logits.device
        return self.read(logits.float(), prompts.option_ids.to(device), prompts.correct.to(device))


READOUTS: Registry[Readout] = Registry("readout metric")


def _register(name: str, short: str, description: str):
    def decorator(read):
        READOUTS.register(name)(Readout(name, read, description, short))
        return read

    return decorator


def _answer_ids(option_ids: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    return option_ids.gather(1, correct[:, None]).squeeze(1)


@_register(
    "logit_diff", "logit_diff", "logit of the true answer minus the mean logit of the other options"
)
def logit_diff(
    logits: torch.Tensor, option_ids: torch.Tensor, correct: torch.Tensor
) -> torch.Tensor:
    option_logits = logits.gather(1, option_ids)
    true_logit = option_logits.gather(1, correct[:, None]).squeeze(1)
    k = option_logits.shape[1]
    return true_logit - (option_logits.sum(1) - true_logit) / (k - 1)


@_register(
    "answer_prob", "p", "probability of the true answer's first token (ROME's causal tracing)"
)
def answer_prob(
    logits: torch.Tensor, option_ids: torch.Tensor, correct: torch.Tensor
) -> torch.Tensor:
    return logits.softmax(-1).gather(1, _answer_ids(option_ids, correct)[:, None]).squeeze(1)


@_register("answer_logprob", "logp", "log-probability of the true answer's first token")
def answer_logprob(
    logits: torch.Tensor, option_ids: torch.Tensor, correct: torch.Tensor
) -> torch.Tensor:
    return logits.log_softmax(-1).gather(1, _answer_ids(option_ids, correct)[:, None]).squeeze(1)


LOGIT_DIFF: Readout = READOUTS.get("logit_diff")
"""The default readout of the patching methods."""

__all__ = ["LOGIT_DIFF", "READOUTS", "Readout"]
