"""Derived models: checkpoints built from an embedded model by a recorded recipe.

Some experiments need a model the embedded ones are not, for example a Gemma 3 270M that
answers letter multiple-choice questions (the base model is at chance on them). Such a model
is never committed as weights: ``mechunlearn derive NAME`` builds it into the cache
(``$MECHUNLEARN_CACHE/derived/NAME/``, a plain Hugging Face folder with the ``recipe.json``
that made it), and ``load_model(NAME)`` loads it from there like any local checkpoint. This
module only knows where derived models live and how to build each one is asked for; the
recipes themselves are in ``experiments.derive_job`` (they train, which this layer does not).
"""

from __future__ import annotations

from pathlib import Path

from mechunlearn.errors import ModelNotFoundError
from mechunlearn.models.embedded import cache_root

RECIPE_FILE = "recipe.json"

DERIVED_NAMES = {
    "gemma3-270m-mcq": "mechunlearn derive gemma3-270m-mcq --data ../shared/data/sports_athletes.csv",
}
"""Derived model name -> the command that builds it."""


def derived_dir(name: str) -> Path:
    return cache_root() / "derived" / name


def derived_built(name: str) -> bool:
    folder = derived_dir(name)
    return (folder / "config.json").is_file() and (folder / RECIPE_FILE).is_file()


def require_derived(name: str) -> Path:
    """The built folder of ``name``, or an error that says how to build it."""
    if not derived_built(name):
        raise ModelNotFoundError(
            f"derived model {name!r} is not built in {derived_dir(name)}; build it once with "
            f"`{DERIVED_NAMES[name]}`"
        )
    return derived_dir(name)
