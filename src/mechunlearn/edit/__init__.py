"""Editing and unlearning: loss objectives (registered by name in ``OBJECTIVES``) over
``TargetBatch``es of (prompt, continuation) pairs, for fact editing (``edit``) and unlearning
(``unlearn``, ``gradient_ascent``, ``grad_diff``, ``npo``)."""

from mechunlearn.edit.objectives import (
    OBJECTIVES,
    TargetBatch,
    edit_loss,
    grad_diff_loss,
    gradient_ascent_loss,
    npo_loss,
    sequence_logprobs,
    token_logprobs,
    unlearn_loss,
    unlearn_loss_from_logprobs,
)

__all__ = [
    "OBJECTIVES",
    "TargetBatch",
    "edit_loss",
    "grad_diff_loss",
    "gradient_ascent_loss",
    "npo_loss",
    "sequence_logprobs",
    "token_logprobs",
    "unlearn_loss",
    "unlearn_loss_from_logprobs",
]
