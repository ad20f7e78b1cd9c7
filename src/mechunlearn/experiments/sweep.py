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

``selection: halving`` replaces the full grid by successive halving over early-stopped runs
(``sweep_rungs``): with three learning rates and ``eta = 3``, one rung, by default of a third
of the steps. The main job's config sets ``rung_fraction: 0.65`` (13 of 20 steps): on Gemma 3
270M that picked the full sweep's learning rate for 7 of 7 localizations where a third of the
steps picked it for 3 (``bench/sweep_selection.py``, ``docs/results/main-job``).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mechunlearn.edit.data import TrainData
from mechunlearn.edit.engine import with_changes
from mechunlearn.edit.lat import ForgetLat
from mechunlearn.edit.parametrization import editing
from mechunlearn.edit.trainer import train
from mechunlearn.errors import ConfigError
from mechunlearn.evals.edit_metrics import edit_metrics
from mechunlearn.evals.harness import evaluate, summarise_format
from mechunlearn.experiments.edit_config import (
    ExperimentConfig,
    Hyperparameters,
    LocalizationSpec,
    SweepConfig,
)
from mechunlearn.experiments.fact_sets import FactSets
from mechunlearn.io import atomic_write_json, read_json
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


def sweep_grid(sweep: SweepConfig) -> list[tuple[float, float]]:
    """The grid's ``(lr, forget_coef)`` points, in a fixed order (smallest lr first)."""
    return list(itertools.product(sorted(sweep.lr), sweep.forget_coef))


def sweep_rungs(sweep: SweepConfig, n_points: int, steps: int) -> list[int]:
    """Training steps of each rung (``full``: one rung at the sweep's full length).

    Successive halving (Jamieson & Talwalkar 2016) with reduction factor ``eta``: ``R =
    ceil(log_eta(n_points))`` rungs; rung ``r`` trains its points for ``steps * f^(R - r)``
    steps of the full-length schedule (an early-stopped run, so the learning rate decays as in
    the real edit), ``f = rung_fraction`` (default ``1 / eta``), and keeps the best
    ``ceil(n / eta^(r + 1))`` for the next rung, which resumes them from their checkpoints.
    The winner of the last rung is chosen without being trained to the end. ``rung_steps``
    gives the rungs' step counts directly (e.g. ``[7, 13]`` with ``eta: 2``: three points to
    step 7, the best two on to 13).
    """
    full = sweep.steps or steps
    if sweep.selection == "full" or n_points <= 1:
        return [full]
    if sweep.rung_steps is not None:
        if sweep.rung_steps[-1] > full:
            raise ConfigError(f"sweep.rung_steps {sweep.rung_steps} go past the {full} steps")
        return list(sweep.rung_steps)
    eta = sweep.eta
    fraction = sweep.rung_fraction or 1 / eta
    n_rungs = max(1, math.ceil(math.log(n_points) / math.log(eta) - 1e-9))
    return [max(1, round(full * fraction ** (n_rungs - r))) for r in range(n_rungs)]


def survivors_count(sweep: SweepConfig, n_points: int, rung: int) -> int:
    """How many grid points rung ``rung`` trains (all of them at rung 0)."""
    return max(1, math.ceil(n_points / sweep.eta**rung)) if rung else n_points


def rank_points(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first: higher score, ties to the smaller learning rate."""
    return sorted(points, key=lambda p: (-p["score"], p["lr"]))


def sweep_point(
    hm: HookedModel,
    spec: LocalizationSpec,
    loc: Localization,
    sets: FactSets,
    data: TrainData,
    config: ExperimentConfig,
    base_retain: float,
    lr: float,
    coef: float,
    stop_after: int | None = None,
    score_at: Sequence[int] = (),
    checkpoint_dir: Path | None = None,
    keep_checkpoint: bool = False,
) -> dict[str, Any]:
    """Train one grid point on the validation facts, score it, restore the weights.

    ``stop_after``: stop after that many steps of the full-length schedule (a rung of
    successive halving). ``score_at``: also score after these steps (``numbers["curve"]``, to
    study how early a ranking settles). ``checkpoint_dir``: resume from the newest checkpoint
    there (a survivor of an earlier rung continues where it stopped: the same numbers as one
    uninterrupted run) and, with ``keep_checkpoint``, save one at ``stop_after`` for the next
    rung."""
    sweep = config.sweep
    train_config = with_changes(
        spec.train_config(config.train),
        lr=lr,
        forget_coef=coef,
        seed=sweep.seed,
        steps=sweep.steps or config.row_train(spec.name).steps,
        checkpoint_every=stop_after if keep_checkpoint else None,
    )
    curve: list[dict[str, Any]] = []

    def on_step(done: int, _record: dict[str, float]) -> None:
        if done in score_at:
            curve.append({"step": done, **validation_score(hm, sets, config, base_retain)})

    with editing(hm, spec.trainer, loc.selected) as trainable:
        history = train(
            hm,
            trainable,
            data,
            train_config,
            progress=False,
            forget_perturbation=forget_perturbation(spec),
            stop_after=stop_after,
            on_step=on_step if score_at else None,
            checkpoint_dir=checkpoint_dir,
            resume=checkpoint_dir is not None,
        )
        numbers = validation_score(hm, sets, config, base_retain)
    numbers |= {"lr": lr, "forget_coef": coef, "final_loss": history.history["loss"][-1]}
    if checkpoint_dir is not None:
        numbers["resumed_at"] = history.info["resumed_at"]
    return numbers | ({"curve": curve} if score_at else {})


def _rung_results(folder: Path, name: str, rung: int, n_points: int) -> list[dict[str, Any]]:
    found = [read_json(folder / "sweep" / name / f"r{rung}p{i}.json") for i in range(n_points)]
    return [{**r, "point": i} for i, r in enumerate(found) if not r.get("eliminated")]


def rung_survivors(folder: Path, name: str, rung: int, sweep) -> set[int]:
    """Grid points that go on to ``rung``: the best of the previous rung."""
    n_points = len(sweep_grid(sweep))
    ranked = rank_points(_rung_results(folder, name, rung - 1, n_points))
    return {p["point"] for p in ranked[: survivors_count(sweep, n_points, rung)]}


def swept_row(config: ExperimentConfig, name: str) -> str:
    """The row whose hyper-parameters ``name`` trains with: itself, or the row it names in
    ``hyperparameters_from``."""
    spec = next(s for s in config.localizations if s.name == name)
    return spec.hyperparameters_from or name


MATCH_FOLDER = Path("match")
"""``match/<row>.json``: a matched row's calibration (``experiments.forget_match``)."""


def matched_record_file(folder: Path, name: str) -> Path:
    return folder / MATCH_FOLDER / f"{name}.json"


def chosen_hyperparameters(folder: Path, config: ExperimentConfig, name: str) -> Hyperparameters:
    """A localization's fixed hyper-parameters, or its sweep's choice (best of the last rung),
    or those of the row it takes them from (``hyperparameters_from``), or its calibration's
    (``match_forgetting``)."""
    spec = next(s for s in config.localizations if s.name == name)
    if spec.match_forgetting is not None:
        chosen = read_json(matched_record_file(folder, name))["chosen"]
        return Hyperparameters(lr=chosen["lr"], forget_coef=chosen["forget_coef"])
    source = swept_row(config, name)
    if source != name:
        return chosen_hyperparameters(folder, config, source)
    if name in config.hyperparameters:
        return config.hyperparameters[name]
    n_points = len(sweep_grid(config.sweep))
    last = len(sweep_rungs(config.sweep, n_points, config.row_train(name).steps)) - 1
    best = rank_points(_rung_results(folder, name, last, n_points))[0]
    return Hyperparameters(lr=best["lr"], forget_coef=best["forget_coef"])


def write_sweep_summaries(folder: Path, config: ExperimentConfig, base_retain) -> None:
    """``sweep/<localization>.json``: the choice and every point tried (the report's record)."""
    if config.sweep is None:
        return
    n_points = len(sweep_grid(config.sweep))
    for spec in config.localizations:
        if (
            spec.name in config.hyperparameters
            or spec.hyperparameters_from is not None
            or spec.match_forgetting is not None
        ):
            continue
        rungs = sweep_rungs(config.sweep, n_points, config.row_train(spec.name).steps)
        tried = [
            p for r in range(len(rungs)) for p in _rung_results(folder, spec.name, r, n_points)
        ]
        atomic_write_json(
            folder / "sweep" / f"{spec.name}.json",
            {
                "chosen": chosen_hyperparameters(folder, config, spec.name).model_dump(),
                "base_retain_accuracy": base_retain,
                "selection": config.sweep.selection,
                "rung_steps": rungs,
                "points": tried,
            },
        )
