"""Mechanism verdicts of several tree models side by side, against depth relative to path length.

Brinkmann et al. (2024, arXiv:2402.11917) find backward chaining, one level per layer, in a
6-layer model whose paths are up to 15 edges long; our 3-layer model at n = 8 solves the task
without it. Whether the mechanism appears depends on depth relative to path length, so this
module reads the ``results.json`` of several ``tree analyze`` runs and tabulates, per model,
the depth, the longest path, every mechanism's verdict, the per-layer deduction-head weight and
the per-layer loss recovered by matched resampling, plus two descriptions of what a model does
instead of chaining: the per-layer weight on the answer's own edge (reading the next edge of the
path directly) and, where the analysis has them, how much of the subtree below each edge its
separator holds and where the goal is read. It only reads what the analyses wrote; the verdicts and thresholds are theirs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.io import atomic_write_json, atomic_write_text
from mechunlearn.reasoning.analysis.summary import VERDICTS

RESULTS_FILE = "results.json"
MODEL_KEYS = ("n_layers", "n_nodes", "d_model")
DEDUCTION_FINDING = "deduction heads (backward chaining)"


@dataclass(frozen=True)
class AnalysedModel:
    """One analysis folder's numbers that the comparison needs."""

    label: str
    folder: Path
    n_layers: int
    n_nodes: int
    d_model: int
    accuracy: float
    verdicts: dict[str, bool | None]
    deduction: dict[str, list[float | None]]  # site -> per-layer best-head weight
    deduction_uniform: list[float | None]
    short_recovered: list[float | None]
    long_recovered: list[float | None]
    chaining_layers: list[int]  # layers whose best head passed the deduction criterion
    answer_edge: list[float | None]  # per layer: best head's weight on the answer's edge
    subtree_recall: list[float] | None  # per residual row; None: an analysis without it
    subtree_false_positives: list[float] | None
    goal_block: list[float] | None  # per layer: path loss with the goal read blocked there
    goal_block_all: float | None
    distinct_trees: int | None = None  # of the analysed sample; None: an analysis without it
    probe_repeats: float | None = None  # share of the probes' test trees also trained on

    @property
    def longest_path(self) -> int:
        return self.n_nodes - 1

    def deduction_weight(self, layer: int) -> float | None:
        """The larger of the two sites' weight on the chain edge in ``layer``."""
        scores = [s[layer] for s in self.deduction.values() if s[layer] is not None]
        return max(scores) if scores else None

    def deduction_ratio(self, layer: int) -> float | None:
        """``deduction_weight`` in multiples of the uniform weight."""
        weight, uniform = self.deduction_weight(layer), self.deduction_uniform[layer]
        return None if weight is None or not uniform else weight / uniform


def _required(data: dict[str, Any], path: str, where: Path) -> Any:
    value: Any = data
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise DataError(f"{where}: no '{path}'; is this a `tree analyze` results file?")
        value = value[key]
    return value


def load_analysed_model(folder: str | Path, label: str | None = None) -> AnalysedModel:
    """The comparison's view of one ``tree analyze --out`` folder."""
    folder = Path(folder)
    path = folder / RESULTS_FILE
    if not path.is_file():
        raise DataError(f"{folder}: no {RESULTS_FILE}; pass a `tree analyze --out` folder")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: not valid JSON ({error})") from None
    try:
        return _analysed_model(data, folder, path, label)
    except (KeyError, TypeError, ValueError, IndexError) as error:  # a malformed entry
        raise DataError(f"{path}: malformed `tree analyze` results ({error!r})") from None


def _analysed_model(
    data: dict[str, Any], folder: Path, path: Path, label: str | None
) -> AnalysedModel:
    model = {key: int(_required(data, f"meta.model.{key}", path)) for key in MODEL_KEYS}
    findings = _required(data, "summary.findings", path)
    deduction = _required(data, "deduction", path)
    sites = {
        str(deduction.get("site") or "target"): _required(data, "deduction.layer_scores", path)
    }
    separator = deduction.get("separator")
    if isinstance(separator, dict) and "layer_scores" in separator:
        sites["separator"] = separator["layer_scores"]
    deduction_evidence = next(
        (f.get("evidence", {}) for f in findings if f["name"] == DEDUCTION_FINDING), {}
    )
    chaining = {
        int(layer)
        for key in ("chaining layers", "separator chaining layers")
        for layer in deduction_evidence.get(key) or []
    }
    answer_sites = [deduction.get("answer_edge")]
    if isinstance(separator, dict):
        answer_sites.append(separator.get("answer_edge"))
    answer_edge = [
        max((max(site[layer]) for site in answer_sites if site), default=None)
        for layer in range(model["n_layers"])
    ]
    subtrees = data.get("subtrees")
    recall = falses = None
    if isinstance(subtrees, dict):
        counts, falses = subtrees["counts"], subtrees["false_positive_rate"]
        recall = [_weighted_recall(row, counts) for row in subtrees["recall"]]
    goal_reads = data.get("goal_reads")
    goal_block = goal_all = None
    if isinstance(goal_reads, dict):
        goal_block = [float(v) for v in goal_reads["blocked_loss"]["goal"]]
        goal_all = float(goal_reads["blocked_all_layers"]["goal"])
    sample = data.get("sample")
    distinct = repeats = None
    if isinstance(sample, dict):
        distinct, repeats = int(sample["distinct"]), float(sample["probe_test_repeats"])
    return AnalysedModel(
        label=label or f"{model['n_layers']} layers, n = {model['n_nodes']}",
        folder=folder,
        n_layers=model["n_layers"],
        n_nodes=model["n_nodes"],
        d_model=model["d_model"],
        accuracy=float(_required(data, "accuracy.overall", path)),
        verdicts={f["name"]: f["found"] for f in findings},
        deduction=sites,
        deduction_uniform=_required(data, "deduction.uniform", path),
        short_recovered=_required(data, "scrubbing.short_recovered", path),
        long_recovered=_required(data, "scrubbing.long_recovered", path),
        chaining_layers=sorted(chaining),
        answer_edge=answer_edge,
        subtree_recall=recall,
        subtree_false_positives=falses,
        goal_block=goal_block,
        goal_block_all=goal_all,
        distinct_trees=distinct,
        probe_repeats=repeats,
    )


def _weighted_recall(recall: list[float | None], counts: list[int]) -> float:
    """Recall over all descendants (each hop weighted by its count), so no hop is picked."""
    total = sum(c for r, c in zip(recall, counts, strict=True) if r is not None)
    hits = sum(r * c for r, c in zip(recall, counts, strict=True) if r is not None)
    return hits / total if total else 0.0


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _deduction_cell(model: AnalysedModel, layer: int) -> str:
    if layer >= model.n_layers:
        return "-"
    weight, ratio = model.deduction_weight(layer), model.deduction_ratio(layer)
    if weight is None:
        return "n/a"
    return f"{weight:.2f}" if ratio is None else f"{weight:.2f} ({ratio:.1f}x)"


def _section(title: str, text: str, columns: list[str]) -> list[str]:
    """A markdown section: heading, explanation, table header."""
    return ["", f"## {title}", "", text, "", _row(columns), "|" + "---|" * len(columns)]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _padded(cells: list[str], width: int) -> list[str]:
    """``cells`` filled with ``-`` to ``width`` (a shallower model, or a missing analysis)."""
    return cells + ["-"] * (width - len(cells))


def _layers(first: int, deepest: int) -> list[str]:
    return [f"L{layer}" for layer in range(first, deepest)]


def depth_markdown(models: list[AnalysedModel]) -> str:
    """The comparison as markdown: models, verdicts, then the per-layer numbers."""
    lines = [
        "# Mechanisms against depth (Brinkmann et al. 2024)",
        "",
        "| model | layers | d_model | nodes | longest path (edges) | layers / longest path | "
        "whole-path accuracy | distinct analysed trees (probe test trees also trained on) | "
        "analysis |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in models:
        sample = "-"
        if m.distinct_trees is not None and m.probe_repeats is not None:
            sample = f"{m.distinct_trees} ({100 * m.probe_repeats:.0f}%)"
        lines.append(
            f"| {m.label} | {m.n_layers} | {m.d_model} | {m.n_nodes} | {m.longest_path} | "
            f"{m.n_layers / m.longest_path:.2f} | {100 * m.accuracy:.2f}% | {sample} | "
            f"`{m.folder}` |"
        )
    deepest = max(m.n_layers for m in models)
    lines += _verdict_lines(models)
    lines += _deduction_lines(models, deepest)
    lines += _depth_bound_lines(models, deepest)
    lines += _answer_edge_lines(models, deepest)
    if any(m.subtree_recall is not None for m in models):
        lines += _subtree_lines(models, deepest)
    if any(m.goal_block is not None for m in models):
        lines += _goal_read_lines(models, deepest)
    return "\n".join(lines) + "\n"


def _verdict_lines(models: list[AnalysedModel]) -> list[str]:
    names: list[str] = []
    for m in models:
        names += [n for n in m.verdicts if n not in names]
    lines = ["", "## Verdicts", "", _row(["mechanism", *(m.label for m in models)])]
    lines.append("|---|" + "---|" * len(models))
    for name in names:
        cells = [VERDICTS[m.verdicts[name]] if name in m.verdicts else "-" for m in models]
        lines.append(_row([name, *cells]))
        if name == DEDUCTION_FINDING:  # one level per layer needs several such layers
            cells = [", ".join(map(str, m.chaining_layers)) or "none" for m in models]
            lines.append(_row(["... layers with a deduction head", *cells]))
    return lines


def _deduction_lines(models: list[AnalysedModel], deepest: int) -> list[str]:
    lines = _section(
        "Deduction heads: weight on the chain edge per layer (multiple of uniform)",
        "The best head's mean weight from a path position on the edge into chain node "
        "a_(l-1) in layer l (one level up the tree per layer), read at the edge's target or at "
        "the separator after it, whichever is larger; in brackets, divided by the uniform "
        "weight. The analyses call a deduction head found at >= 0.3 weight and >= 3x uniform.",
        ["model", *_layers(1, deepest)],
    )
    for m in models:
        lines.append(_row([m.label, *(_deduction_cell(m, layer) for layer in range(1, deepest))]))
    return lines


def _depth_bound_lines(models: list[AnalysedModel], deepest: int) -> list[str]:
    lines = _section(
        "Depth bound: loss recovered by matched resampling, per layer",
        "Layer l's attention output at the root position is taken from a donor tree whose "
        "node l levels above its goal is the same; 1 = the clean loss, 0 = uniform. Pure "
        "backward chaining recovers most of the loss on paths no longer than the number of "
        "layers (short) and less on longer ones (long).",
        ["model", "paths", *_layers(0, deepest)],
    )
    for m in models:
        for kind, values in (("short", m.short_recovered), ("long", m.long_recovered)):
            cells = [
                _number(values[layer]) if layer < len(values) else "-" for layer in range(deepest)
            ]
            lines.append(_row([m.label, kind, *cells]))
    return lines


def _answer_edge_lines(models: list[AnalysedModel], deepest: int) -> list[str]:
    lines = _section(
        "The answer's own edge: weight per layer",
        "The best head's mean weight from a path position on the edge to the next path node "
        "(at its target or its separator, whichever is larger): a model that reads the next "
        "edge directly, without climbing a chain, puts its weight here.",
        ["model", *_layers(0, deepest)],
    )
    for m in models:
        cells = [
            _number(m.answer_edge[layer]) if layer < m.n_layers else "-" for layer in range(deepest)
        ]
        lines.append(_row([m.label, *cells]))
    return lines


def _subtree_lines(models: list[AnalysedModel], deepest: int) -> list[str]:
    lines = _section(
        "Subtrees at the edge separators: descendant recall per residual row",
        "Recall of the analyses' descendant probe over all descendants of each edge's "
        "target, at the separator after the edge (in brackets: false-positive rate); "
        "- where the analysis predates this probe.",
        ["model", "embed", *_layers(0, deepest)],
    )
    for m in models:
        cells = []
        if m.subtree_recall is not None and m.subtree_false_positives is not None:
            pairs = zip(m.subtree_recall, m.subtree_false_positives, strict=True)
            cells = [f"{r:.2f} ({f:.2f})" for r, f in pairs]
        lines.append(_row([m.label, *_padded(cells, deepest + 1)]))
    return lines


def _goal_read_lines(models: list[AnalysedModel], deepest: int) -> list[str]:
    lines = _section(
        "Where the goal is read: path loss with attention to the goal blocked, per layer",
        "Mean loss (nats) at the path positions when every position's attention to the goal "
        "token is zeroed in that layer only, or in all layers; - where the analysis predates "
        "this test.",
        ["model", *_layers(0, deepest), "all layers"],
    )
    for m in models:
        if m.goal_block is None or m.goal_block_all is None:
            lines.append(_row([m.label, *_padded([], deepest + 1)]))
            continue
        cells = _padded([_number(v, 3) for v in m.goal_block], deepest)
        lines.append(_row([m.label, *cells, _number(m.goal_block_all, 3)]))
    return lines


def depth_json(models: list[AnalysedModel]) -> dict[str, Any]:
    return {
        "models": [
            {
                "label": m.label,
                "folder": str(m.folder),
                "n_layers": m.n_layers,
                "d_model": m.d_model,
                "n_nodes": m.n_nodes,
                "longest_path": m.longest_path,
                "accuracy": m.accuracy,
                "verdicts": m.verdicts,
                "chaining_layers": m.chaining_layers,
                "deduction_weight": [m.deduction_weight(layer) for layer in range(m.n_layers)],
                "deduction_ratio": [m.deduction_ratio(layer) for layer in range(m.n_layers)],
                "short_recovered": m.short_recovered,
                "long_recovered": m.long_recovered,
                "answer_edge": m.answer_edge,
                "subtree_recall": m.subtree_recall,
                "subtree_false_positives": m.subtree_false_positives,
                "goal_block": m.goal_block,
                "goal_block_all": m.goal_block_all,
                "distinct_trees": m.distinct_trees,
                "probe_repeats": m.probe_repeats,
            }
            for m in models
        ]
    }


def depth_figure(models: list[AnalysedModel], path: Path) -> Path:
    """Deduction weight ratio and short-path recovery per layer, one line per model."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from mechunlearn.plotting import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    for m in models:
        layers = list(range(1, m.n_layers))
        ratios = [m.deduction_ratio(layer) for layer in layers]
        left.plot(layers, [float("nan") if r is None else r for r in ratios], "o-", label=m.label)
        recovered = [float("nan") if v is None else v for v in m.short_recovered]
        right.plot(range(len(recovered)), recovered, "o-", label=m.label)
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_xlabel("layer")
    left.set_ylabel("weight on the chain edge / uniform")
    left.set_title("deduction heads")
    left.legend(fontsize=7)
    right.axhline(1.0, color="grey", linestyle=":")
    right.set_xlabel("layer")
    right.set_ylabel("loss recovered, paths <= layers")
    right.set_title("matched resampling")
    right.legend(fontsize=7)
    return save_figure(fig, path)


def write_depth_comparison(
    folders: list[str | Path], out: str | Path, labels: list[str] | None = None
) -> list[AnalysedModel]:
    """Read every analysis first (a bad folder writes nothing), then write ``comparison.md``,
    ``comparison.json`` and ``figures/depth.png`` into ``out``, each atomically."""
    if not folders:
        raise ConfigError("give at least one `tree analyze --out` folder to compare")
    if labels and len(labels) != len(folders):
        raise ConfigError(f"{len(labels)} labels for {len(folders)} analysis folders")
    names = labels or [None] * len(folders)
    models = [load_analysed_model(f, label) for f, label in zip(folders, names, strict=True)]
    out = Path(out)
    atomic_write_text(out / "comparison.md", depth_markdown(models))
    atomic_write_json(out / "comparison.json", depth_json(models))
    depth_figure(models, out / "figures" / "depth.png")
    return models
