"""Figures of the tree-model analyses (one PNG per analysis, written atomically), in the style
of Brinkmann et al. 2024 (arXiv:2402.11917): accuracy by path length, attention scores and
mean patterns, probe accuracy by layer, the deduction profile, loss recovered by path length,
the register knockout scan, and the attention mass by key role."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mechunlearn.plotting import save_figure  # noqa: E402
from mechunlearn.reasoning.analysis.accuracy import AccuracyResult  # noqa: E402
from mechunlearn.reasoning.analysis.attention import AttentionResult  # noqa: E402
from mechunlearn.reasoning.analysis.deduction import DeductionResult  # noqa: E402
from mechunlearn.reasoning.analysis.probes import ProbeResult  # noqa: E402
from mechunlearn.reasoning.analysis.registers import RegisterResult  # noqa: E402
from mechunlearn.reasoning.analysis.roles import RoleResult  # noqa: E402
from mechunlearn.reasoning.analysis.scrubbing import ScrubbingResult  # noqa: E402
from mechunlearn.reasoning.analysis.subtrees import SubtreeResult  # noqa: E402


def _nan(values) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def accuracy_figure(result: AccuracyResult, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    lengths = sorted(result.by_length)
    ax.plot(lengths, [result.by_length[k] for k in lengths], "o-", label="task mix")
    for order, entry in result.by_order.items():
        ks = sorted(int(k) for k in entry["by_length"])
        ax.plot(ks, [entry["by_length"][str(k)] for k in ks], ".--", label=order)
    ax.set_xlabel("path length")
    ax.set_ylabel("whole-path accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"held-out accuracy (overall {result.overall:.3f})")
    ax.legend()
    return save_figure(fig, path)


def attention_figure(result: AttentionResult, path: Path) -> Path:
    n_layers = len(result.edge_merging)
    columns = max(3, n_layers)
    fig, axes = plt.subplots(
        2, columns, figsize=(3.2 * columns, 6.5), squeeze=False, layout="constrained"
    )
    for ax, kind, uniform in (
        (axes[0, 0], "edge_merging", result.edge_merging_uniform),
        (axes[0, 1], "separator_merging", result.separator_merging_uniform),
        (axes[0, 2], "goal_copying", result.goal_copying_uniform),
    ):
        data = np.asarray(getattr(result, kind))
        image = ax.imshow(data, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(data.shape[1]))
        ax.set_yticks(range(data.shape[0]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{kind.replace('_', ' ')} (uniform {uniform:.2f})")
        fig.colorbar(image, ax=ax)
    for ax in axes[0, 3:]:
        ax.axis("off")
    for layer in range(n_layers):
        ax = axes[1, layer]
        if layer < len(result.mean_patterns):
            pattern = result.mean_patterns[layer].float().mean(0).numpy()
            ax.imshow(pattern, cmap="Blues", vmin=0, vmax=max(1e-6, float(pattern.max())))
        ax.set_title(f"layer {layer}: mean pattern")
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
    for ax in axes[1, n_layers:]:
        ax.axis("off")
    return save_figure(fig, path)


def probes_figure(result: ProbeResult, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(result.rows))
    for name, curve in result.curves.items():
        (line,) = ax.plot(x, _nan(curve.test_accuracy), "o-", label=name)
        ax.axhline(curve.chance, color=line.get_color(), linestyle=":", linewidth=0.8)
    ax.set_xticks(x, result.rows)
    ax.set_xlabel("residual stream after")
    ax.set_ylabel("held-out accuracy (dotted: chance)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("linear probes")
    return save_figure(fig, path)


def subtrees_figure(result: SubtreeResult, path: Path) -> Path:
    """Recall of the descendant probe at the separators, residual row x hops below the target."""
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(result.hops), 1 + 0.45 * len(result.rows)))
    image = ax.imshow(
        np.array([_nan(row) for row in result.recall]), vmin=0, vmax=1, cmap="magma", aspect="auto"
    )
    ax.set_xticks(range(len(result.hops)), [str(h) for h in result.hops])
    labels = [
        f"{row} (fp {fp:.2f})"
        for row, fp in zip(result.rows, result.false_positive_rate, strict=True)
    ]
    ax.set_yticks(range(len(result.rows)), labels)
    ax.set_xlabel("descendant h edges below the edge's target")
    ax.set_ylabel("residual stream after")
    ax.set_title("subtree held at each edge's separator (probe recall)")
    fig.colorbar(image, ax=ax)
    return save_figure(fig, path)


def _best_head_profile(result: DeductionResult) -> np.ndarray:
    return np.array(
        [
            [
                max((h[k] for h in layer if h[k] is not None), default=np.nan)
                for k in range(len(layer[0]))
            ]
            for layer in result.profile
        ],
        dtype=float,
    )


def deduction_figure(result: DeductionResult, path: Path) -> Path:
    sites = [result] + ([result.separator] if result.separator is not None else [])
    profiles = [_best_head_profile(site) for site in sites]
    vmax = max(
        1e-6, float(np.nanmax([np.nanmax(p) if np.isfinite(p).any() else 0 for p in profiles]))
    )
    fig, axes = plt.subplots(
        1, len(sites), figsize=(6 * len(sites), 3.5), squeeze=False, layout="constrained"
    )
    for ax, site, profile in zip(axes[0], sites, profiles, strict=True):
        image = ax.imshow(profile, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=vmax)
        layers = np.arange(1, profile.shape[0])
        layers = layers[layers - 1 < profile.shape[1]]
        ax.set_yticks(range(profile.shape[0]))
        ax.plot(layers - 1, layers, "c*", markersize=10, label="expected: edge into a_(l-1)")
        ax.set_xlabel("k: edge into chain node a_k (a_0 = goal)")
        ax.set_ylabel("layer")
        ax.set_title(f"path position -> edge at its {site.site} (best head)")
        ax.legend(fontsize=7, loc="upper right")
    fig.colorbar(image, ax=axes[0].tolist())
    return save_figure(fig, path)


def scrubbing_figure(result: ScrubbingResult, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for layer, (matched, control) in enumerate(zip(result.recovered, result.control, strict=True)):
        (line,) = ax.plot(result.lengths, _nan(matched), "o-", label=f"layer {layer}")
        ax.plot(result.lengths, _nan(control), "--", color=line.get_color(), linewidth=0.8)
    ax.axvline(result.depth_bound + 0.5, color="grey", linestyle=":", label="number of layers")
    ax.set_xlabel("path length")
    ax.set_ylabel("loss recovered (dashed: unmatched control)")
    ax.set_title("resampling attn_out at the root position")
    ax.legend(fontsize=7)
    return save_figure(fig, path)


KIND_COLORS = {
    "source": "tab:blue",
    "target": "tab:orange",
    "comma": "tab:green",
    "bar": "tab:red",
    "goal": "tab:purple",
    "colon": "tab:brown",
}


def registers_figure(result: RegisterResult, path: Path) -> Path:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    colors = [KIND_COLORS.get(kind, "grey") for kind in result.kinds]
    ax.bar(result.positions, result.effect_logprob, color=colors)
    ax.axhline(result.min_effect, color="grey", linestyle=":")
    for candidate in result.candidates:
        ax.annotate("R", (candidate.position, candidate.effect), ha="center", va="bottom")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLORS.values()]
    ax.legend(handles, list(KIND_COLORS), fontsize=7, ncol=3)
    ax.set_xlabel("prompt position")
    ax.set_ylabel("log-prob drop when knocked out")
    ax.set_title(f"attention knockout from the path positions, layers >= {result.from_layer}")
    lengths = sorted(result.baseline_by_length)
    ax2.plot(lengths, [result.baseline_by_length[k] for k in lengths], "o-", label="clean")
    if result.blocked_by_length is not None:
        ax2.plot(
            lengths,
            [result.blocked_by_length[k] for k in lengths],
            "o--",
            label="registers blocked",
        )
    ax2.set_xlabel("path length")
    ax2.set_ylabel("whole-path accuracy")
    ax2.set_ylim(-0.02, 1.02)
    ax2.legend(fontsize=7)
    return save_figure(fig, path)


def roles_figure(result: RoleResult, path: Path) -> Path:
    """Stacked bars: per layer and head, the attention mass of the path positions by role."""
    columns = result.columns()
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 4.5, 4), layout="constrained")
    bottom = np.zeros(len(columns))
    colours = plt.get_cmap("tab10")
    for index, role in enumerate(result.roles):
        values = np.array([mass[index] for _, mass in columns])
        ax.bar(range(len(columns)), values, bottom=bottom, color=colours(index), label=role)
        bottom += values
    ax.set_xticks(range(len(columns)), [name for name, _ in columns])
    ax.set_ylabel("attention mass from the path positions")
    ax.set_ylim(0, 1.0)
    ax.set_title("where the path positions read")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_figure(fig, path)
