"""Figures of localization results: layer x position heatmaps and layer x component maps.

Researchers read localization from pictures (ROME's tracing plots, head heatmaps), so every
``Localization`` is saved with PNGs next to its JSON.
"""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mechunlearn.localize.result import Localization  # noqa: E402
from mechunlearn.plotting import save_figure  # noqa: E402

_HEAD_RE = re.compile(r"^blocks\.(\d+)\.attn\.head(\d+)$")
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.(attn|mlp)$")


def position_heatmap(loc: Localization, kind: str, path: Path) -> Path:
    """``[layer][position]`` scores of one kind as a heatmap (layers on the y axis)."""
    data = np.asarray(loc.position_scores[kind], dtype=float)
    fig, ax = plt.subplots(
        figsize=(max(4.0, 0.6 * data.shape[1] + 2), max(3.0, 0.25 * data.shape[0] + 1.5))
    )
    image = ax.imshow(data, aspect="auto", cmap="viridis", origin="lower")
    ax.set_ylabel("layer")
    columns = loc.evidence.get("position_score_columns", {}).get(kind)
    if columns and len(columns) == data.shape[1]:
        labels = columns
    elif len(loc.position_labels) == data.shape[1]:
        labels = loc.position_labels
    else:
        labels = [str(i) for i in range(data.shape[1])]
    ax.set_xticks(range(data.shape[1]), labels, rotation=45, ha="right")
    ax.set_title(f"{loc.method}: {kind} ({loc.model})")
    fig.colorbar(image, ax=ax)
    return save_figure(fig, path)


def component_map(loc: Localization, path: Path) -> Path:
    """Layer x {attention, MLP} scores, and layer x head scores when heads were scored;
    selected components are outlined."""
    n = loc.n_layers
    layer_scores = np.full((n, 2), np.nan)
    heads: dict[tuple[int, int], float] = {}
    for name, value in loc.scores.items():
        if m := _LAYER_RE.match(name):
            layer_scores[int(m.group(1)), 0 if m.group(2) == "attn" else 1] = value
        elif m := _HEAD_RE.match(name):
            heads[(int(m.group(1)), int(m.group(2)))] = value
    n_heads = max((h for _, h in heads), default=-1) + 1
    columns = 2 if n_heads else 1
    fig, axes = plt.subplots(
        1,
        columns,
        figsize=(4 + 0.4 * n_heads * (columns - 1) + 2, max(3.0, 0.25 * n + 1.5)),
        squeeze=False,
    )
    ax = axes[0, 0]
    image = ax.imshow(layer_scores, aspect="auto", cmap="magma", origin="lower")
    ax.set_xticks([0, 1], ["attn", "mlp"])
    ax.set_ylabel("layer")
    ax.set_title(f"{loc.method}: component scores")
    fig.colorbar(image, ax=ax)
    selected = set(loc.selected)
    for layer in range(n):
        for col, kind in enumerate(("attn", "mlp")):
            if f"blocks.{layer}.{kind}" in selected:
                ax.add_patch(
                    plt.Rectangle(
                        (col - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="cyan", lw=2
                    )
                )
    if n_heads:
        grid = np.full((n, n_heads), np.nan)
        for (layer, head), value in heads.items():
            grid[layer, head] = value
        ax = axes[0, 1]
        image = ax.imshow(grid, aspect="auto", cmap="magma", origin="lower")
        ax.set_xlabel("head")
        ax.set_title("head scores")
        fig.colorbar(image, ax=ax)
        for layer, head in heads:
            if f"blocks.{layer}.attn.head{head}" in selected:
                ax.add_patch(
                    plt.Rectangle(
                        (head - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="cyan", lw=2
                    )
                )
    return save_figure(fig, path)


def probe_accuracy_plot(loc: Localization, path: Path) -> Path | None:
    """Held-out linear-probe accuracy by layer at each probed position, with chance."""
    probe = loc.evidence.get("probe")
    if not isinstance(probe, dict) or "rows" not in probe:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(probe["rows"]))
    for position in ("last_subject", "final"):
        if position in probe:
            ax.plot(
                x, probe[position]["test_accuracy"], marker="o", label=position.replace("_", " ")
            )
    ax.axhline(probe.get("chance", 0), color="grey", linestyle="--", label="chance")
    ax.set_xticks(list(x), probe["rows"], rotation=45)
    ax.set_xlabel("residual stream after layer")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{loc.method}: where the attribute becomes decodable ({loc.model})")
    ax.legend()
    return save_figure(fig, path)


def localization_figures(loc: Localization, folder: Path) -> list[Path]:
    """Every figure for one localization, written into ``folder``."""
    paths = [component_map(loc, folder / f"{loc.method}_components.png")]
    if (
        probe_plot := probe_accuracy_plot(loc, folder / f"{loc.method}_probe_accuracy.png")
    ) is not None:
        paths.append(probe_plot)
    for kind in loc.position_scores:
        paths.append(position_heatmap(loc, kind, folder / f"{loc.method}_{kind}.png"))
    return paths
