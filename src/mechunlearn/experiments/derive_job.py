"""``mechunlearn derive NAME``: build a derived model by its recorded recipe (``models.derived``).

``gemma3-270m-mcq``: Gemma 3 270M format-tuned to answer letter multiple-choice questions.
The base model knows many athletes' sports (73% completion accuracy) but answers the letter
MCQ at chance (33%), so MCQ cannot show whether an edit carried over. The recipe teaches the
*format*, not facts: LoRA on every block, trained on letter-MCQ items (every option order, so
no letter is favoured) of athletes the base model already knows, taken from a data file with
every athlete of the shipped data set removed (experiments draw their facts from the shipped
set, so none of them is trained on), with the same athletes' completion prompts in the
maintain term and general text in the LM term. The adapters are merged and the model is
saved with ``recipe.json``: the recipe, the data file's sha256, the athletes used, the
training curve, and the validation on the shipped athletes the base model knows (held out):
letter-MCQ accuracy over every option order, the completion accuracy on the same facts, and
the letter bias (how often each letter is chosen, and accuracy by the correct letter).

Measured (docs/results/derived-gemma3-270m-mcq/): lr 2e-4 for 150 steps learned only the
letter prior (MCQ 33.4%, every answer "C"); the defaults, lr 1e-3 for 200 steps, reach 85.9%
letter-MCQ accuracy with no letter bias, completion 89.2% on the same held-out facts.
"""

from __future__ import annotations

import hashlib
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from mechunlearn.edit.data import TrainData, fact_pairs
from mechunlearn.edit.export import save_edited
from mechunlearn.edit.parametrization import LoraOptions, make_trainable
from mechunlearn.edit.trainer import TrainConfig, train
from mechunlearn.errors import ConfigError, DataError
from mechunlearn.evals.harness import evaluate, known_records
from mechunlearn.io import atomic_write_json
from mechunlearn.models.derived import DERIVED_NAMES, RECIPE_FILE, derived_dir
from mechunlearn.models.handle import HookedModel
from mechunlearn.models.loading import load_model
from mechunlearn.schema import STRICT_CONFIG
from mechunlearn.tasks.formats import LETTERS, format_records
from mechunlearn.tasks.general_text import load_general_text
from mechunlearn.tasks.records import FactRecord
from mechunlearn.tasks.sports import load_sports


class FormatTuneRecipe(BaseModel):
    """How a format-tuned model is made (every field is saved in its ``recipe.json``)."""

    model_config = STRICT_CONFIG

    name: str = "gemma3-270m-mcq"
    base: str = "gemma3-270m"
    format: str = "mcq"
    n_athletes: int = Field(400, ge=8, description="known athletes trained on")
    known_threshold: float = Field(0.5, ge=0, le=1)
    steps: int = Field(200, ge=1)
    batch_size: int = Field(16, ge=1)
    retain_batch_size: int = Field(8, ge=1)
    lm_batch_size: int = Field(2, ge=1)
    lr: float = Field(1e-3, gt=0)
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float = Field(32.0, gt=0)
    seed: int = 0
    n_validation: int | None = Field(
        None, ge=1, description="shipped known athletes to validate on (default: all)"
    )


RECIPES = {"gemma3-270m-mcq": FormatTuneRecipe()}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def training_athletes(data: Sequence[FactRecord]) -> list[FactRecord]:
    """The data file's athletes minus every athlete of the shipped set (by name)."""
    shipped = {r.subject for r in load_sports()}
    kept = [r for r in data if r.subject not in shipped]
    if not kept:
        raise DataError(
            "every athlete of the data file is in the shipped data set; format tuning needs "
            "athletes no experiment uses"
        )
    return kept


def mcq_pairs(records: Sequence[FactRecord]) -> list[tuple[str, str]]:
    """``(prompt, " <letter>")`` for every option order of every record's letter MCQ."""
    items = format_records(records, ["mcq"], options={"mcq": {"option_order": "all"}})
    return [(item.prompt, item.continuations[item.correct]) for item in items]


def letter_validation(
    hm: HookedModel, records: Sequence[FactRecord], batch_size: int = 16
) -> dict[str, Any]:
    """Letter-MCQ (every option order) and completion accuracy on ``records``, and the
    letter bias: the share of answers per letter and the accuracy by correct letter."""
    result = evaluate(
        hm, records, ["completion", "mcq"], batch_size=batch_size,
        format_options={"mcq": {"option_order": "all"}}, known_threshold=None, progress=False,
    )  # fmt: skip
    mcq = [s for s in result.scores if s.item.format == "mcq"]
    n_options = len(mcq[0].logprobs)
    chosen = Counter(max(range(n_options), key=lambda i: s.logprobs[i]) for s in mcq)
    by_letter = {
        LETTERS[i]: statistics.fmean(s.accuracy for s in mcq if s.correct == i)
        for i in range(n_options)
    }
    return {
        "n_facts": len(records),
        "mcq_accuracy": result.formats["mcq"].metrics["accuracy"]["mean"],
        "mcq_accuracy_sem": result.formats["mcq"].metrics["accuracy"]["sem"],
        "mcq_p_correct": result.formats["mcq"].metrics["prob_renorm"]["mean"],
        "completion_accuracy": result.formats["completion"].metrics["accuracy"]["mean"],
        "chance": 1 / n_options,
        "letter_share": {LETTERS[i]: chosen.get(i, 0) / len(mcq) for i in range(n_options)},
        "accuracy_by_correct_letter": by_letter,
    }


def mcq_capable(validation: dict[str, Any]) -> bool:
    """Well above chance (by 25 points and 4 standard errors) and within 10 points of the
    model's own completion accuracy on the same facts."""
    mcq, chance = validation["mcq_accuracy"], validation["chance"]
    margin = max(0.25, 4 * validation["mcq_accuracy_sem"])
    return mcq >= chance + margin and mcq >= validation["completion_accuracy"] - 0.10


def derive_model(
    name: str,
    data: str | Path,
    *,
    recipe: FormatTuneRecipe | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> Path:
    """Build derived model ``name`` into the cache; returns its folder."""
    if name not in DERIVED_NAMES or name not in RECIPES:
        raise ConfigError(f"unknown derived model {name!r}; known: {', '.join(sorted(RECIPES))}")
    recipe = recipe or RECIPES[name]
    data = Path(data)
    candidates = training_athletes(load_sports(data))  # input checked before the model loads
    started = time.time()
    hm = load_model(recipe.base, log=log)
    known = known_records(hm, candidates, recipe.known_threshold, progress=progress)
    if len(known) < recipe.n_athletes:
        raise DataError(
            f"only {len(known)} athletes of {data} outside the shipped set are known by "
            f"{recipe.base}; the recipe needs {recipe.n_athletes}"
        )
    athletes = random.Random(recipe.seed).sample(known, recipe.n_athletes)
    held_out = known_records(hm, load_sports(), recipe.known_threshold)
    if recipe.n_validation is not None:
        held_out = random.Random(recipe.seed).sample(
            held_out, min(recipe.n_validation, len(held_out))
        )
    log(f"{len(athletes)} training athletes; validating on {len(held_out)} shipped known athletes")
    before = letter_validation(hm, held_out)
    log(
        f"before: letter MCQ {before['mcq_accuracy']:.3f}, completion {before['completion_accuracy']:.3f}"
    )
    train_data = TrainData(
        forget=mcq_pairs(athletes),
        retain=fact_pairs(athletes, prompt="completion"),
        general_text=load_general_text(),
    ).validate()
    components = [
        f"blocks.{layer}.{part}" for layer in range(hm.dims.n_layers) for part in ("attn", "mlp")
    ]
    trainable = make_trainable(
        hm, "lora", components,
        LoraOptions(rank=recipe.lora_rank, alpha=recipe.lora_alpha, seed=recipe.seed),
    )  # fmt: skip
    config = TrainConfig(
        objective="edit", steps=recipe.steps, lr=recipe.lr, batch_size=recipe.batch_size,
        retain_batch_size=recipe.retain_batch_size, lm_batch_size=recipe.lm_batch_size,
        seed=recipe.seed,
    )  # fmt: skip
    trained = train(hm, trainable, train_data, config, progress=progress, log=log)
    hm.model.eval()
    after = letter_validation(hm, held_out)
    log(
        f"after: letter MCQ {after['mcq_accuracy']:.3f}, completion {after['completion_accuracy']:.3f}"
    )
    out = derived_dir(name)
    save_edited(hm, out, trainable)
    atomic_write_json(
        out / RECIPE_FILE,
        {
            "name": name,
            "recipe": recipe.model_dump(),
            "data": {"path": str(data), "sha256": _sha256(data)},
            "training_athletes": [r.subject for r in athletes],
            "validation_athletes": [r.subject for r in held_out],
            "train": {
                "steps": trained.steps,
                "seconds": round(trained.seconds, 1),
                "final": {k: v[-1] for k, v in trained.history.items() if v},
            },
            "validation_before": before,
            "validation_after": after,
            "mcq_capable": mcq_capable(after),
            "seconds": round(time.time() - started, 1),
        },
    )
    return out
