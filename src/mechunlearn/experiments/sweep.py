"""Per-localization choice of learning rate and forget coefficient on a validation split.

Mechanistic Unlearning tuned each method's hyper-parameters separately (Guo et al. 2024,
App. B), since a larger set of trainable weights wants a smaller step. Here every grid point
trains on the *validation* forget facts (never the test facts of any seed) and is scored on
validation facts in the completion format:

``score = harmonic_mean(forget_effect, retain_kept)``

with ``forget_effect`` the edit success (editing) or ``1 - original accuracy`` (unlearning)
on the validation forget facts, and ``retain_kept`` the validation retain accuracy divided by
the base model's (capped at 1). The harmonic mean rewards a setting only when it both edits
and keeps the rest; ties go to the smaller learning rate.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from mechunlearn.edit.data import TrainData
from mechunlearn.edit.engine import with_changes
from mechunlearn.edit.lat import ForgetLat
from mechunlearn.edit.parametrization import WeightSnapshot, make_trainable
from mechunlearn.edit.trainer import train
from mechunlearn.evals.edit_metrics import edit_metrics
from mechunlearn.evals.harness import evaluate, summarise_format
from mechunlearn.experiments.edit_config import ExperimentConfig, Hyperparameters, LocalizationSpec
from mechunlearn.experiments.fact_sets import FactSets
from mechunlearn.localize import Localization
from mechunlearn.models.handle import HookedModel

SELECTION_FORMAT = "completion"


def harmonic(a: float, b: float) -> float:
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


def validation_score(
    hm: HookedModel, sets: FactSets, config: ExperimentConfig, base_retain: float
) -> dict[str, float]:
    result = evaluate(
        hm,
        list(sets.forget) + list(sets.retain_eval),
        [SELECTION_FORMAT],
        batch_size=config.evaluation.batch_size,
        known_threshold=None,
        progress=False,
    )
    forget_ids = {r.id for r in sets.forget}
    retain_scores = [s for s in result.scores if s.item.record_id not in forget_ids]
    retain = summarise_format(SELECTION_FORMAT, retain_scores, ("accuracy",)).metrics
    retain_acc = retain["accuracy"]["mean"]
    if config.mode == "edit":
        targets = {r.id: (r.answer, r.new_answer) for r in sets.forget}
        effect = edit_metrics(result.scores, targets)[SELECTION_FORMAT]["edit_success"]["mean"]
    else:
        forget_scores = [s for s in result.scores if s.item.record_id in forget_ids]
        acc = summarise_format(SELECTION_FORMAT, forget_scores, ("accuracy",)).metrics
        effect = 1.0 - acc["accuracy"]["mean"]
    kept = min(1.0, retain_acc / base_retain) if base_retain > 0 else 0.0
    return {
        "forget_effect": effect,
        "retain_accuracy": retain_acc,
        "retain_kept": kept,
        "score": harmonic(effect, kept),
    }


def forget_perturbation(spec: LocalizationSpec) -> ForgetLat | None:
    """The row's targeted LAT on the forget term, if it has one."""
    return ForgetLat(spec.latent_adversary) if spec.latent_adversary is not None else None


def sweep_localization(
    hm: HookedModel,
    spec: LocalizationSpec,
    loc: Localization,
    sets: FactSets,
    data: TrainData,
    config: ExperimentConfig,
    base_retain: float,
    log: Callable[[str], None] = lambda _: None,
) -> tuple[Hyperparameters, list[dict[str, Any]]]:
    """Try every grid point; return the best and every point's validation numbers."""
    sweep = config.sweep
    points = []
    for lr, coef in itertools.product(sorted(sweep.lr), sweep.forget_coef):
        train_config = with_changes(
            spec.train_config(config.train),
            lr=lr,
            forget_coef=coef,
            seed=sweep.seed,
            steps=sweep.steps or config.train.steps,
        )
        snapshot = WeightSnapshot(s.param for s in hm.parameters_of(loc.selected))
        trainable = make_trainable(hm, spec.trainer, loc.selected)
        try:
            history = train(
                hm,
                trainable,
                data,
                train_config,
                progress=False,
                forget_perturbation=forget_perturbation(spec),
            )
            numbers = validation_score(hm, sets, config, base_retain)
        finally:
            trainable.restore()
            snapshot.restore()
        numbers |= {"lr": lr, "forget_coef": coef, "final_loss": history.history["loss"][-1]}
        log(
            f"sweep {spec.name}: lr={lr:g} forget_coef={coef:g} -> score {numbers['score']:.3f} "
            f"(forget {numbers['forget_effect']:.2f}, retain {numbers['retain_accuracy']:.2f})"
        )
        points.append(numbers)
    best = max(points, key=lambda p: (p["score"], -p["lr"]))
    return Hyperparameters(lr=best["lr"], forget_coef=best["forget_coef"]), points
