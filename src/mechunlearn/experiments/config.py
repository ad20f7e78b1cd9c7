"""Pydantic configs for jobs; unknown keys are errors, so a typo never silently does nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, Field, ValidationError, field_validator

from mechunlearn.errors import ConfigError
from mechunlearn.schema import STRICT_CONFIG
from mechunlearn.tasks.datasets import TASKS
from mechunlearn.tasks.formats import FORMATS


def registered_name(registry):
    """A pydantic validator accepting only names registered in ``registry``."""

    def check(value: str) -> str:
        registry.get(value)  # raises ConfigError listing the known names
        return value

    return AfterValidator(check)


def registered_measurements(pipeline: str, dedicated: dict[str, str]):
    """A pydantic validator for a config's ``measurements`` block (name or ``name@instance``
    -> options): registered measurements of ``pipeline`` with valid options, none of those
    ``dedicated`` to a field of their own (measurement -> field)."""

    def check(value: dict[str, Any]) -> dict[str, Any]:
        # imported here: the measurements import the configs' option types
        from mechunlearn.experiments.measurements import check_extra

        check_extra(value, pipeline, dedicated)
        return value

    return AfterValidator(check)


TaskName = Annotated[str, registered_name(TASKS)]


def _distinct_seeds(value: list[int]) -> list[int]:
    if not value or len(set(value)) != len(value):
        raise ValueError("seeds must be a non-empty list without repeats")
    return value


Seeds = Annotated[list[int], AfterValidator(_distinct_seeds)]
"""An experiment's seeds: at least one, none repeated."""


class EvalConfig(BaseModel):
    """What ``mechunlearn eval`` runs: one model, one fact set, several prompt formats."""

    model_config = STRICT_CONFIG

    model: str = "gemma3-270m"
    task: TaskName = "sports"
    data: str | None = Field(
        default=None, description="data file; default: the task's shipped data"
    )
    formats: list[str] = Field(default_factory=lambda: ["completion", "mcq"])
    format_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seed: int = 0
    limit: int | None = Field(
        default=None, ge=1, description="evaluate a seeded random subset of this size"
    )
    batch_size: int = Field(default=16, ge=1)
    known_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    lm_loss: bool = True
    lm_texts: int | None = Field(
        default=None, ge=1, description="use only the first N general sentences"
    )
    device: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device_map: str | None = Field(
        default=None, description="e.g. 'auto' to shard a large model over GPUs"
    )

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one prompt format is needed")
        for name in value:
            FORMATS.get(name)
        return value


def validation_problems(exc: ValidationError, skip: int = 0) -> str:
    """Pydantic's report as one line: ``field.path: message; ...`` (``skip``: leading path
    parts to drop, e.g. a discriminated union's tag)."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc'][skip:])) or '(top)'}: {e['msg']}" for e in exc.errors()
    )


def validate_config(cls: type[BaseModel], data: dict[str, Any], source: str) -> BaseModel:
    """Validate ``data`` into ``cls``, turning pydantic's report into one readable ConfigError."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid config {source}: {validation_problems(exc)}") from None


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A config file's top-level mapping, or a ConfigError naming what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must contain a mapping of keys to values")
    return data


def load_yaml_config(cls: type[BaseModel], path: str | Path) -> BaseModel:
    return validate_config(cls, read_yaml_mapping(path), str(path))


def _number_if_numeric(value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; on a command line it means the number."""
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("inf", "nan", "-inf") else value
        except ValueError:
            return value
    return value


def apply_overrides(data: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """``data`` with each ``key.path=value`` of ``assignments`` set (a copy; ``value`` is read
    as YAML, so ``5``, ``1e-3``, ``[0, 1]`` and ``{steps: 60}`` keep their types; a number
    in the path indexes a list, e.g. ``localizations.3.train.steps=60``). The result is
    validated by the caller with the same schema as the file, so a wrong key or value is
    reported the same way."""
    import copy

    out = copy.deepcopy(data)
    for assignment in assignments:
        path, sep, raw = assignment.partition("=")
        keys = path.strip().split(".")
        if not sep or not all(keys):
            raise ConfigError(f"--set {assignment!r}: expected key.path=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {assignment!r}: the value is not valid YAML: {exc}") from None
        value = _number_if_numeric(value)
        node: Any = out
        for depth, key in enumerate(keys):
            last = depth == len(keys) - 1
            where = ".".join(keys[: depth + 1])
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ConfigError(
                        f"--set {assignment!r}: {where} is not an index of a {len(node)}-item list"
                    )
                key = int(key)  # type: ignore[assignment]
            elif not isinstance(node, dict):
                raise ConfigError(f"--set {assignment!r}: {where} is inside a single value")
            if last:
                node[key] = value
            else:
                if isinstance(node, dict) and node.get(key) is None:
                    node[key] = {}  # a block the file leaves out (or null) is started
                node = node[key]
    return out
