"""The report of a targeted-LAT experiment (Sheshadri et al. 2024): per application (refusal
or backdoor) its headline columns (registered by the LAT measurements), each method minus its
non-LAT twin with paired 95% intervals (``lat_twins``), how well benign compliance was matched
(``lat_calibration``), a compute table (training time and forward/backward passes of every
method and their ratio to the method's baseline), the backdoor as measured before removal,
attack success against the L2 bound, and a bar figure per headline metric.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from mechunlearn.edit.latent_adversary import adversary_progress  # noqa: E402
from mechunlearn.io import atomic_write_text  # noqa: E402
from mechunlearn.plotting import save_figure  # noqa: E402
from mechunlearn.report.columns import (  # noqa: E402
    EVAL_SECONDS,
    Column,
    TableColumn,
    table_columns,
)
from mechunlearn.report.edit_report import metric_bars  # noqa: E402
from mechunlearn.report.lat_calibration import (  # noqa: E402
    calibration_figure,
    calibration_markdown,
    calibrations,
)
from mechunlearn.report.lat_twins import lat_twin_rows, lat_twins_markdown  # noqa: E402
from mechunlearn.report.results import format_cell, markdown_table, mean_ratio  # noqa: E402

ATTACKS = (("latent_attack", "latent attack"), ("embed_attack", "embedding attack"))


def _curve_epsilons(summary, prefix: str) -> list[float]:
    """The extra bounds an attack was run at (``<attack>.success@<eps>`` keys), ascending."""
    keys = {k for stats in summary.values() for k in stats if k.startswith(prefix + ".success@")}
    return sorted(float(k.split("@", 1)[1]) for k in keys)


def headline_epsilons(config: dict[str, Any]) -> dict[str, float]:
    """The headline bound of each attack in a run's config (``evaluation.<attack>.epsilon``)."""
    evaluation = config.get("evaluation") or {}
    found = {}
    for prefix, section in (
        ("latent_attack", "latent_attack"),
        ("embed_attack", "embedding_attack"),
    ):
        spec = evaluation.get(section) or {}
        if spec.get("epsilon") is not None:
            found[prefix] = float(spec["epsilon"])
    return found


def attack_curves(
    summary, order: list[str], path: Path, headline: dict[str, float] | None = None
) -> Path | None:
    """Attack success against its L2 bound, one line per method: ``<attack>.success@<eps>``,
    the headline ``<attack>.success`` at its bound when given, and ``success_before`` at 0.
    Robustness is read as the bound an attack needs, when one bound saturates every method."""
    headline = headline or {}
    panels = []
    for prefix, title in ATTACKS:
        eps = _curve_epsilons(summary, prefix)
        measured = any(f"{prefix}.success" in stats for stats in summary.values())
        if eps or (measured and prefix in headline):
            panels.append((prefix, title, eps))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (prefix, title, eps) in zip(axes[0], panels, strict=True):
        for name in order:
            stats = summary.get(name, {})
            points = [(e, stats.get(f"{prefix}.success@{e:g}")) for e in eps]
            if prefix in headline and headline[prefix] not in eps:
                points.append((headline[prefix], stats.get(f"{prefix}.success")))
            if 0 not in eps:  # bound 0: the model without perturbation
                points.append((0.0, stats.get(f"{prefix}.success_before")))
            points = sorted((e, s["mean"]) for e, s in points if s is not None)
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=name)
        ax.set_xlabel("epsilon (per-token L2 bound)")
        ax.set_ylabel("success rate (held-out)")
        ax.set_title(title)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def _lat_run(folder: Path) -> dict[str, Any]:
    run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    if "application" not in run and (folder / "config.yaml").is_file():
        run["application"] = (yaml.safe_load((folder / "config.yaml").read_text()) or {}).get(
            "application"
        )
    return run


def lat_columns(folder: Path, columns: Sequence[Column], summary) -> list[TableColumn]:
    """The headline columns of a LAT run's application (of the registered ``columns``); each
    attack run at extra bounds gets a column per bound right after its own, since one bound
    often saturates every method."""
    backdoor = _lat_run(folder).get("application") == "backdoor"
    keys = {k for stats in summary.values() for k in stats}
    rows = table_columns(columns, "backdoor" if backdoor else "refusal", keys)
    headline = headline_epsilons(_run_config(folder))
    expanded = []
    for key, label, lower in rows:
        prefix = key.split(".", 1)[0]
        if key.endswith(".success") and prefix in headline:
            expanded.append((key, f"{label} (ε {headline[prefix]:g})", lower))
        else:
            expanded.append((key, label, lower))
        if key.endswith(".success") and prefix in dict(ATTACKS):
            expanded += [
                (f"{prefix}.success@{e:g}", f"{label} (ε {e:g})", lower)
                for e in _curve_epsilons(summary, prefix)
            ]
    return expanded


def _run_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.yaml"
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _adversary_cells(runs: list[dict[str, Any]]) -> list[str]:
    """Mean over seeds of the training adversary's record (its objective before its first and
    after its last step, share of training steps it lowered it), from each run's per-step
    history, so runs made before the record was kept show it too; "-" without an adversary."""
    records = [adversary_progress(r.get("train", {}).get("history") or {}) for r in runs]
    records = [r for r in records if r is not None]
    if not records:
        return ["-", "-"]
    mean = {k: sum(r[k] for r in records) / len(records) for k in records[0]}
    return [
        f"{mean['loss_first_mean']:.3f} → {mean['loss_last_mean']:.3f}",
        f"{100 * mean['improved_share']:.0f}%",
    ]


def _compute_lines(summary, order: list[str], results) -> list[str]:
    lines = [
        "## Compute (training)",
        "",
        "Passes are forward+backward passes over a batch (adversary PGD steps, defender steps, "
        "benign-term steps); the ratios compare mean training time and passes with the "
        "method's baseline (the same training without an adversary). The adversary's objective "
        "(mean over training steps, before its first and after its last step) and the share of "
        "training steps on which it lowered it: an adversary that raises its own objective is "
        "not attacking.",
        "",
        "| method | baseline | train seconds | fwd+bwd passes | adversary seconds | "
        "time / baseline | passes / baseline | adversary objective | steps it lowered it |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in order:
        first = results[name][0]
        if not first.get("trained", True):
            continue
        base = first.get("baseline")
        stats = summary[name]
        lines.append(
            f"| {name} | {base or '-'} | "
            f"{format_cell(stats.get('compute.train_seconds'), 'compute.train_seconds')} | "
            f"{format_cell(stats.get('compute.fwd_bwd_passes'), 'compute.fwd_bwd_passes')} | "
            f"{format_cell(stats.get('compute.adversary_seconds'), 'compute.adversary_seconds')} | "
            f"{mean_ratio(summary, name, base, 'compute.train_seconds')} | "
            f"{mean_ratio(summary, name, base, 'compute.fwd_bwd_passes')} | "
            f"{' | '.join(_adversary_cells(results[name]))} |"
        )
    return lines


def _eval_time_lines(summary, order: list[str]) -> list[str]:
    """Seconds each measurement took per method (mean ± std over seeds): where a run's
    evaluation time goes (absent in runs made before it was recorded)."""
    prefix = EVAL_SECONDS + "."
    names = sorted({k[len(prefix) :] for s in summary.values() for k in s if k.startswith(prefix)})
    if not names:
        return []
    lines = [
        "",
        "## Compute (evaluation)",
        "",
        "Wall seconds of each measurement on the held-out requests (one worker thread).",
        "",
        "| method | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for name in order:
        stats = summary.get(name, {})
        cells = [format_cell(stats.get(prefix + n), prefix + n) for n in names]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
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


def _lat_markdown(
    folder: Path,
    summary,
    order: list[str],
    results,
    headline: Sequence[TableColumn],
    twins: Sequence[dict[str, Any]],
    calibrated: Sequence[dict[str, Any]],
) -> str:
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
        "preferred; ε is the attack's per-token L2 bound (relative to the layer's median "
        "activation norm unless the config says otherwise).",
        "",
        markdown_table(
            summary,
            order,
            headline,
            label="method",
            cell=format_cell,
        ),
        *lat_twins_markdown(twins),
        *calibration_markdown(calibrated, summary),
        "",
        *_compute_lines(summary, order, results),
        *_eval_time_lines(summary, order),
        *_install_lines(folder),
    ]
    all_keys = sorted({k for s in summary.values() for k in s})
    lines += [
        "",
        "## Every metric",
        "",
        markdown_table(
            summary, order, [(k, k, None) for k in all_keys], label="method", cell=format_cell
        ),
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


def write_lat_report(
    folder: Path, summary, order: list[str], results, columns: Sequence[Column]
) -> None:
    """results.md and figures/ of a targeted-LAT run (``columns``: the registered
    measurements' report columns)."""
    headline = lat_columns(folder, columns, summary)
    twins = lat_twin_rows(results, headline, order)
    calibrated = calibrations(results, order)
    atomic_write_text(
        folder / "results.md",
        _lat_markdown(folder, summary, order, results, headline, twins, calibrated),
    )
    if twins:  # runs with per-request results (earlier runs have none)
        atomic_write_text(folder / "claims.json", json.dumps({"twins": twins}, indent=1) + "\n")
    metric_bars(summary, order, folder / "figures" / "metrics.png", headline)
    calibration_figure(calibrated, folder / "figures" / "benign_calibration.png")
    attack_curves(
        summary,
        order,
        folder / "figures" / "attack_curves.png",
        headline_epsilons(_run_config(folder)),
    )
