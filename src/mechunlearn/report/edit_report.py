"""The report of an editing or unlearning experiment (Mechanistic Unlearning comparison):
the headline table (the columns the battery's measurements register: edit success or forget
accuracy per prompt format, the robustness battery, retain accuracy and side effects),
hyper-parameters per localization, every metric, and the figures: bar charts per metric,
relearning curves, latent-probe accuracy by layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from mechunlearn.io import atomic_write_json, atomic_write_text  # noqa: E402
from mechunlearn.plotting import save_figure  # noqa: E402
from mechunlearn.report.claims import (  # noqa: E402
    REFERENCE,
    claim_rows,
    claims_markdown,
    format_baselines,
    relearn_strength_rows,
    relocalize_markdown,
    relocalize_rows,
    twin_rows,
    twins_markdown,
)
from mechunlearn.report.columns import Column, TableColumn, table_columns  # noqa: E402
from mechunlearn.report.results import (  # noqa: E402
    BASE,
    format_cell,
    markdown_table,
    mean_ratio,
)


def headline_columns(summary, columns: Sequence[Column]) -> list[TableColumn]:
    """The headline table's columns: the registered ``columns`` of an edit (when any edit
    success was measured) or of unlearning, as the metrics in ``summary`` expand them."""
    keys = {k for s in summary.values() for k in s}
    edit = any(k.endswith("edit_success") for k in keys)
    return table_columns(columns, "edit" if edit else "unlearn", keys)


def twins_of(folder: Path) -> dict[str, str]:
    """Twin -> the row it is compared with: the row it takes its learning rate from
    (``hyperparameters_from``) or whose forgetting it is matched to (``match_forgetting``), as
    the run's config.yaml says (none for runs without either)."""
    path = folder / "config.yaml"
    if not path.is_file():
        return {}
    rows = (yaml.safe_load(path.read_text()) or {}).get("localizations") or []
    twins = {r["name"]: r["hyperparameters_from"] for r in rows if r.get("hyperparameters_from")}
    for r in rows:
        if r.get("match_forgetting"):
            twins[r["name"]] = r["match_forgetting"]["row"]
    return twins


def matched_forgetting_lines(folder: Path) -> list[str]:
    """The calibrations of ``match_forgetting`` rows (``match/<row>.json``): each learning
    rate tried and the validation forgetting and retain accuracy it gave, against the target."""
    files = (
        sorted(p for p in (folder / "match").glob("*.json")) if (folder / "match").is_dir() else []
    )
    if not files:
        return []
    lines = [
        "",
        "## Matched forgetting (validation facts)",
        "",
        "Each matched row's learning rate was chosen so that it forgets as much of the "
        "validation facts (completion format, 1 - accuracy; edit success when editing) as the "
        "row it is matched to after that row's full training; the same steps, facts and "
        "forget coefficient.",
        "",
        "| row | matched to | target | tried: lr -> forgotten (retain acc.) | chosen lr | forgotten |",
        "|---|---|---|---|---|---|",
    ]
    for path in files:
        record = json.loads(path.read_text())
        tried = ", ".join(
            f"{t['lr']:.3g} -> {100 * t['forget_effect']:.0f}% ({100 * t['retain_accuracy']:.0f}%)"
            for t in record["tried"]
        )
        lines.append(
            f"| {record['name']} | {record['row']} (lr {record['reference']['lr']:.3g}) | "
            f"{100 * record['target']:.1f}% | {tried} | {record['chosen']['lr']:.3g} | "
            f"{100 * record['chosen_forget_effect']:.1f}% |"
        )
    return lines


def _markdown(folder: Path, summary, order: list[str], results, columns: Sequence[Column]) -> str:
    run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    seeds = sorted({r["seed"] for runs in results.values() for r in runs})
    lines = [
        f"# {run.get('name', folder.name)}",
        "",
        f"Model {run.get('model', '?')}; seeds {seeds}; percentages are mean ± std over seeds "
        "(std omitted with one seed). ↑/↓: higher/lower is the desired direction after an edit. "
        "`base` is the unedited model on the same facts.",
        "",
        markdown_table(summary, order, headline_columns(summary, columns)),
    ]
    sections = (
        claims_markdown(results, order),
        twins_markdown(results, twins_of(folder)),
        relocalize_markdown(results, order),
    )
    for section in sections:
        if section:
            lines += ["", section]
    lines += [
        "",
        "## Hyper-parameters and trainable parameters",
        "",
        "| localization | lr | forget coef | trainable parameters | components |",
        "|---|---|---|---|---|",
    ]
    for name in order:
        if name == BASE:
            continue
        first = results[name][0]
        hp = first.get("hyperparameters", {})
        lines.append(
            f"| {name} | {hp.get('lr', '-')} | {hp.get('forget_coef', '-')} | "
            f"{first.get('n_params', 0):,} | {', '.join(first.get('components', []))[:120]} |"
        )
    lines += matched_forgetting_lines(folder)
    lines += _lat_compute_lines(summary, order, results)
    all_keys = sorted({k for s in summary.values() for k in s})
    lines += [
        "",
        "## Every metric",
        "",
        markdown_table(summary, order, [(k, k, None) for k in all_keys]),
    ]
    notes = sorted({n for runs in results.values() for r in runs for n in r.get("notes", [])})
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if run.get("seconds") is not None:
        lines += [
            "",
            f"Wall time: {run['seconds'] / 60:.1f} min ({run.get('device', '?')}, {run.get('threads', '?')} threads).",
        ]
    return "\n".join(lines).strip() + "\n"


def lat_baselines(order: list[str], results) -> dict[str, str]:
    """Each row trained with a latent adversary -> the row with the same localization method
    and objective trained without one (its compute baseline)."""

    def key(name: str) -> tuple[Any, Any]:
        first = results[name][0]
        return first.get("method"), first.get("objective")

    plain = {key(n): n for n in order if n != BASE and not results[n][0].get("latent_adversary")}
    return {
        n: plain[key(n)]
        for n in order
        if n != BASE and results[n][0].get("latent_adversary") and key(n) in plain
    }


def _lat_compute_lines(summary, order: list[str], results) -> list[str]:
    """Training time of every LAT row against its baseline row (Sheshadri et al. 2024 report
    LAT's cost as a multiple of the same training without the adversary)."""
    pairs = lat_baselines(order, results)
    if not pairs:
        return []
    lines = [
        "",
        "## Training compute of the LAT rows",
        "",
        "Seconds of the edit's training loop (mean ± std over seeds); the ratio divides the means."
        " The adversary's objective (nats, mean over training steps) before its first and after"
        " its last step, and the share of training steps on which it lowered it: an adversary"
        " that raises its own objective is not attacking, and its row is not LAT.",
        "",
        "| row | baseline | train seconds | baseline train seconds | time / baseline "
        "| adversary loss before | adversary loss after | steps it lowered its loss |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, base in pairs.items():
        stats = summary[name]
        lat, plain = stats.get("train_seconds"), summary[base].get("train_seconds")
        if lat is None or plain is None:
            continue
        adversary = [
            format_cell(stats.get(f"adversary.{k}"), f"adversary.{k}")
            for k in ("loss_first_mean", "loss_last_mean", "improved_share")
        ]
        lines.append(
            f"| {name} | {base} | {format_cell(lat, 'train_seconds')} | "
            f"{format_cell(plain, 'train_seconds')} | "
            f"{mean_ratio(summary, name, base, 'train_seconds')} | {' | '.join(adversary)} |"
        )
    return lines


def metric_bars(
    summary, order: list[str], path: Path, columns: Sequence[TableColumn]
) -> Path | None:
    """One panel per headline metric (``columns``): a bar per row with its std over seeds."""
    columns = [c for c in columns if any(c[0] in summary[n] for n in order)]
    if not columns:
        return None
    ncols = 4
    nrows = math.ceil(len(columns) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    colors = plt.cm.tab10(np.arange(len(order)) % 10)
    for ax, (key, title, low) in zip(axes.flat, columns, strict=False):
        means = [summary[n].get(key, {}).get("mean", np.nan) for n in order]
        stds = [summary[n].get(key, {}).get("std", np.nan) for n in order]
        ax.bar(range(len(order)), means, yerr=np.nan_to_num(stds), color=colors, capsize=3)
        ax.set_title(f"{title} {'↓' if low else '↑'}", fontsize=9)
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels(order, rotation=60, ha="right", fontsize=7)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(columns) :]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path)


def _curve_key(points: list[dict[str, Any]]) -> str | None:
    keys = [k for k in points[0] if k != "step" and isinstance(points[0][k], int | float)]
    preferred = [k for k in keys if "completion" in k and "accuracy" in k]
    return (preferred or [k for k in keys if "accuracy" in k] or keys or [None])[0]


def relearn_curves(results, order: list[str], path: Path) -> Path | None:
    """Held-out forget accuracy during each relearning attack (one panel per attack: the
    config's and every ``relearn@<name>`` variant), mean over seeds per localization."""
    parts = sorted(
        {p for runs in results.values() for r in runs for p in r.get("curves", {})
         if p == "relearn" or p.startswith("relearn@")}
    )  # fmt: skip
    if not parts:
        return None
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4), squeeze=False)
    drawn = 0
    for ax, part in zip(axes.flat, parts, strict=True):
        label = ""
        for name in order:
            curves = [
                r["curves"][part]["curve"] for r in results[name] if part in r.get("curves", {})
            ]
            if not curves or not curves[0]:
                continue
            key = _curve_key(curves[0])
            if key is None:
                continue
            steps = [p["step"] for p in curves[0]]
            values = np.array(
                [
                    [p.get(key, np.nan) for p in c[: len(steps)]]
                    for c in curves
                    if len(c) >= len(steps)
                ]
            )
            ax.plot(steps, np.nanmean(values, 0), marker="o", label=name)
            drawn, label = drawn + 1, key
        ax.set_title(part, fontsize=9)
        ax.set_xlabel("relearning step (LoRA, true answers, train half)")
        ax.set_ylabel(f"held-out forget facts: {label}")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if not drawn:
        plt.close(fig)
        return None
    fig.tight_layout()
    return save_figure(fig, path)


def probe_curves(results, order: list[str], path: Path) -> Path | None:
    """Latent-probe accuracy for the original answer on forget facts, by layer."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = 0
    chance = None
    for name in order:
        probes = [r["curves"]["probes"] for r in results[name] if "probes" in r.get("curves", {})]
        if not probes:
            continue
        values = np.array([p["forget_accuracy"] for p in probes], dtype=float)
        ax.plot(
            range(values.shape[1]),
            np.nanmean(values, 0),
            marker=".",
            label=name,
            linestyle="--" if name == BASE else "-",
        )
        labels = probes[0].get("layers", [])
        chance = probes[0].get("chance", chance)
        drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    if labels:
        step = max(1, len(labels) // 10)
        ax.set_xticks(range(0, len(labels), step))
        ax.set_xticklabels(labels[::step])
    if chance is not None:
        ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="chance")
    ax.set_xlabel("residual stream after layer")
    ax.set_ylabel("probe accuracy (original answer) on forget facts")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_edit_report(
    folder: Path, summary, order: list[str], results, columns: Sequence[Column]
) -> None:
    """results.md and figures/ of an editing or unlearning run (``columns``: the registered
    measurements' report columns)."""
    atomic_write_text(folder / "results.md", _markdown(folder, summary, order, results, columns))
    if any(r.get("per_fact") for runs in results.values() for r in runs):
        claims: dict[str, Any] = {
            "format_baselines": format_baselines(results),
            "claims": (
                claim_rows(results) + claim_rows(results, both_edited=True)
                if REFERENCE in results
                else []
            ),
            "relearn_strength": relearn_strength_rows(results, order),
            "relocalize": relocalize_rows(results, order),
        }
        twins = twin_rows(results, twins_of(folder))
        if twins:  # only runs with twins (earlier runs' claims.json stay as they were)
            claims["twins"] = twins
        atomic_write_json(folder / "claims.json", claims)
    figures = folder / "figures"
    metric_bars(summary, order, figures / "metrics.png", headline_columns(summary, columns))
    relearn_curves(results, order, figures / "relearning.png")
    probe_curves(results, order, figures / "probes.png")
