"""The CounterFact task (Meng et al. 2022), read from the standard ROME JSON schema.

Each record asks for a true target and defines a counterfactual ``target_new`` to edit towards;
its paraphrase and neighborhood prompts test generalisation and specificity of an edit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from mechunlearn.errors import DataError
from mechunlearn.tasks.records import FactRecord


def load_counterfact(path: str | Path) -> list[FactRecord]:
    """Load every CounterFact record in ``path``; malformed data raises ``DataError``."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(
            f"{path}: top level must be a JSON list of records, got {type(data).__name__}"
        )
    if not data:
        raise DataError(f"{path}: contains no records")
    records = [_record(path, index, raw) for index, raw in enumerate(data)]
    _check_unique(path, records)
    return records


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"{path}: CounterFact data file not found")
    try:
        with path.open(encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None


def _where(path: Path, index: int, raw: Any) -> str:
    case = raw.get("case_id") if isinstance(raw, dict) else None
    return f"{path}, record {index}" + (f" (case_id {case})" if case is not None else "")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {"str": "a string", "dict": "an object", "int": "an integer"}
    return " or ".join(names.get(k.__name__, k.__name__) for k in kinds)


def _field(raw: Any, key: str, kind: type | tuple[type, ...], where: str, parent: str = "") -> Any:
    """``raw[key]`` checked for presence and type, with an error naming the full key."""
    name = f"{parent}.{key}" if parent else key
    if not isinstance(raw, dict):
        raise DataError(f"{where}: {parent or 'record'} must be an object")
    if key not in raw:
        raise DataError(f"{where}: missing key {name!r}")
    value = raw[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: {name!r} must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _prompts(raw: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    """Optional prompt lists: absent means none, present must be a list of strings."""
    value = raw.get(key, [])
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise DataError(f"{where}: {key!r} must be a list of strings")
    return tuple(value)


def _target(rewrite: dict[str, Any], key: str, where: str) -> str:
    target = _field(rewrite, key, dict, where, "requested_rewrite")
    text = _field(target, "str", str, where, f"requested_rewrite.{key}").strip()
    if not text:
        raise DataError(f"{where}: 'requested_rewrite.{key}.str' is blank")
    return text


def _template(rewrite: dict[str, Any], where: str) -> str:
    prompt = _field(rewrite, "prompt", str, where, "requested_rewrite")
    if prompt.count("{}") != 1:
        raise DataError(
            f"{where}: 'requested_rewrite.prompt' {prompt!r} must contain exactly one '{{}}' "
            "where the subject goes"
        )
    return prompt.replace("{}", "{subject}").rstrip()


def _record(path: Path, index: int, raw: Any) -> FactRecord:
    where = _where(path, index, raw)
    if not isinstance(raw, dict):
        raise DataError(f"{where}: record must be an object, got {type(raw).__name__}")
    case_id = _field(raw, "case_id", (int, str), where)
    rewrite = _field(raw, "requested_rewrite", dict, where)
    subject = _field(rewrite, "subject", str, where, "requested_rewrite")
    true, new = _target(rewrite, "target_true", where), _target(rewrite, "target_new", where)
    if true == new:
        raise DataError(f"{where}: target_true and target_new are both {true!r}")
    relation = rewrite.get("relation_id", "")
    try:
        return FactRecord(
            id=f"counterfact:{case_id}",
            subject=subject,
            template=_template(rewrite, where),
            answer=true,
            options=(true, new),
            new_answer=new,
            relation=str(relation),
            paraphrases=_prompts(raw, "paraphrase_prompts", where),
            neighborhood=_prompts(raw, "neighborhood_prompts", where),
        )
    except ValidationError as exc:
        raise DataError(f"{where}: invalid record ({_reasons(exc)})") from None


def _check_unique(path: Path, records: list[FactRecord]) -> None:
    seen: set[str] = set()
    for index, record in enumerate(records):
        if record.id in seen:
            raise DataError(f"{path}, record {index}: duplicate id {record.id}")
        seen.add(record.id)


def _reasons(exc: ValidationError) -> str:
    """Pydantic's reasons on one line, so the CLI can print a single clear message."""
    return "; ".join(
        f"{'.'.join(map(str, e['loc'])) or 'record'}: {e['msg']}" for e in exc.errors()
    )
