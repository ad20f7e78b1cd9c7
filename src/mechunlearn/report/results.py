"""Aggregating an experiment's saved per-(localization or method, seed) results: loading
them, the metrics derived across runs (LM-loss change against the same seed's base model, the
relearning attack's best point, training seconds), mean ± std over seeds, and the markdown
tables both report kinds (editing, targeted LAT) are rendered with.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import yaml

from mechunlearn.errors import DataError

BASE = "base"


def load_results(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """``localization -> [result per seed]`` (seed order), base model first."""
    root = folder / "results"
    if not root.is_dir():
        raise DataError(f"{folder} has no results/ folder: not an experiment run")
    results: dict[str, list[dict[str, Any]]] = {}
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    for name in [BASE] + [n for n in names if n != BASE]:
        files = sorted((root / name).glob("seed*.json"), key=lambda p: int(p.stem[4:]))
        if files:
            results[name] = [json.loads(p.read_text()) for p in files]
    if not results:
        raise DataError(f"{root} holds no result files")
    _add_deltas(results)
    return results


def result_order(folder: Path, results: dict[str, Any]) -> list[str]:
    """Base first, then the config's localization (or method) order."""
    order = [BASE] if BASE in results else []
    config = folder / "config.yaml"
    if config.is_file():
        saved = yaml.safe_load(config.read_text()) or {}
        specs = saved.get("localizations") or saved.get("methods") or []
        order += [
            spec["name"] for spec in specs if spec["name"] in results and spec["name"] not in order
        ]
    return order + [n for n in results if n not in order]


def _add_deltas(results: dict[str, list[dict[str, Any]]]) -> None:
    """Derived metrics: LM-loss change relative to the base model of the same seed, the
    relearning attack's best point, the edit's training seconds and its latent adversary's
    record (``adversary.*``, see ``edit.latent_adversary.adversary_progress``)."""
    base = {r["seed"]: r["metrics"] for r in results.get(BASE, [])}
    for runs in results.values():
        for run in runs:
            ref = base.get(run["seed"], {})
            if "lm_loss" in run["metrics"] and "lm_loss" in ref:
                run["metrics"]["lm_loss_delta"] = run["metrics"]["lm_loss"] - ref["lm_loss"]
            run["metrics"].update(relearn_peaks(run))
            seconds = run.get("train", {}).get("seconds")
            if seconds is not None:  # the edit's training compute (e.g. LAT vs its baseline)
                run["metrics"]["train_seconds"] = float(seconds)
            adversary = run.get("train", {}).get("adversary") or {}
            for key, value in adversary.items():  # did the training adversary attack at all?
                run["metrics"][f"adversary.{key}"] = float(value)


def relearn_peaks(run: dict[str, Any]) -> dict[str, float]:
    """The attacker's best point of the relearning curve (``relearn_peak.<format>.<metric>``):
    held-out accuracy can rise and fall again during relearning, so the final value alone
    understates what the attack recovers."""
    curve = run.get("curves", {}).get("relearn", {}).get("curve") or []
    keys = {k for point in curve for k in point if k != "step"}
    return {f"relearn_peak.{k}": max(p[k] for p in curve if k in p) for k in sorted(keys)}


def summarise(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, float]]]:
    """``localization -> metric -> {mean, std, n}`` over seeds."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name, runs in results.items():
        keys = sorted({k for run in runs for k in run["metrics"]})
        summary[name] = {}
        for key in keys:
            values = [run["metrics"][key] for run in runs if key in run["metrics"]]
            std = statistics.stdev(values) if len(values) > 1 else math.nan
            summary[name][key] = {"mean": statistics.fmean(values), "std": std, "n": len(values)}
    return summary


def format_cell(stat: dict[str, float] | None, key: str) -> str:
    """Rates and probabilities in percent; losses and log-probability margins (nats), seconds
    and counts (passes, records) as they are."""
    if stat is None:
        return "-"
    if "passes" in key or key.endswith("n_records"):
        scale, digits = 1, 0
    elif "seconds" in key:
        scale, digits = 1, 1
    elif "loss" in key or "margin" in key:
        scale, digits = 1, 3
    else:
        scale, digits = 100, 1
    return format_stat(stat, scale, digits)


def mean_ratio(summary, name: str, base: str | None, key: str) -> str:
    """``name``'s mean of ``key`` over ``base``'s, two decimals ("-" when either is missing or
    the base is 0): how LAT's cost is compared with its baseline's."""
    if base is None or key not in summary.get(name, {}) or key not in summary.get(base, {}):
        return "-"
    denominator = summary[base][key]["mean"]
    return f"{summary[name][key]['mean'] / denominator:.2f}" if denominator else "-"


def format_stat(stat: dict[str, float], scale: float, digits: int) -> str:
    """``mean ± std`` scaled; the std is left out when there was one seed (NaN)."""
    text = f"{scale * stat['mean']:.{digits}f}"
    if not math.isnan(stat["std"]):
        text += f" ± {scale * stat['std']:.{digits}f}"
    return text


def markdown_table(
    summary,
    order: list[str],
    columns: list[tuple[str, str, bool | None]],
    label: str = "localization",
    cell=format_cell,
) -> str:
    """``columns``: (metric key, title, lower is better); ``None``: no desired direction
    (raw metrics such as P(new) or the LM loss itself), so no arrow."""
    present = [c for c in columns if any(c[0] in summary[n] for n in order)]
    if not present:
        return ""
    arrow = {True: " ↓", False: " ↑", None: ""}
    head = f"| {label} | " + " | ".join(f"{title}{arrow[low]}" for _, title, low in present) + " |"
    rule = "|---|" + "---|" * len(present)
    rows = [
        "| "
        + name
        + " | "
        + " | ".join(cell(summary[name].get(key), key) for key, _, _ in present)
        + " |"
        for name in order
    ]
    return "\n".join([head, rule, *rows])


def run_kind(folder: Path) -> str:
    """``lat`` or ``edit``: from ``run.json`` (finished runs) or ``config.yaml`` (partial)."""
    for name, load in (("run.json", json.loads), ("config.yaml", yaml.safe_load)):
        path = folder / name
        if path.is_file():
            data = load(path.read_text()) or {}
            if isinstance(data, dict) and data.get("kind"):
                return str(data["kind"])
    return "edit"
