"""Editing and unlearning.

- ``objectives``: losses registered by name in ``OBJECTIVES`` (``edit``, ``unlearn``,
  ``gradient_ascent``, ``grad_diff``, ``npo``, ``rmu``) over ``TargetBatch``es of
  (prompt, continuation) pairs, bound to data and references with ``bind_objective``;
- ``data``: ``fact_pairs`` and ``TrainData`` (forget / retain / general text);
- ``parametrization``: what is trained (localized weights, LoRA on them, or everything);
- ``trainer``: ``train`` (accelerate-based, checkpoint/resume); ``export``: ``save_edited``;
- ``latent_adversary``: the targeted latent adversary (``LatentAdversaryConfig``,
  ``train_adversary``; Sheshadri et al. 2024 Eq. 2) that LAT trains against;
- ``lat``: ``train_lat`` (targeted latent adversarial training, and its RT / EAT baselines) and
  ``ForgetLat`` (LAT on the forget term of ``train``: any editing/unlearning objective + LAT).
"""

from mechunlearn.edit import rmu as _rmu  # noqa: F401 - registers the "rmu" objective
from mechunlearn.edit.data import TrainData, fact_pairs
from mechunlearn.edit.export import save_edited
from mechunlearn.edit.lat import ForgetLat, LatConfig, lat_baseline, train_lat
from mechunlearn.edit.objectives import (
    OBJECTIVES,
    BoundObjective,
    ObjectiveStep,
    bind_objective,
    edit_loss,
    grad_diff_loss,
    gradient_ascent_loss,
    npo_loss,
    reference_logprobs,
    sequence_logprobs,
    token_logprobs,
    unlearn_loss,
    unlearn_loss_from_logprobs,
    with_setup,
)
from mechunlearn.edit.parametrization import LoraOptions, Trainable, WeightSnapshot, make_trainable
from mechunlearn.edit.rmu import rmu_loss
from mechunlearn.edit.trainer import TrainConfig, TrainResult, lr_factor, train

__all__ = [
    "OBJECTIVES",
    "BoundObjective",
    "ForgetLat",
    "LatConfig",
    "LoraOptions",
    "ObjectiveStep",
    "TrainConfig",
    "TrainData",
    "TrainResult",
    "Trainable",
    "WeightSnapshot",
    "bind_objective",
    "edit_loss",
    "fact_pairs",
    "grad_diff_loss",
    "gradient_ascent_loss",
    "lat_baseline",
    "lr_factor",
    "make_trainable",
    "npo_loss",
    "reference_logprobs",
    "rmu_loss",
    "save_edited",
    "sequence_logprobs",
    "token_logprobs",
    "train",
    "train_lat",
    "unlearn_loss",
    "unlearn_loss_from_logprobs",
    "with_setup",
]
