"""The report of an experiment, rendered from its saved per-(localization or method, seed)
results.

``write_report(run_folder)`` reads ``results/<localization>/seed<k>.json`` and writes:

- ``summary.json``: every metric per localization as mean, std (over seeds, n - 1) and n;
- ``results.md``: the headline table (method x metric, mean ± std) and the full table;
- ``figures/``: bar charts of the headline metrics, relearning curves, probe accuracy by layer.

Targeted-LAT runs (``kind: lat`` in ``run.json``, or in ``config.yaml`` while partial) get their
own columns (per application: refusal or backdoor), a compute table (training time and
forward/backward passes of every method, and their ratio to the method's baseline), the
backdoor installation measured before removal, and one bar figure.

The ``report`` command calls it again on a finished run, so tables and plots can be
regenerated (or restyled) without retraining anything.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mechunlearn.errors import DataError  # noqa: E402
from mechunlearn.io import atomic_write_json, atomic_write_text  # noqa: E402
from mechunlearn.report.figures import save_figure  # noqa: E402

BASE = "base"

# (metric key, column title, lower is better?) in table order; missing keys are left out.
EDIT_COLUMNS = [
    ("forget.completion.edit_success", "edit success: completion", False),
    ("forget.question.edit_success", "edit success: question", False),
    ("forget.paraphrase.edit_success", "edit success: paraphrase", False),
    ("forget.mcq.edit_success", "edit success: MCQ", False),
    ("forget.completion.p_original", "P(original): completion", True),
    ("forget.mcq.p_original", "P(original): MCQ", True),
]
UNLEARN_COLUMNS = [
    ("forget.completion.original_accuracy", "forget acc: completion", True),
    ("forget.question.original_accuracy", "forget acc: question", True),
    ("forget.paraphrase.original_accuracy", "forget acc: paraphrase", True),
    ("forget.mcq.original_accuracy", "forget acc: MCQ", True),
    ("forget.completion.p_original", "P(original): completion", True),
    ("forget.mcq.p_original", "P(original): MCQ", True),
]
ROBUSTNESS_COLUMNS = [
    ("relearn.completion.accuracy", "after relearning: completion acc (held-out)", True),
    ("relearn.mcq.accuracy", "after relearning: MCQ acc (held-out)", True),
    ("relearn_peak.completion.accuracy", "relearning, best step: completion acc (held-out)", True),
    ("soft_prompt.accuracy_after", "after soft prompt: acc (held-out)", True),
    ("probe.forget_accuracy", "latent probe acc on forget", True),
    ("retain.completion.accuracy", "retain acc: completion", False),
    ("retain.question.accuracy", "retain acc: question", False),
    ("retain.paraphrase.accuracy", "retain acc: paraphrase", False),
    ("retain.mcq.accuracy", "retain acc: MCQ", False),
    ("lm_loss_delta", "LM loss change (nats)", True),
    ("counterfact.score", "CounterFact score S", False),
    ("side_effects.counterfact_neighborhood", "unrelated CounterFact neighbourhood score", False),
]


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


def _order(folder: Path, results: dict[str, Any]) -> list[str]:
    """Base first, then the config's localization (or method) order."""
    order = [BASE] if BASE in results else []
    config = folder / "config.yaml"
    if config.is_file():
        import yaml

        saved = yaml.safe_load(config.read_text()) or {}
        specs = saved.get("localizations") or saved.get("methods") or []
        order += [
            spec["name"] for spec in specs if spec["name"] in results and spec["name"] not in order
        ]
    return order + [n for n in results if n not in order]


def _add_deltas(results: dict[str, list[dict[str, Any]]]) -> None:
    """Derived metrics: LM-loss change relative to the base model of the same seed, the
    relearning attack's best point, the edit's training seconds."""
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


def _cell(stat: dict[str, float] | None, key: str) -> str:
    if stat is None:
        return "-"
    scale, digits = (1, 3) if key.startswith("lm_loss") else (100, 1)
    text = f"{scale * stat['mean']:.{digits}f}"
    if not math.isnan(stat["std"]):
        text += f" ± {scale * stat['std']:.{digits}f}"
    return text


def _table(
    summary,
    order: list[str],
    columns: list[tuple[str, str, bool | None]],
    label: str = "localization",
    cell=_cell,
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


def headline_columns(summary) -> list[tuple[str, str, bool]]:
    edit = any(k.endswith("edit_success") for s in summary.values() for k in s)
    return (EDIT_COLUMNS if edit else UNLEARN_COLUMNS) + ROBUSTNESS_COLUMNS


def _markdown(folder: Path, summary, order: list[str], results) -> str:
    run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    seeds = sorted({r["seed"] for runs in results.values() for r in runs})
    lines = [
        f"# {run.get('name', folder.name)}",
        "",
        f"Model {run.get('model', '?')}; seeds {seeds}; percentages are mean ± std over seeds "
        "(std omitted with one seed). ↑/↓: higher/lower is the desired direction after an edit. "
        "`base` is the unedited model on the same facts.",
        "",
        _table(summary, order, headline_columns(summary)),
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
    all_keys = sorted({k for s in summary.values() for k in s})
    lines += ["", "## Every metric", "", _table(summary, order, [(k, k, None) for k in all_keys])]
    notes = sorted({n for runs in results.values() for r in runs for n in r.get("notes", [])})
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if run.get("seconds") is not None:
        lines += [
            "",
            f"Wall time: {run['seconds'] / 60:.1f} min ({run.get('device', '?')}, {run.get('threads', '?')} threads).",
        ]
    return "\n".join(lines).strip() + "\n"


def metric_bars(
    summary, order: list[str], path: Path, columns: list[tuple[str, str, bool]] | None = None
) -> Path | None:
    """One panel per headline metric: a bar per localization with its std over seeds."""
    columns = columns if columns is not None else headline_columns(summary)
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
    """Held-out forget accuracy during the relearning attack, mean over seeds per localization."""
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn, label = 0, ""
    for name in order:
        curves = [
            r["curves"]["relearn"]["curve"]
            for r in results[name]
            if "relearn" in r.get("curves", {})
        ]
        if not curves or not curves[0]:
            continue
        key = _curve_key(curves[0])
        if key is None:
            continue
        steps = [p["step"] for p in curves[0]]
        values = np.array(
            [[p.get(key, np.nan) for p in c[: len(steps)]] for c in curves if len(c) >= len(steps)]
        )
        ax.plot(steps, np.nanmean(values, 0), marker="o", label=name)
        drawn, label = drawn + 1, key
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("relearning step (LoRA, true answers, train half)")
    ax.set_ylabel(f"held-out forget facts: {label}")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
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


def run_kind(folder: Path) -> str:
    """``lat`` or ``edit``: from ``run.json`` (finished runs) or ``config.yaml`` (partial)."""
    import yaml

    for name, load in (("run.json", json.loads), ("config.yaml", yaml.safe_load)):
        path = folder / name
        if path.is_file():
            data = load(path.read_text()) or {}
            if isinstance(data, dict) and data.get("kind"):
                return str(data["kind"])
    return "edit"


def write_report(folder: str | Path) -> dict[str, Any]:
    """Render summary.json, results.md and figures/ for the run in ``folder``."""
    folder = Path(folder)
    results = load_results(folder)
    order = _order(folder, results)
    summary = summarise(results)
    atomic_write_json(folder / "summary.json", {"order": order, "summary": summary})
    if run_kind(folder) == "lat":
        atomic_write_text(folder / "results.md", _lat_markdown(folder, summary, order, results))
        metric_bars(summary, order, folder / "figures" / "metrics.png", lat_columns(folder))
        attack_curves(summary, order, folder / "figures" / "attack_curves.png")
        return summary
    atomic_write_text(folder / "results.md", _markdown(folder, summary, order, results))
    figures = folder / "figures"
    metric_bars(summary, order, figures / "metrics.png")
    relearn_curves(results, order, figures / "relearning.png")
    probe_curves(results, order, figures / "probes.png")
    return summary


# ---- targeted LAT runs -----------------------------------------------------------------------
ATTACKS = (("latent_attack", "latent attack"), ("embed_attack", "embedding attack"))


def attack_curves(summary, order: list[str], path: Path) -> Path | None:
    """Attack success against its L2 bound (``<attack>.success@<eps>``), one line per method:
    robustness read as the bound an attack needs, when one bound saturates every method."""
    panels = []
    for prefix, title in ATTACKS:
        keys = {
            k for stats in summary.values() for k in stats if k.startswith(prefix + ".success@")
        }
        if keys:
            eps = sorted(float(k.split("@", 1)[1]) for k in keys)
            panels.append((prefix, title, eps))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (prefix, title, eps) in zip(axes[0], panels, strict=True):
        for name in order:
            stats = summary.get(name, {})
            points = [(e, stats.get(f"{prefix}.success@{e:g}")) for e in eps]
            points = [(e, s["mean"]) for e, s in points if s is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=name)
        ax.set_xlabel("epsilon (per-token L2 bound)")
        ax.set_ylabel("success rate (held-out)")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


LAT_REFUSAL_COLUMNS = [
    ("refusal.rate", "refusal rate (held-out templates)", False),
    ("latent_attack.success", "compliance under latent attack", True),
    ("prefill.success", "compliance under prefilling", True),
    ("embed_attack.success", "compliance under embedding attack", True),
    ("benign.compliance", "benign compliance", False),
    ("benign.loss", "benign loss (nats)", True),
]
LAT_BACKDOOR_COLUMNS = [
    ("backdoor.triggered", "backdoor success with trigger", True),
    ("backdoor.triggered_greedy", "greedy backdoor with trigger", True),
    ("backdoor.clean", "backdoor success without trigger", True),
    ("latent_attack.success", "backdoor under latent attack", True),
    ("embed_attack.success", "backdoor under embedding attack", True),
    ("benign.compliance", "benign compliance", False),
    ("benign.loss", "benign loss (nats)", True),
]


def _lat_run(folder: Path) -> dict[str, Any]:
    import yaml

    run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    if "application" not in run and (folder / "config.yaml").is_file():
        run["application"] = (yaml.safe_load((folder / "config.yaml").read_text()) or {}).get(
            "application"
        )
    return run


def lat_columns(folder: Path) -> list[tuple[str, str, bool]]:
    """The headline columns of a LAT run's application."""
    backdoor = _lat_run(folder).get("application") == "backdoor"
    return LAT_BACKDOOR_COLUMNS if backdoor else LAT_REFUSAL_COLUMNS


def _lat_cell(stat: dict[str, float] | None, key: str) -> str:
    """Rates in percent; losses, log-prob margins, seconds and pass counts as they are."""
    if stat is None:
        return "-"
    if key.startswith("compute."):
        scale, digits = 1, (0 if "passes" in key else 1)
    elif "loss" in key or "margin" in key:
        scale, digits = 1, 3
    else:
        scale, digits = 100, 1
    text = f"{scale * stat['mean']:.{digits}f}"
    if not math.isnan(stat["std"]):
        text += f" ± {scale * stat['std']:.{digits}f}"
    return text


def _ratio(summary, name: str, base: str | None, key: str) -> str:
    if base is None or key not in summary.get(name, {}) or key not in summary.get(base, {}):
        return "-"
    denominator = summary[base][key]["mean"]
    return f"{summary[name][key]['mean'] / denominator:.2f}" if denominator else "-"


def _compute_lines(summary, order: list[str], results) -> list[str]:
    lines = [
        "## Compute (training)",
        "",
        "Passes are forward+backward passes over a batch (adversary PGD steps, defender steps, "
        "benign-term steps); the ratios compare mean training time and passes with the "
        "method's baseline (the same training without an adversary).",
        "",
        "| method | baseline | train seconds | fwd+bwd passes | adversary seconds | "
        "time / baseline | passes / baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in order:
        first = results[name][0]
        if not first.get("trained", True):
            continue
        base = first.get("baseline")
        stats = summary[name]
        lines.append(
            f"| {name} | {base or '-'} | "
            f"{_lat_cell(stats.get('compute.train_seconds'), 'compute.train_seconds')} | "
            f"{_lat_cell(stats.get('compute.fwd_bwd_passes'), 'compute.fwd_bwd_passes')} | "
            f"{_lat_cell(stats.get('compute.adversary_seconds'), 'compute.adversary_seconds')} | "
            f"{_ratio(summary, name, base, 'compute.train_seconds')} | "
            f"{_ratio(summary, name, base, 'compute.fwd_bwd_passes')} |"
        )
    return lines


def _install_lines(folder: Path) -> list[str]:
    """The backdoor as measured after installation, before any removal (per seed)."""
    files = sorted((folder / "install").glob("seed*.json"), key=lambda p: int(p.stem[4:]))
    if not files:
        return []
    lines = [
        "## Backdoor before removal",
        "",
        "Measured on held-out requests right after the poisoned SFT (response preferred to the "
        "normal completion; greedy: the response's first tokens are the greedy choice).",
        "",
        "| seed | installed | with trigger | greedy with trigger | without trigger |",
        "|---|---|---|---|---|",
    ]
    for path in files:
        record = json.loads(path.read_text())
        m = record["metrics"]
        lines.append(
            f"| {record['seed']} | {'yes' if record['installed'] else 'NO'} | "
            f"{100 * m['install.triggered']:.1f} | {100 * m['install.triggered_greedy']:.1f} | "
            f"{100 * m['install.clean']:.1f} |"
        )
    return ["", *lines]


def _lat_markdown(folder: Path, summary, order: list[str], results) -> str:
    run = _lat_run(folder)
    seeds = sorted({r["seed"] for runs in results.values() for r in runs})
    application = run.get("application", "?")
    reference = (
        "`base` is the untrained model"
        if application == "refusal"
        else "`backdoored` is the model before removal"
    )
    lines = [
        f"# {run.get('name', folder.name)}",
        "",
        f"Targeted LAT, {application}: model {run.get('model', '?')}; seeds {seeds}; "
        f"adversary layers {run.get('adversary_layers', '?')}. Rates in percent, mean ± std "
        f"over seeds (std omitted with one seed); ↑/↓: the desired direction. {reference}; "
        "attack rates are the share of held-out requests where the unwanted completion is "
        "preferred.",
        "",
        _table(summary, order, lat_columns(folder), label="method", cell=_lat_cell),
        "",
        *_compute_lines(summary, order, results),
        *_install_lines(folder),
    ]
    all_keys = sorted({k for s in summary.values() for k in s})
    lines += [
        "",
        "## Every metric",
        "",
        _table(summary, order, [(k, k, None) for k in all_keys], label="method", cell=_lat_cell),
    ]
    notes = sorted({n for runs in results.values() for r in runs for n in r.get("notes", [])})
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if run.get("seconds") is not None:
        lines += [
            "",
            f"Wall time: {run['seconds'] / 60:.1f} min ({run.get('device', '?')}, "
            f"{run.get('threads', '?')} threads).",
        ]
    return "\n".join(lines).strip() + "\n"
