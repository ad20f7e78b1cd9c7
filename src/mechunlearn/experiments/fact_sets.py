"""The fact sets of an editing experiment: validation facts, per-seed forget/retain sets, targets.

Editing or unlearning a fact the model never knew measures nothing, so every set is drawn from
the known facts. Validation facts (for the hyper-parameter sweep) are carved out first and are
the same for every seed; each seed then draws its own forget, maintain (retain-train) and
held-out retain sets from the rest. All sets are disjoint, and the draws depend on record ids
and seeds only, never on file order.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from mechunlearn.errors import DataError
from mechunlearn.experiments.edit_config import EditTarget, ExperimentConfig, FactSelection
from mechunlearn.tasks.records import FactRecord


@dataclass(frozen=True)
class FactSets:
    """Disjoint fact sets for one seed."""

    forget: list[FactRecord]
    retain_train: list[FactRecord]
    retain_eval: list[FactRecord]

    def check(self) -> None:
        if not self.forget:
            raise DataError("the forget set is empty")
        if not self.retain_eval:
            raise DataError("the held-out retain set is empty")
        groups = {
            "forget": self.forget,
            "retain_train": self.retain_train,
            "retain_eval": self.retain_eval,
        }
        seen: dict[str, str] = {}
        for name, records in groups.items():
            for record in records:
                if record.id in seen and seen[record.id] != name:
                    raise DataError(
                        f"fact {record.id} is in both the {seen[record.id]} and the {name} set"
                    )
                seen[record.id] = name

    def to_json(self) -> dict[str, list[str]]:
        return {
            "forget": [r.id for r in self.forget],
            "retain_train": [r.id for r in self.retain_train],
            "retain_eval": [r.id for r in self.retain_eval],
        }


def _draw(records: Sequence[FactRecord], n: int, rng: random.Random) -> list[FactRecord]:
    ordered = sorted(records, key=lambda r: r.id)
    return sorted(rng.sample(ordered, min(n, len(ordered))), key=lambda r: r.id)


def _need(what: str, have: int, want: int) -> None:
    if have < want:
        raise DataError(
            f"not enough known facts for the {what}: need {want}, have {have}; lower the "
            "facts.n_* sizes or use a larger data file"
        )


@dataclass(frozen=True)
class ExperimentFacts:
    """Validation facts (fixed) and the pool each seed draws from."""

    known: list[FactRecord]
    validation: FactSets
    pool: list[FactRecord]
    selection: FactSelection

    def for_seed(self, seed: int) -> FactSets:
        sel = self.selection
        rng = random.Random(f"facts-{seed}")
        if sel.forget_group is not None:
            group = [r for r in self.pool if r.answer == sel.forget_group]
            forget = _draw(group, sel.max_forget or len(group), rng)
            others = [r for r in self.pool if r.answer != sel.forget_group]
        else:
            _need("forget set", len(self.pool), sel.n_forget)
            forget = _draw(self.pool, sel.n_forget, rng)
            chosen = {r.id for r in forget}
            others = [r for r in self.pool if r.id not in chosen]
        _need("retain sets", len(others), sel.n_retain_train + sel.n_retain_eval)
        retain_train = _draw(others, sel.n_retain_train, rng)
        taken = {r.id for r in retain_train}
        retain_eval = _draw([r for r in others if r.id not in taken], sel.n_retain_eval, rng)
        sets = FactSets(forget, retain_train, retain_eval)
        sets.check()
        return sets


def split_experiment_facts(
    known: Sequence[FactRecord], selection: FactSelection
) -> ExperimentFacts:
    """Carve the validation facts out of the known facts; the rest is every seed's pool."""
    if not known:
        raise DataError("no known facts to experiment on")
    rng = random.Random("validation")
    if selection.forget_group is not None:
        answers = sorted({r.answer for r in known})
        group = [r for r in known if r.answer == selection.forget_group]
        if not group:
            raise DataError(
                f"no known fact has the answer {selection.forget_group!r}; known answers: {answers}"
            )
        _need(
            f"validation split of group {selection.forget_group!r}",
            len(group) - 1,
            selection.n_validation,
        )
        val_forget = _draw(group, selection.n_validation, rng)
        others = [r for r in known if r.answer != selection.forget_group]
    else:
        _need("validation forget set", len(known), selection.n_validation)
        val_forget = _draw(known, selection.n_validation, rng)
        taken = {r.id for r in val_forget}
        others = [r for r in known if r.id not in taken]
    _need("validation retain set", len(others), selection.n_validation_retain)
    val_retain = _draw(others, selection.n_validation_retain, rng)
    held = {r.id for r in val_forget} | {r.id for r in val_retain}
    validation = FactSets(val_forget, [], val_retain)
    validation.check()
    pool = [r for r in known if r.id not in held]
    return ExperimentFacts(list(known), validation, pool, selection)


def with_targets(
    records: Sequence[FactRecord], target: EditTarget, seed: int, extra_options: Sequence[str] = ()
) -> list[FactRecord]:
    """Records with ``new_answer`` set per ``target`` (and ``extra_options`` added to options)."""
    out = []
    for record in records:
        options = tuple(record.options) + tuple(o for o in extra_options if o not in record.options)
        if target.kind == "fixed":
            new = target.value
            if new == record.answer:
                raise DataError(
                    f"{record.id} already has the answer {new!r}; it cannot be edited to it"
                )
        elif target.kind == "other_option":
            rng = random.Random(f"target-{seed}-{record.id}")
            new = rng.choice([o for o in record.options if o != record.answer])
        else:
            if record.new_answer is None:
                raise DataError(
                    f"{record.id} has no new_answer in the data; use another target kind"
                )
            new = record.new_answer
        out.append(record.model_copy(update={"options": options, "new_answer": new}))
    return out


def extra_options(config: ExperimentConfig) -> tuple[str, ...]:
    """A fixed edit target outside the options (e.g. golf for sports) joins every fact's options,
    so forget and retain facts are asked the same multiple-choice question."""
    if config.mode == "edit" and config.target.kind == "fixed":
        return (config.target.value,)
    return ()


def add_options(records: Sequence[FactRecord], options: Sequence[str]) -> list[FactRecord]:
    if not options:
        return list(records)
    return [
        r.model_copy(
            update={"options": tuple(r.options) + tuple(o for o in options if o not in r.options)}
        )
        for r in records
    ]
