"""Localization methods' own options in a config: ``method_options: {method: {option: value}}``.

Each method's block is validated by the schema the method registered (``LOCALIZERS``), so an
option a method does not have is an error naming the method. Configs written before methods had
their own schemas kept every knob in one ``options`` bag (``noise_scale``, ``window``,
``trace_cells``, ``probe_split`` beside ``budget``); ``move_legacy_options`` moves such keys to
the methods that define them, so those files (e.g. committed runs' ``config.yaml``) still load
and mean the same.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator

from mechunlearn.localize import LOCALIZERS, LocalizeOptions


def _check(value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    for method, options in value.items():
        LOCALIZERS.get(method).parse_options(options)  # ConfigError naming the method
    return value


MethodOptionsMap = Annotated[dict[str, dict[str, Any]], AfterValidator(_check)]


def move_legacy_options(data: Any, options_key: str) -> Any:
    """``data[options_key]``'s keys that ``LocalizeOptions`` lacks, moved into
    ``data["method_options"]`` of every method whose schema has them (explicit values win).
    A key no method has stays, to be refused by the strict schema."""
    if not isinstance(data, dict) or not isinstance(data.get(options_key), dict):
        return data
    common = set(LocalizeOptions.model_fields)
    options = dict(data[options_key])
    method_options = {k: dict(v) for k, v in (data.get("method_options") or {}).items()}
    for key in [k for k in options if k not in common]:
        owners = [m for m in LOCALIZERS.names() if key in LOCALIZERS.get(m).options.model_fields]
        if not owners:
            continue
        value = options.pop(key)
        for method in owners:
            method_options.setdefault(method, {}).setdefault(key, value)
    return {**data, options_key: options, "method_options": method_options}


__all__ = ["MethodOptionsMap", "move_legacy_options"]
