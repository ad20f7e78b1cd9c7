"""Attacks on an edited model: can the removed knowledge be brought back?

Relearning (LoRA fine-tuning on half the forget facts with their true answers) and a bounded
soft prompt, both trained on one half of the forget set and scored on the other; a targeted
latent attack (the latent adversary of ``edit.latent_adversary``, per-token residual-stream
perturbations toward an unwanted completion, trained against the frozen model).
"""

from mechunlearn.attacks.latent import LatentAttackResult, latent_attack
from mechunlearn.attacks.relearn import (
    RelearnConfig,
    RelearnResult,
    relearn_attack,
    relearn_pairs,
    relearn_split,
)
from mechunlearn.attacks.soft_prompt import (
    SoftPrompt,
    SoftPromptConfig,
    SoftPromptResult,
    soft_prompt_attack,
)
from mechunlearn.attacks.split import split_records

__all__ = [
    "LatentAttackResult",
    "RelearnConfig",
    "RelearnResult",
    "SoftPrompt",
    "SoftPromptConfig",
    "SoftPromptResult",
    "latent_attack",
    "relearn_attack",
    "relearn_pairs",
    "relearn_split",
    "soft_prompt_attack",
    "split_records",
]
