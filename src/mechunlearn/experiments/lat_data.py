"""The data of one seed of a targeted-LAT experiment: request splits (held-out templates),
attack and benign sets, backdoor poisoning and trigger-free removal data."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mechunlearn.attacks.prefill import prefill_examples
from mechunlearn.errors import DataError
from mechunlearn.experiments.lat_config import LatExperimentConfig
from mechunlearn.tasks.backdoor import poisoning_pairs, removal_data
from mechunlearn.tasks.preference import LatData
from mechunlearn.tasks.refusal import (
    ChatItem,
    desired_pairs,
    load_preference_items,
    load_refusal_task,
    to_lat_data,
)

Log = Callable[[str], None]


# ---- data ------------------------------------------------------------------------------------
@dataclass
class SeedData:
    """One seed's data: LAT training examples and benign pairs; held-out test requests."""

    train: LatData
    benign: list[tuple[str, str]]
    test_items: list[ChatItem]  # refusal: harmful requests; backdoor: clean requests
    test_data: LatData  # the same requests as preference examples (chat-formatted)
    test_benign: LatData
    poison: list[tuple[str, str]] | None = None  # backdoor: the poisoning SFT pairs
    benign_validation: LatData | None = None  # held-out templates, for match_benign only

    def sizes(self) -> dict[str, int]:
        out = {
            "train": len(self.train),
            "benign_train": len(self.benign),
            "test": len(self.test_items),
            "test_benign": len(self.test_benign),
        }
        if self.poison is not None:
            out["poison"] = len(self.poison)
        return out


def _cap(items: list[ChatItem], n: int | None, seed: int) -> list[ChatItem]:
    """A seeded subset of ``n`` items, in their original order (all when ``n`` is None)."""
    if n is None or n >= len(items):
        return list(items)
    keep = sorted(random.Random(seed * 7919 + 17).sample(range(len(items)), n))
    return [items[i] for i in keep]


def _split_file_items(
    items: list[ChatItem], fractions: Sequence[float], seed: int
) -> dict[str, list[ChatItem]]:
    """Seeded train / validation / test split of a preference file's rows."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fractions[1] * len(items)))
    n_test = max(1, round(fractions[2] * len(items)))
    if len(items) - n_val - n_test < 1:
        raise DataError(f"too few rows ({len(items)}) to split into train, validation and test")
    test = sorted(order[:n_test])
    val = sorted(order[n_test : n_test + n_val])
    train = sorted(order[n_test + n_val :])
    parts = {"train": train, "validation": val, "test": test}
    return {name: [items[i] for i in index] for name, index in parts.items()}


def load_file_items(config: LatExperimentConfig) -> list[ChatItem] | None:
    """The refusal preference file's rows (``DataError`` for missing columns / files)."""
    if config.data is None:
        return None
    opts = config.data_options
    items = load_preference_items(
        config.data, opts.prompt, opts.chosen, opts.rejected, opts.max_words, opts.limit
    )
    if len(items) < 3:
        raise DataError(f"{config.data}: {len(items)} rows; a split needs at least 3")
    return items


def seed_data(
    config: LatExperimentConfig, tokenizer: Any, seed: int, file_items: list[ChatItem] | None
) -> SeedData:
    """Build (and so check) one seed's data with the model's tokenizer."""
    opts, cap = config.data_options, config.evaluation.max_test
    task = load_refusal_task(seed, opts.fractions, opts.by)
    benign_train = task.benign["train"]
    benign_test = _cap(task.benign["test"], cap, seed)
    benign_validation = None
    if any(m.match_benign is not None for m in config.methods or []):
        benign_validation = to_lat_data(tokenizer, _cap(task.benign["validation"], cap, seed))
    if config.application == "refusal":
        harmful = (
            _split_file_items(file_items, opts.fractions, seed)
            if file_items is not None
            else task.harmful
        )
        test = _cap(harmful["test"], cap, seed)
        data = SeedData(
            train=to_lat_data(tokenizer, harmful["train"]),
            benign=desired_pairs(tokenizer, benign_train),
            test_items=test,
            test_data=to_lat_data(tokenizer, test),
            test_benign=to_lat_data(tokenizer, benign_test),
            benign_validation=benign_validation,
        )
        if config.evaluation.prefill is not None:
            prefill_examples(tokenizer, test, config.evaluation.prefill)  # enough words?
        return data
    bd = config.backdoor.backdoor
    attack = removal_data(tokenizer, benign_test, bd)  # clean prompt -> response (unwanted)
    if config.backdoor.removal == "generic":  # nothing about the backdoor in the defender's data
        train = to_lat_data(tokenizer, list(benign_train) + list(task.harmful["train"]))
    else:
        train = removal_data(tokenizer, benign_train, bd)
    return SeedData(
        train=train,
        benign=desired_pairs(tokenizer, benign_train),
        test_items=benign_test,
        test_data=attack,
        test_benign=to_lat_data(tokenizer, benign_test),
        poison=poisoning_pairs(tokenizer, benign_train, bd, seed),
        benign_validation=benign_validation,
    )
