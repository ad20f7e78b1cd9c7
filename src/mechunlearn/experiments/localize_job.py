"""The ``localize`` job: facts -> (known facts) -> one localization method -> run folder.

Writes ``localization.json`` (scores, selection, parameter count, evidence), ``config.yaml``,
``facts.json`` (the facts used) and figures, all-or-nothing.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from mechunlearn.errors import DataError
from mechunlearn.evals.harness import known_records
from mechunlearn.experiments.config import TaskName, registered_name
from mechunlearn.experiments.localizations import BUDGET_METHOD, takes_budget
from mechunlearn.experiments.method_options import MethodOptionsMap, move_legacy_options
from mechunlearn.io import atomic_directory, atomic_write_json, atomic_write_yaml
from mechunlearn.localize import LOCALIZERS, Localization, LocalizeOptions
from mechunlearn.localize.prompts import choose_pairable_facts
from mechunlearn.models.loading import load_model
from mechunlearn.report.figures import localization_figures
from mechunlearn.schema import STRICT_CONFIG
from mechunlearn.tasks.datasets import load_task
from mechunlearn.tasks.records import FactRecord


class LocalizeConfig(BaseModel):
    model_config = STRICT_CONFIG

    model: str = "gemma3-270m"
    task: TaskName = "sports"
    data: str | None = None
    method: Annotated[str, registered_name(LOCALIZERS)] = "fact_lookup"
    n_facts: int = Field(default=32, ge=2, description="facts to localize on (seeded sample)")
    known_only: bool = Field(
        default=True, description="keep only facts the model knows (P >= known_threshold)"
    )
    known_threshold: float = Field(default=0.5, ge=0, le=1)
    budget_from: str | None = Field(
        default=None, description="take the parameter budget from this localization.json"
    )
    default_budget: Literal["fact_lookup", "none"] = Field(
        default="fact_lookup",
        description="without budget, budget_from or top_k: give the method fact_lookup's parameter "
        "count on the same facts (Mechanistic Unlearning's equal-budget comparison), or no budget",
    )
    device: str | None = None
    dtype: str = "float32"
    options: LocalizeOptions = Field(default_factory=LocalizeOptions)
    method_options: MethodOptionsMap = Field(
        default_factory=dict,
        description="each method's own options, e.g. {causal_tracing: {noise_scale: 3.0}}",
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_options(cls, data: Any) -> Any:
        return move_legacy_options(data, "options")


def choose_facts(records: list[FactRecord], n: int, seed: int) -> list[FactRecord]:
    if len(records) < n:
        return records
    return sorted(random.Random(seed).sample(records, n), key=lambda r: r.id)


def run_localize(
    config: LocalizeConfig,
    out: str | Path,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> Localization:
    records = load_task(config.task, config.data)
    options = config.options.model_copy(update={"task": config.task, "progress": progress})
    if config.budget_from:
        reference = Localization.load(config.budget_from)
        options = options.model_copy(update={"budget": reference.n_params})
        log(
            f"parameter budget {reference.n_params:,} from {config.budget_from} ({reference.method})"
        )
    hm = load_model(config.model, device=config.device, dtype=config.dtype, log=log)
    if config.budget_from:
        reference.check_model(hm)
    started = time.time()
    if config.known_only:
        # sample generously before filtering so that enough known facts remain
        pool = choose_facts(records, min(len(records), 4 * config.n_facts), options.seed)
        pool = known_records(hm, pool, config.known_threshold, progress=progress)
        log(f"{len(pool)} known facts in a pool of {min(len(records), 4 * config.n_facts)}")
    else:
        pool = records
    budget_source = f"budget_from {config.budget_from}" if config.budget_from else "options"
    method = LOCALIZERS.get(config.method)
    flu_budget = (
        config.default_budget == "fact_lookup"
        and takes_budget(config.method)
        and options.budget is None
        and options.top_k is None
    )
    if method.needs_pairs or flu_budget:
        facts = choose_pairable_facts(hm, pool, config.n_facts, options.seed)
    else:
        facts = choose_facts(pool, config.n_facts, options.seed)
    if len(facts) < 2:
        raise DataError(f"only {len(facts)} usable facts; localization needs at least 2")
    if flu_budget:
        log("no budget given: using fact_lookup's parameter count on the same facts")
        reference_flu = LOCALIZERS.get(BUDGET_METHOD)(
            hm, facts, options, config.method_options.get(BUDGET_METHOD)
        )
        if reference_flu.n_params == 0:
            raise DataError(
                "fact_lookup selected nothing on these facts, so it gives no budget; pass --budget"
            )
        options = options.model_copy(update={"budget": reference_flu.n_params})
        budget_source = f"fact_lookup on the same facts ({', '.join(reference_flu.selected)})"
    localization = method(hm, facts, options, config.method_options.get(config.method))
    localization.evidence.setdefault("budget_source", budget_source)
    localization = localization.model_copy(
        update={
            "model": config.model,
            "n_facts": len(facts),
            "seed": options.seed,
            "task": config.task,
        }
    )
    localization.evidence.setdefault("seconds", round(time.time() - started, 1))
    with atomic_directory(out) as tmp:
        localization.save(tmp / "localization.json")
        atomic_write_yaml(tmp / "config.yaml", config.model_dump(mode="json"))
        atomic_write_json(tmp / "facts.json", [fact_summary(r) for r in facts])
        localization_figures(localization, tmp / "figures")
    return localization


def fact_summary(record: FactRecord) -> dict[str, Any]:
    return {"id": record.id, "subject": record.subject, "answer": record.answer}
