"""Loss objectives for editing and unlearning, registered by name in ``OBJECTIVES``.

Every objective is a function ``(hm, batch, **coefs) -> scalar tensor`` over a ``TargetBatch``
(``models.batches``): (prompt, continuation) pairs tokenized like the evaluation scorer (prompt
with special tokens, continuation without), left-padded so every row ends at the last index.
``target_mask`` marks the continuation tokens; the loss is about the model's prediction of each
of them from the tokens before it. Because continuations sit at the end of each row,
``token_logprobs`` asks the model only for the last ``max_continuation + 1`` logit rows
(``logits_to_keep``), so the unembedding is not computed over the prompt.

Objectives that need more than the forget batch (GradDiff's retain batch, NPO's reference
log-probs, RMU's frozen activations) carry a *setup* (``with_setup``): called once before
training, under the still-frozen model, it returns a function giving each step's extra keyword
arguments. ``bind_objective`` hides the difference, so a trainer calls every objective the same
way: ``bound(hm, ObjectiveStep(...))``. Forward passes go through ``hm.forward`` so a
distributed wrapper (DDP) set on the ``HookedModel`` sees them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.models.batches import TargetBatch, joined
from mechunlearn.models.handle import HookedModel
from mechunlearn.registry import Registry

Objective = Callable[..., torch.Tensor]
OBJECTIVES: Registry[Objective] = Registry("objective")

DEFAULT_FLOOR = -5.0


_SHARED: ContextVar[dict[int, torch.Tensor] | None] = ContextVar("shared_logprobs", default=None)


@contextmanager
def shared_forward(hm: HookedModel, batches: Sequence[TargetBatch]) -> Iterator[None]:
    """One forward (and so one backward) for several target batches: inside the block,
    ``token_logprobs(hm, b)`` for each ``b`` of ``batches`` returns its rows of the joint
    forward, once. A training step's forget and maintain batches then cost one pass of the
    model instead of two (wider matrix products, the unembedding read once): the same numbers
    up to float summation order, since every row is masked and positioned as in its own batch."""
    joint = _token_logprobs(hm, joined(batches))
    width = joint.shape[1]
    table: dict[int, torch.Tensor] = {}
    row = 0
    for b in batches:
        n, w = b.input_ids.shape
        table[id(b)] = joint[row : row + n, width - w :]
        row += n
    token = _SHARED.set(table)
    try:
        yield
    finally:
        _SHARED.reset(token)


def target_tokens_only(objective: Callable) -> Callable:
    """Mark an objective whose only use of the model is one ``token_logprobs`` of its batch, so
    a trainer may compute it inside ``shared_forward`` with other batches."""
    objective.target_tokens_only = True  # type: ignore[attr-defined]
    return objective


def token_logprobs(hm: HookedModel, batch: TargetBatch) -> torch.Tensor:
    """``[b, t]`` log-prob of each target token given its prefix (0 where not a target).

    Only the ``max(n_targets)`` logit rows that predict target tokens are computed.
    Differentiable; float32 log-softmax. Inside ``shared_forward`` a batch given to it is
    answered from the joint forward (once).
    """
    table = _SHARED.get()
    if table is not None and id(batch) in table:
        return table.pop(id(batch))
    return _token_logprobs(hm, batch)


def _token_logprobs(hm: HookedModel, batch: TargetBatch) -> torch.Tensor:
    keep = max(batch.n_targets)
    width = batch.input_ids.shape[1]
    if keep >= width:
        raise ValueError("every row needs at least one prompt token before its continuation")
    logits = hm.forward_predicting_last(keep, **batch.model_inputs())
    log_probs = logits.float().log_softmax(-1)  # predictions for positions width-keep .. width-1
    # the logits' device: a batch built on the CPU, or a model sharded over several GPUs
    targets = batch.input_ids[:, width - keep :].to(log_probs.device)
    picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = batch.target_mask[:, width - keep :].to(log_probs.device).bool()
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
@target_tokens_only
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
@target_tokens_only
def unlearn_loss(hm: HookedModel, batch: TargetBatch, floor: float = DEFAULT_FLOOR) -> torch.Tensor:
    """Push answer probabilities toward zero (HarmBench / Mechanistic Unlearning, Guo et al. 2024).

    ``L = -(1/N) sum_{target tokens with log p >= floor} log(1 - p)``; tokens already below
    ``floor`` (default -5) stop contributing, unlike gradient ascent whose loss is unbounded.
    """
    logprobs = token_logprobs(hm, batch)
    return unlearn_loss_from_logprobs(logprobs, batch.target_mask, floor)


@OBJECTIVES.register("gradient_ascent")
@target_tokens_only
def gradient_ascent_loss(hm: HookedModel, batch: TargetBatch) -> torch.Tensor:
    """Gradient ascent on the forget answers (e.g. Jang et al. 2023; TOFU baseline).

    ``L = (1/N) sum_{target} log p(x_i | x_<i)`` = minus the mean NLL (minimising it maximises NLL).
    """
    return -_mean_nll(hm, batch)


@dataclass
class ObjectiveStep:
    """One training step's data as an objective sees it (this process's shard of the batch).

    ``forget_index`` / ``retain_index`` are the rows' positions in the pair lists given to
    ``bind_objective``, so per-example references computed by a setup can be looked up.
    """

    forget: TargetBatch
    forget_index: list[int]
    retain: TargetBatch | None = None
    retain_index: list[int] | None = None


StepArgs = Callable[[ObjectiveStep], dict[str, Any]]
Pairs = Sequence[tuple[str, str]]


def with_setup(setup: Callable[..., StepArgs]) -> Callable[[Objective], Objective]:
    """Attach ``setup(hm, forget, retain, batch_size, **options) -> step_args`` to an objective.

    The setup runs once before training (references must come from the unedited model) and
    validates the options: its keyword parameters are the objective's options.
    """

    def decorator(objective: Objective) -> Objective:
        objective.setup = setup  # type: ignore[attr-defined]
        return objective

    return decorator


@dataclass
class BoundObjective:
    """An objective with its options and references: ``bound(hm, step) -> loss``."""

    name: str
    objective: Objective
    step_args: StepArgs
    info: dict[str, Any] = field(default_factory=dict)  # what the setup chose (e.g. RMU's c)

    def __call__(self, hm: HookedModel, step: ObjectiveStep) -> torch.Tensor:
        return self.objective(hm, step.forget, **self.step_args(step))


def check_options(fn: Callable, options: Mapping[str, Any], skip: int, what: str) -> None:
    """ConfigError naming unknown keys; ``skip`` leading positional parameters are not options."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    known = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for {what}; known: {', '.join(known) or '(none)'}"
        )


def check_objective_options(name: str, options: Mapping[str, Any] | None) -> Objective:
    """The objective registered as ``name``; ``ConfigError`` for an unknown name or option
    (options are the setup's keyword parameters, or the objective's own when it has no setup)."""
    objective = OBJECTIVES.get(name)
    setup = getattr(objective, "setup", None)
    if setup is None:
        check_options(objective, dict(options or {}), skip=2, what=f"objective {name!r}")
    else:
        check_options(setup, dict(options or {}), skip=4, what=f"objective {name!r}")
    return objective


def bind_objective(
    hm: HookedModel,
    name: str,
    forget: Pairs,
    retain: Pairs = (),
    options: Mapping[str, Any] | None = None,
    batch_size: int = 16,
) -> BoundObjective:
    """Look ``name`` up in ``OBJECTIVES`` and run its setup (if any) on the current model.

    Call before any weight changes: NPO's reference log-probs and RMU's frozen activations are
    taken from the model as it is now. ``batch_size`` bounds the setup's forward passes.
    """
    objective = check_objective_options(name, options)
    options = dict(options or {})
    setup = getattr(objective, "setup", None)
    if setup is None:
        return BoundObjective(name, objective, lambda step: options)
    with torch.no_grad():
        step_args = setup(hm, list(forget), list(retain), batch_size, **options)
    return BoundObjective(name, objective, step_args, dict(getattr(step_args, "info", {})))


def _grad_diff_setup(
    hm: HookedModel, forget: Pairs, retain: Pairs, batch_size: int, retain_coef: float = 1.0
) -> StepArgs:
    if not retain:
        raise DataError("objective 'grad_diff' needs retain pairs (it descends on them)")

    def step_args(step: ObjectiveStep) -> dict[str, Any]:
        if step.retain is None:
            raise DataError("objective 'grad_diff' needs a retain batch at every step")
        return {"retain": step.retain, "retain_coef": retain_coef}

    return step_args


def reference_logprobs(hm: HookedModel, pairs: Pairs, batch_size: int = 16) -> torch.Tensor:
    """``[n]`` sequence log-probs of each pair's continuation under the model as it is now."""
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            batch = TargetBatch.from_pairs(hm, pairs[start : start + batch_size])
            out.append(sequence_logprobs(hm, batch).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def _npo_setup(
    hm: HookedModel, forget: Pairs, retain: Pairs, batch_size: int, beta: float = 0.1
) -> StepArgs:
    if beta <= 0:
        raise ConfigError(f"npo beta must be positive, got {beta}")
    refs = reference_logprobs(hm, forget, batch_size)
    return lambda step: {"ref_logprobs": refs[step.forget_index], "beta": beta}


@OBJECTIVES.register("grad_diff")
@with_setup(_grad_diff_setup)
def grad_diff_loss(
    hm: HookedModel, batch: TargetBatch, retain: TargetBatch, retain_coef: float = 1.0
) -> torch.Tensor:
    """Gradient difference (Liu et al. 2022; TOFU baseline): ascend on forget, descend on retain.

    ``L = -NLL(forget) + retain_coef * NLL(retain)``, each a mean over target tokens.
    """
    return -_mean_nll(hm, batch) + retain_coef * _mean_nll(hm, retain)


@OBJECTIVES.register("npo")
@with_setup(_npo_setup)
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
