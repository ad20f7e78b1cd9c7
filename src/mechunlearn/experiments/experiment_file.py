"""One schema for every experiment YAML: a pydantic discriminated union on ``kind``
(``edit`` when absent: editing/unlearning; ``lat``: targeted LAT; ``tree``: path-finding
training), so a file is validated against exactly one config class and errors name its fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Discriminator, Tag, TypeAdapter, ValidationError

from mechunlearn.errors import ConfigError
from mechunlearn.experiments.config import read_yaml_mapping, validation_problems
from mechunlearn.experiments.edit_config import ExperimentConfig
from mechunlearn.experiments.lat_config import LatExperimentConfig
from mechunlearn.experiments.tree_job import TreeExperimentConfig

KINDS = ("edit", "lat", "tree")


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("kind", "edit"))
    return str(getattr(value, "kind", "edit"))


AnyExperiment = Annotated[
    Annotated[ExperimentConfig, Tag("edit")]
    | Annotated[LatExperimentConfig, Tag("lat")]
    | Annotated[TreeExperimentConfig, Tag("tree")],
    Discriminator(_kind),
]
_ADAPTER: TypeAdapter = TypeAdapter(AnyExperiment)


def validate_experiment(
    data: dict[str, Any], source: str
) -> ExperimentConfig | LatExperimentConfig | TreeExperimentConfig:
    """The config class ``data['kind']`` names, validated; one readable ``ConfigError``."""
    kind = _kind(data)
    if kind not in KINDS:
        raise ConfigError(
            f"invalid config {source}: kind {kind!r} is not one of {', '.join(KINDS)}"
        )
    try:
        return _ADAPTER.validate_python(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config {source}: {validation_problems(exc, 1)}") from None


def load_experiment(path: str | Path):
    """Read and validate an experiment YAML of any kind."""
    return validate_experiment(read_yaml_mapping(path), str(path))
