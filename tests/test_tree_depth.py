"""``tree compare``: mechanism verdicts of several analysed tree models against depth. The
comparison must carry each analysis's own numbers (verdicts, per-layer deduction weight,
matched recovery) into its table, and refuse a folder that is not an analysis without writing
anything."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from mechunlearn.cli import app
from mechunlearn.errors import ConfigError, DataError
from mechunlearn.reasoning.model import TreeModelConfig, build_model, save_tree_model
from mechunlearn.reasoning.trees import TreeTaskConfig
from mechunlearn.report.tree_depth import load_analysed_model, write_depth_comparison

N = 6
TASK = TreeTaskConfig(n_nodes=N, heldout_fraction=0.05)


@pytest.fixture(scope="module")
def analyses(tmp_path_factory):
    """Two tiny random models of 2 and 3 layers, each analysed by `tree analyze`."""
    root = tmp_path_factory.mktemp("depth")
    folders = []
    for layers in (2, 3):
        config = TreeModelConfig(n_nodes=N, n_layers=layers, d_model=32, n_heads=2, d_mlp=64)
        checkpoint = save_tree_model(build_model(config, 3), config, TASK, root / f"ckpt{layers}")
        out = root / f"analysis{layers}"
        args = ["tree", "analyze", "--checkpoint", str(checkpoint), "--out", str(out)]
        result = CliRunner().invoke(app, [*args, "--n-trees", "16", "--per-length", "4", "--quiet"])
        assert result.exit_code == 0, result.output
        folders.append(out)
    return folders


def test_comparison_carries_each_analysis_numbers(analyses, tmp_path):
    out = tmp_path / "cmp"
    result = CliRunner().invoke(
        app,
        ["tree", "compare", *map(str, analyses), "--out", str(out), "--label", "two"]
        + ["--label", "three"],
    )
    assert result.exit_code == 0, result.output
    table = (out / "comparison.md").read_text()
    saved = json.loads((out / "comparison.json").read_text())
    assert [m["label"] for m in saved["models"]] == ["two", "three"]
    assert (out / "figures" / "depth.png").stat().st_size > 0
    for folder, label in zip(analyses, ("two", "three"), strict=True):
        results = json.loads((folder / "results.json").read_text())
        layers = results["meta"]["model"]["n_layers"]
        assert f"| {label} | {layers} | 32 | {N} | {N - 1} | {layers / (N - 1):.2f} |" in table
        sample = results["sample"]
        assert (model := load_analysed_model(folder, label)).distinct_trees == sample["distinct"]
        cell = f"| {sample['distinct']} ({100 * sample['probe_test_repeats']:.0f}%) |"
        assert cell in table
        assert model.verdicts == {f["name"]: f["found"] for f in results["summary"]["findings"]}
        short = [f"{v:.2f}" for v in results["scrubbing"]["short_recovered"]]
        row = f"| {label} | short | " + " | ".join(short + ["-"] * (3 - layers)) + " |"
        assert row in table
        deduction = results["deduction"]
        best = max(
            s for s in (deduction["layer_scores"][1], deduction["separator"]["layer_scores"][1])
        )
        assert model.deduction_ratio(1) == pytest.approx(best / deduction["uniform"][1])
        ratio = best / deduction["uniform"][1]
        assert f"| {label} | {best:.2f} ({ratio:.1f}x) |" in table
        evidence = next(
            f["evidence"]
            for f in results["summary"]["findings"]
            if f["name"] == "deduction heads (backward chaining)"
        )
        expected = sorted(
            set(evidence["chaining layers"]) | set(evidence.get("separator chaining layers", []))
        )
        assert model.chaining_layers == expected
        answer = [
            max(
                max(deduction["answer_edge"][layer]),
                max(deduction["separator"]["answer_edge"][layer]),
            )
            for layer in range(layers)
        ]
        assert model.answer_edge == pytest.approx(answer)
        cells = [f"{a:.2f}" for a in answer] + ["-"] * (3 - layers)
        assert f"| {label} | " + " | ".join(cells) + " |" in table
        subtrees = results["subtrees"]
        counts = subtrees["counts"]
        expected_recall = [
            sum(r * c for r, c in zip(row, counts, strict=True) if r is not None)
            / sum(c for r, c in zip(row, counts, strict=True) if r is not None)
            for row in subtrees["recall"]
        ]
        assert model.subtree_recall == pytest.approx(expected_recall)
        pairs = zip(expected_recall, subtrees["false_positive_rate"], strict=True)
        cells = [f"{r:.2f} ({f:.2f})" for r, f in pairs] + ["-"] * (3 - layers)
        assert f"| {label} | " + " | ".join(cells) + " |" in table
        goal = results["goal_reads"]
        assert model.goal_block == pytest.approx(goal["blocked_loss"]["goal"])
        cells = [f"{v:.3f}" for v in goal["blocked_loss"]["goal"]] + ["-"] * (3 - layers)
        cells.append(f"{goal['blocked_all_layers']['goal']:.3f}")
        assert f"| {label} | " + " | ".join(cells) + " |" in table
    verdict_rows = [line for line in table.splitlines() if line.startswith("| task solved |")]
    assert len(verdict_rows) == 1 and verdict_rows[0].count("|") == 4


def test_bad_folders_and_labels_write_nothing(analyses, tmp_path):
    out = tmp_path / "cmp"
    with pytest.raises(ConfigError, match="1 labels for 2"):
        write_depth_comparison(analyses, out, ["only one"])
    with pytest.raises(ConfigError, match="at least one"):
        write_depth_comparison([], out)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no results.json"):
        write_depth_comparison([analyses[0], empty], out)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text(json.dumps({"meta": {"model": {}}}))
    with pytest.raises(DataError, match="no 'meta.model.n_layers'"):
        write_depth_comparison([analyses[0], broken], out)
    results = json.loads((analyses[0] / "results.json").read_text())
    del results["summary"]
    (broken / "results.json").write_text(json.dumps(results))
    with pytest.raises(DataError, match="no 'summary.findings'"):
        write_depth_comparison([analyses[0], broken], out)
    results["summary"] = {"findings": [{"found": True}]}  # a finding without its name
    (broken / "results.json").write_text(json.dumps(results))
    with pytest.raises(DataError, match="malformed `tree analyze` results"):
        write_depth_comparison([broken], out)
    (broken / "results.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        write_depth_comparison([broken], out)
    assert not out.exists()
    result = CliRunner().invoke(app, ["tree", "compare", str(empty), "--out", str(out)])
    assert result.exit_code == 2 and "no results.json" in result.output
    assert not out.exists()


def test_chaining_layers_join_both_sites_of_the_deduction_finding(analyses, tmp_path):
    results = json.loads((analyses[1] / "results.json").read_text())
    for finding in results["summary"]["findings"]:
        if finding["name"] == "deduction heads (backward chaining)":
            finding["evidence"]["chaining layers"] = [2]
            finding["evidence"]["separator chaining layers"] = [1, 2]
    del results["subtrees"], results["goal_reads"], results["sample"]  # from before these tests
    folder = tmp_path / "edited"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(results))
    assert load_analysed_model(folder).chaining_layers == [1, 2]
    assert load_analysed_model(folder).subtree_recall is None
    assert load_analysed_model(folder).goal_block is None
    assert load_analysed_model(folder).distinct_trees is None
    write_depth_comparison([analyses[0], folder], tmp_path / "cmp", ["a", "b"])
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    first = ", ".join(map(str, load_analysed_model(analyses[0]).chaining_layers)) or "none"
    assert f"| ... layers with a deduction head | {first} | 1, 2 |" in table
    assert table.count("| b | - | - | - | - |") == 2  # no subtree or goal-read row to show
    assert "% | - | `" in table  # nor a sample
