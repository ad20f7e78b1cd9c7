"""Matched forgetting: a row's learning rate calibrated so that it forgets as much as another
row on the validation facts (``LocalizationSpec.match_forgetting``; issue 18).

Sheshadri et al. 2024 (Sec. 4.3) claim that unlearning under a latent adversary resists
relearning better than the same unlearning without one. At a shared learning rate a LAT twin
may hardly unlearn at all (gradient ascent's gradient on the answer's logit is ``1 - p``, and
the adversary pushes ``p`` toward 1), and then robustness to relearning cannot be compared:
the twin has nothing to relearn. Matching the forgetting first, as the refusal experiment
matches benign compliance, asks the paper's question at equal forgetting.

The target is the reference row's validation forget effect after its full training at its
chosen hyper-parameters (``reference_forgetting``); the matched row is then trained at each
learning rate (same steps, validation facts and forget coefficient), and ``refine`` bisection
tries follow (``experiments.calibration``). Every try is a full training on the validation
facts, logged as it finishes, so an interrupted calibration resumes without redoing tries.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mechunlearn.experiments.calibration import closest_to_target, next_bracketing_value
from mechunlearn.experiments.edit_config import Hyperparameters, LocalizationSpec
from mechunlearn.io import atomic_write_json, read_json

MEASURE = "forget_effect"

ValidationPoint = Callable[[float, float], dict[str, Any]]
"""``point(lr, forget_coef)``: one row trained at that point on the validation facts for its
full steps, scored (``experiments.sweep.sweep_point``: ``forget_effect``, ``retain_accuracy``,
...), and its weights restored."""


def _timed(point: ValidationPoint, lr: float, coef: float) -> dict[str, Any]:
    tick = time.perf_counter()
    numbers = point(lr, coef)
    return {**numbers, "seconds": round(time.perf_counter() - tick, 3)}


def reference_forgetting(
    name: str, point: ValidationPoint, chosen: Hyperparameters, n_validation: int
) -> dict[str, Any]:
    """The reference row ``name`` trained for its full steps at its ``chosen``
    hyper-parameters on the validation facts: its forget effect is the matched rows' target (a
    halving sweep scores its points after fewer steps, so the sweep's own numbers are not that
    target)."""
    numbers = _timed(point, chosen.lr, chosen.forget_coef)
    return {"row": name, **numbers, "n_validation": n_validation}


def match_forgetting(
    spec: LocalizationSpec,
    point: ValidationPoint,
    reference: dict[str, Any],
    default_lr: list[float],
    trials_path: Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Calibrate ``spec``'s learning rate (its ``match_forgetting.lr``, else ``default_lr``:
    the sweep's grid) to ``reference``'s validation forget effect; ``point`` trains ``spec``.
    The record names every try and the chosen ``(lr, forget_coef)``. ``trials_path``: a log of
    finished tries (ignored when made for another target, coefficient or validation set)."""
    match = spec.match_forgetting
    if match is None:
        raise ValueError(f"{spec.name} has no match_forgetting")
    target = reference[MEASURE]
    coef = reference["forget_coef"]
    n_validation = reference["n_validation"]
    key = {"row": match.row, "target": target, "forget_coef": coef, "n_validation": n_validation}
    logged: dict[float, dict[str, Any]] = {}
    if trials_path is not None and trials_path.is_file():
        record = read_json(trials_path)
        if {k: record.get(k) for k in key} == key:
            logged = {t["lr"]: t for t in record["tried"]}
    tried: list[dict[str, Any]] = []

    def attempt(lr: float) -> None:
        if lr in logged:
            tried.append(logged[lr])
            return
        numbers = _timed(point, lr, coef)
        tried.append(numbers)
        log(
            f"{spec.name}: matching {match.row}'s forgetting ({target:.2f}): lr {lr:g} -> "
            f"{numbers[MEASURE]:.2f} (retain {numbers['retain_accuracy']:.2f})"
        )
        if trials_path is not None:
            atomic_write_json(trials_path, {**key, "tried": tried})

    for lr in match.lr or sorted(default_lr):
        attempt(lr)
    for _ in range(match.refine):
        lr = next_bracketing_value(tried, target, "lr", MEASURE)
        if lr is None:
            break
        attempt(lr)
    chosen_lr = closest_to_target(tried, target, "lr", MEASURE)
    chosen = next(t for t in tried if t["lr"] == chosen_lr)
    return {
        "name": spec.name,
        "row": match.row,
        "target": target,
        "reference": reference,
        "tried": sorted(tried, key=lambda t: t["lr"]),
        "chosen": {"lr": chosen_lr, "forget_coef": coef},
        "chosen_forget_effect": chosen[MEASURE],
        "n_validation": n_validation,
    }
