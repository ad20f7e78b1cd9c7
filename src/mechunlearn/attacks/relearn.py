"""Relearning attack: does a little fine-tuning on SOME forget facts bring back the others?

Guo et al. (2024, "Mechanistic Unlearning", Sec. 5; after Deeb & Roger 2024 and Lynch et al.
2024) fine-tune the edited model with LoRA (Hu et al. 2021) for a few steps on half of the
forget facts with their TRUE answers and measure the other, held-out half: if its original
answers come back, the edit only suppressed knowledge that is still stored. The training loss is
the trainer's usual sum (edit/trainer.py)

    L = CE(train-half forget prompts -> " " + TRUE answer)
        + maintain_coef * CE(retain prompts -> " " + true answer) + lm_coef * LM(general text),

so retain facts only ever enter the maintain term and the held-out forget facts never enter
training (the original Mechanistic Unlearning code trained the relearning run on the wrong
facts; ``relearn_pairs`` is the one place that builds the attack's targets and is tested for
it). The held-out half is evaluated with the ORIGINAL answers at step 0 and every
``eval_every`` steps; the LoRA adapters are unloaded afterwards (even on errors), leaving the
edited model exactly as it was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, Field

from mechunlearn.attacks.split import split_records
from mechunlearn.edit.data import TrainData, fact_pairs
from mechunlearn.edit.parametrization import LoraOptions, make_trainable
from mechunlearn.edit.trainer import TrainConfig, train
from mechunlearn.errors import ConfigError, DataError
from mechunlearn.evals.harness import evaluate
from mechunlearn.evals.metrics import per_record
from mechunlearn.models.handle import HookedModel
from mechunlearn.schema import STRICT_CONFIG
from mechunlearn.tasks.records import FactRecord

METRICS = ("accuracy", "prob_renorm")


class RelearnConfig(BaseModel):
    """Relearning-attack settings. ``components``: where LoRA adapters go (default: every
    block's attention and MLP); ``prompt``: the training prompts ("template" = the bare
    cloze, "completion" = with the completion format's one-shot prefix). The defaults are a
    light attack (rank 8); the paper's (Guo et al. 2024, ``localized_finetuning_script_sports``)
    is ``lora_rank: 512, lora_alpha: 32, lora_dropout: 0.05, lr: 2e-4, schedule: cosine`` on
    every linear layer for 20 steps."""

    model_config = STRICT_CONFIG

    steps: int = Field(20, ge=0)
    lr: float = Field(3e-4, gt=0)
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    schedule: Literal["constant", "cosine"] = Field(
        "constant", description="the attacker's learning-rate schedule (the paper: cosine)"
    )
    batch_size: int = Field(8, ge=1)
    maintain_coef: float = Field(1.0, ge=0)
    lm_coef: float = Field(1.0, ge=0)
    train_fraction: float = Field(0.5, gt=0, lt=1)
    eval_every: int = Field(5, ge=1)
    formats: list[str] = Field(default_factory=lambda: ["completion", "mcq"])
    format_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    components: list[str] | None = None
    prompt: Literal["template", "completion"] = "template"
    eval_batch_size: int = Field(16, ge=1)


@dataclass
class RelearnResult:
    """``curve``: one entry per evaluation, ``{"step": s, "<format>.<metric>": value, ...}``
    on the held-out half (original answers); ``final`` is the last entry without ``step``;
    ``train_before``/``train_after``: the same metrics on the training half;
    ``curve_per_fact``: per evaluation, ``{"<format>.<metric>": {fact id: value}}`` on the
    held-out half (for paired comparisons fact by fact)."""

    config: dict[str, Any]
    train_ids: list[str]
    heldout_ids: list[str]
    curve: list[dict[str, float]]
    train_before: dict[str, float]
    train_after: dict[str, float]
    history: dict[str, list[float]] = field(default_factory=dict)
    n_trainable: int = 0
    curve_per_fact: list[dict[str, dict[str, float]]] = field(default_factory=list)

    @property
    def final(self) -> dict[str, float]:
        return {k: v for k, v in self.curve[-1].items() if k != "step"}

    @property
    def initial(self) -> dict[str, float]:
        return {k: v for k, v in self.curve[0].items() if k != "step"}

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "train_ids": self.train_ids,
            "heldout_ids": self.heldout_ids,
            "curve": self.curve,
            "initial": self.initial,
            "final": self.final,
            "train_before": self.train_before,
            "train_after": self.train_after,
            "history": self.history,
            "n_trainable": self.n_trainable,
            "curve_per_fact": self.curve_per_fact,
            "final_per_fact": self.curve_per_fact[-1] if self.curve_per_fact else {},
        }


def relearn_split(
    forget: Sequence[FactRecord], fraction: float = 0.5, seed: int = 0
) -> tuple[list[FactRecord], list[FactRecord]]:
    """Seeded split of the forget facts into ``(train half, held-out half)``."""
    return split_records(forget, fraction, seed)


def relearn_pairs(
    train_half: Sequence[FactRecord], prompt: Literal["template", "completion"] = "template"
) -> list[tuple[str, str]]:
    """The attack's targets: ``(prompt, " " + TRUE answer)`` for the train-half forget facts.

    Never ``new_answer`` (that is what the edit installed) and never a retain fact.
    """
    return fact_pairs(train_half, target="answer", prompt=prompt)


def default_components(hm: HookedModel) -> list[str]:
    """Every block's attention and MLP: the attacker does not know where the edit was made."""
    n = hm.dims.n_layers
    return [f"blocks.{layer}.{part}" for layer in range(n) for part in ("attn", "mlp")]


def _metrics(
    hm: HookedModel, records: Sequence[FactRecord], config: RelearnConfig, seed: int
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """``(means, per fact)`` of every ``<format>.<metric>`` on ``records``."""
    result = evaluate(
        hm,
        records,
        config.formats,
        seed=seed,
        batch_size=config.eval_batch_size,
        format_options=config.format_options,
        known_threshold=None,
        progress=False,
    )
    means = {
        f"{name}.{metric}": fmt.metrics[metric]["mean"]
        for name, fmt in result.formats.items()
        for metric in METRICS
    }
    by_format: dict[str, list] = {}
    for score in result.scores:
        by_format.setdefault(score.item.format, []).append(score)
    facts = {
        f"{name}.{metric}": per_record(scores, metric)
        for name, scores in by_format.items()
        for metric in METRICS
    }
    return means, facts


def relearn_attack(
    hm: HookedModel,
    forget: Sequence[FactRecord],
    retain: Sequence[FactRecord],
    general_text: Sequence[str],
    config: RelearnConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> RelearnResult:
    """Fine-tune LoRA adapters on half of ``forget`` toward the TRUE answers (+ maintain and LM
    terms); evaluate the held-out half's original answers at step 0 and every ``eval_every``
    steps. The model is restored (adapters unloaded, ``requires_grad`` as before) afterwards.

    One ``train()`` run with a constant learning rate (an attacker's plain fine-tuning); the
    held-out half is evaluated inside it, after every ``eval_every`` steps and at the end.
    """
    config = config or RelearnConfig()
    if not config.formats:
        raise ConfigError("the relearning attack needs at least one evaluation format")
    forget_ids = {r.id for r in forget}
    shared = sorted(forget_ids & {r.id for r in retain})
    if shared:
        raise DataError(f"{len(shared)} facts are both forget and retain facts, e.g. {shared[0]}")
    train_half, heldout = relearn_split(forget, config.train_fraction, seed)
    data = TrainData(
        forget=relearn_pairs(train_half, config.prompt),
        retain=fact_pairs(retain, target="answer", prompt=config.prompt),
        general_text=list(general_text),
    ).validate()
    components = config.components or default_components(hm)
    was_training = hm.model.training
    means, facts = _metrics(hm, heldout, config, seed)
    curve, curve_per_fact = [{"step": 0, **means}], [facts]
    train_before = _metrics(hm, train_half, config, seed)[0]
    history: dict[str, list[float]] = {}
    trainable = make_trainable(
        hm,
        "lora",
        components,
        LoraOptions(
            rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout, seed=seed
        ),
    )
    try:

        def evaluate_heldout(done: int, _record: dict[str, float]) -> None:
            if done % config.eval_every == 0 or done == config.steps:
                means, facts = _metrics(hm, heldout, config, seed)
                curve.append({"step": done, **means})
                curve_per_fact.append(facts)

        result = (
            train(
                hm,
                trainable,
                data,
                TrainConfig(
                    objective="edit",
                    forget_coef=1.0,
                    maintain_coef=config.maintain_coef if data.retain else 0.0,
                    lm_coef=config.lm_coef if data.general_text else 0.0,
                    steps=config.steps,
                    lr=config.lr,
                    schedule=config.schedule,
                    warmup_steps=0,
                    batch_size=config.batch_size,
                    retain_batch_size=config.batch_size,
                    seed=seed,
                ),
                progress=progress,
                on_step=evaluate_heldout,
            )
            if config.steps
            else None
        )
        if result is not None:
            history = result.history
        hm.model.eval()
        train_after = _metrics(hm, train_half, config, seed)[0]
        n_trainable = trainable.n_params
    finally:
        trainable.restore()
        hm.model.train(was_training)
    return RelearnResult(
        config=config.model_dump(),
        train_ids=[r.id for r in train_half],
        heldout_ids=[r.id for r in heldout],
        curve=curve,
        train_before=train_before,
        train_after=train_after,
        history=history,
        n_trainable=n_trainable,
        curve_per_fact=curve_per_fact,
    )
