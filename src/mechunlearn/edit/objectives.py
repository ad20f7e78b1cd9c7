"""Loss objectives for editing and unlearning, registered by name in ``OBJECTIVES``.

Every objective is a function ``(hm, batch, **coefs) -> scalar tensor`` over a ``TargetBatch``:
(prompt, continuation) pairs tokenized like the evaluation scorer (prompt with special tokens,
continuation without), left-padded so every row ends at the last index. ``target_mask`` marks
the continuation tokens; the loss is about the model's prediction of each of them from the
tokens before it. Because continuations sit at the end of each row, ``token_logprobs`` asks the
model only for the last ``max_continuation + 1`` logit rows (``logits_to_keep``), so the
unembedding is not computed over the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mechunlearn.errors import TokenizationError
from mechunlearn.models.handle import HookedModel, left_pad
from mechunlearn.registry import Registry

Objective = Callable[..., torch.Tensor]
OBJECTIVES: Registry[Objective] = Registry("objective")

DEFAULT_FLOOR = -5.0


@dataclass
class TargetBatch:
    """Left-padded prompt+continuation tokens; ``target_mask`` marks the continuation tokens.

    ``target_mask[b, i]`` is 1 when ``input_ids[b, i]`` is a continuation token, i.e. the
    model's prediction at position ``i - 1`` is trained toward it. ``n_targets[b]`` is the
    continuation length of row ``b``; continuations always occupy the last positions.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    target_mask: torch.Tensor
    n_targets: list[int]

    @classmethod
    def from_pairs(
        cls,
        hm: HookedModel,
        pairs: Sequence[tuple[str, str]],
        device: torch.device | str | None = None,
    ) -> TargetBatch:
        """Tokenize ``(prompt, continuation)`` pairs with ``hm``'s tokenizer onto its device."""
        prompts, conts = [], []
        for prompt, continuation in pairs:
            p = hm.tokenize(prompt)
            c = hm.tokenize(continuation, add_special_tokens=False)
            if not p:
                raise TokenizationError(f"prompt {prompt!r} tokenizes to nothing")
            if not c:
                raise TokenizationError(f"continuation {continuation!r} tokenizes to nothing")
            prompts.append(p)
            conts.append(c)
        return cls.from_tokens(prompts, conts, hm.pad_id).to(
            hm.device if device is None else device
        )

    @classmethod
    def from_tokens(
        cls, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad_id: int
    ) -> TargetBatch:
        if len(prompts) != len(continuations):
            raise ValueError("prompts and continuations differ in number")
        base = left_pad(
            [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)], pad_id
        )
        width = base.input_ids.shape[1]
        target_mask = torch.zeros_like(base.attention_mask)
        for row, c in enumerate(continuations):
            target_mask[row, width - len(c) :] = 1
        return cls(
            base.input_ids,
            base.attention_mask,
            base.position_ids,
            target_mask,
            [len(c) for c in continuations],
        )

    def to(self, device: torch.device | str) -> TargetBatch:
        return TargetBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.position_ids.to(device),
            self.target_mask.to(device),
            self.n_targets,
        )

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }


def token_logprobs(hm: HookedModel, batch: TargetBatch) -> torch.Tensor:
    """``[b, t]`` log-prob of each target token given its prefix (0 where not a target).

    Only the last ``max(n_targets) + 1`` logit rows are computed; the final row (prediction
    after the last token) is dropped. Differentiable; float32 log-softmax.
    """
    keep = max(batch.n_targets)
    width = batch.input_ids.shape[1]
    if keep >= width:
        raise ValueError("every row needs at least one prompt token before its continuation")
    logits = hm.model(**batch.model_inputs(), logits_to_keep=keep + 1).logits[:, :-1]
    log_probs = logits.float().log_softmax(-1)  # predictions for positions width-keep .. width-1
    targets = batch.input_ids[:, width - keep :]
    picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = batch.target_mask[:, width - keep :].bool()
    out = torch.zeros(batch.input_ids.shape, dtype=picked.dtype, device=picked.device)
    out[:, width - keep :] = torch.where(mask, picked, torch.zeros_like(picked))
    return out


def sequence_logprobs(hm: HookedModel, batch: TargetBatch) -> torch.Tensor:
    """``[b]`` total log-prob of each continuation (use under ``no_grad`` for a reference)."""
    return token_logprobs(hm, batch).sum(-1)


def _mean_nll(hm: HookedModel, batch: TargetBatch) -> torch.Tensor:
    logprobs = token_logprobs(hm, batch)
    mask = batch.target_mask.to(logprobs.dtype)
    return -(logprobs * mask).sum() / mask.sum()


@OBJECTIVES.register("edit")
def edit_loss(hm: HookedModel, batch: TargetBatch) -> torch.Tensor:
    """Cross-entropy toward the new answer (ROME/MEMIT-style fine-tuning objective).

    ``L = -(1/N) sum_{b,i in target} log p(x_{b,i} | x_{b,<i})``, N = number of target tokens.
    """
    return _mean_nll(hm, batch)


def log1mexp(logp: torch.Tensor) -> torch.Tensor:
    """Stable ``log(1 - exp(logp))`` for ``logp < 0`` (Maechler 2012)."""
    return torch.where(
        logp > -0.6931471805599453,
        torch.log(-torch.expm1(logp)),
        torch.log1p(-torch.exp(logp)),
    )


def unlearn_loss_from_logprobs(
    logprobs: torch.Tensor,
    mask: torch.Tensor,
    floor: float = DEFAULT_FLOOR,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``-(1/N) sum_{target, log p >= floor} log(1 - p)`` over ``[b, t]`` token log-probs.

    Tokens whose log-prob is already below ``floor`` contribute nothing (value and gradient 0);
    N counts all target tokens, so the scale does not jump as tokens drop out. ``log p`` is
    clamped to ``<= log(1 - eps)`` so the loss stays finite (gradient 0 only when ``p > 1 - eps``).
    """
    mask = mask.bool()
    active = mask & (logprobs.detach() >= floor)
    safe = torch.where(active, logprobs, torch.full_like(logprobs, floor))
    safe = safe.clamp(max=torch.log1p(torch.tensor(-eps)).item())
    per_token = torch.where(active, -log1mexp(safe), torch.zeros_like(safe))
    return per_token.sum() / mask.sum().clamp(min=1)


@OBJECTIVES.register("unlearn")
def unlearn_loss(hm: HookedModel, batch: TargetBatch, floor: float = DEFAULT_FLOOR) -> torch.Tensor:
    """Push answer probabilities toward zero (HarmBench / Mechanistic Unlearning, Guo et al. 2024).

    ``L = -(1/N) sum_{target tokens with log p >= floor} log(1 - p)``; tokens already below
    ``floor`` (default -5) stop contributing, unlike gradient ascent whose loss is unbounded.
    """
    logprobs = token_logprobs(hm, batch)
    return unlearn_loss_from_logprobs(logprobs, batch.target_mask, floor)


@OBJECTIVES.register("gradient_ascent")
def gradient_ascent_loss(hm: HookedModel, batch: TargetBatch) -> torch.Tensor:
    """Gradient ascent on the forget answers (e.g. Jang et al. 2023; TOFU baseline).

    ``L = (1/N) sum_{target} log p(x_i | x_<i)`` = minus the mean NLL (minimising it maximises NLL).
    """
    return -_mean_nll(hm, batch)


@OBJECTIVES.register("grad_diff")
def grad_diff_loss(
    hm: HookedModel, batch: TargetBatch, retain: TargetBatch, retain_coef: float = 1.0
) -> torch.Tensor:
    """Gradient difference (Liu et al. 2022; TOFU baseline): ascend on forget, descend on retain.

    ``L = -NLL(forget) + retain_coef * NLL(retain)``, each a mean over target tokens.
    """
    return -_mean_nll(hm, batch) + retain_coef * _mean_nll(hm, retain)


@OBJECTIVES.register("npo")
def npo_loss(
    hm: HookedModel, batch: TargetBatch, ref_logprobs: torch.Tensor, beta: float = 0.1
) -> torch.Tensor:
    """Negative Preference Optimization (Zhang et al. 2024, arXiv:2404.05868).

    ``L = (2/beta) * mean_b log(1 + (pi_b / pi_ref_b)^beta)
        = (2/beta) * mean_b softplus(beta * (log pi_b - log pi_ref_b))``,
    with ``pi_b`` the sequence probability of forget answer ``b`` under the model and
    ``ref_logprobs`` (``[b]``) the same under the frozen reference, computed beforehand with
    ``sequence_logprobs`` under ``no_grad``.
    """
    logpi = sequence_logprobs(hm, batch)
    ref = ref_logprobs.to(device=logpi.device, dtype=logpi.dtype).detach()
    if ref.shape != logpi.shape:
        raise ValueError(
            f"ref_logprobs has shape {tuple(ref.shape)}, expected {tuple(logpi.shape)}"
        )
    return (2.0 / beta) * F.softplus(beta * (logpi - ref)).mean()
