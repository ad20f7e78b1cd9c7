"""Tree-model analyses (Brinkmann et al. 2024): every analysis returns well-formed numbers on a
tiny random model; planted checks: a hand-built previous-token head is found as edge merging
(and not as goal copying), hand-set patterns give the exact deduction scores, a model whose
attention output is zero gives zero knockout effects and full scrubbing recovery, the subpath
tracer follows a planted climb; and ``tree analyze`` writes its files or fails cleanly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from mechunlearn.cli import app
from mechunlearn.errors import ConfigError
from mechunlearn.reasoning.analysis import (
    AnalysisSettings,
    RegisterSettings,
    ScrubbingSettings,
    accuracy_analysis,
    analysis_trees,
    attention_analysis,
    attention_control,
    deduction_analysis,
    probe_analysis,
    register_analysis,
    run_patterns,
    scrubbing_analysis,
    summarize,
)
from mechunlearn.reasoning.analysis import subtrees as subtree_module  # module: for monkeypatch
from mechunlearn.reasoning.analysis.attention import (
    AttentionResult,
    edge_merging_mass,
    goal_copying_mass,
    separator_merging_mass,
)
from mechunlearn.reasoning.analysis.common import TreeData
from mechunlearn.reasoning.analysis.deduction import deduction_result, deduction_sums
from mechunlearn.reasoning.analysis.patterns import attention_from_residual
from mechunlearn.reasoning.analysis.probes import fit_multilabel_probe, micro_f1, subset_accuracy
from mechunlearn.reasoning.analysis.registers import (
    position_kinds,
    query_reads_by_kind,
    read_kinds,
    trace_subpaths,
)
from mechunlearn.reasoning.analysis.roles import (
    ROLES,
    SEPARATOR_GROUPS,
    key_roles,
    role_sums,
    role_uniform_sums,
    separator_group_sums,
    separator_groups,
)
from mechunlearn.reasoning.analysis.scrubbing import chain_value
from mechunlearn.reasoning.model import (
    TreeModelConfig,
    build_model,
    hooked_tree_model,
    save_tree_model,
)
from mechunlearn.reasoning.train import evaluate_accuracy
from mechunlearn.reasoning.trees import TreeTaskConfig, heldout_trees

N = 6
TINY = TreeModelConfig(n_nodes=N, n_layers=2, d_model=32, n_heads=2, d_mlp=64)
TASK = TreeTaskConfig(n_nodes=N, heldout_fraction=0.05)
SETTINGS = AnalysisSettings(n_trees=40, batch_size=64)


def tiny_hm(config: TreeModelConfig = TINY, seed: int = 1):
    return hooked_tree_model(build_model(config, seed).eval())


def zero_attention(hm, layers=None):
    """Zero the attention output projection: attention then contributes nothing."""
    for layer in range(hm.dims.n_layers) if layers is None else layers:
        proj = hm.model.transformer.h[layer].attn.c_proj
        with torch.no_grad():
            proj.weight.zero_()
            proj.bias.zero_()
    return hm


# ---- patterns and knockout --------------------------------------------------------------


def test_recomputed_patterns_reproduce_the_model():
    hm = tiny_hm()
    data = analysis_trees(TASK, SETTINGS)
    reference = hm.model(input_ids=data.inputs).logits
    logits, patterns = run_patterns(hm, data.inputs)
    assert torch.equal(logits, reference)
    T = data.inputs.shape[1]
    for layer, pattern in patterns.items():
        assert pattern.shape == (len(data), TINY.n_heads, T, T)
        assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
        assert float(pattern.triu(1).abs().max()) == 0.0  # causal
        # A v through c_proj is the model's own attention output
        with hm.hooks(cache=[f"blocks.{layer}.resid_pre", f"blocks.{layer}.attn_out"]) as cache:
            hm.model(input_ids=data.inputs)
        block = hm.model.transformer.h[layer]
        pattern2, v = attention_from_residual(block, cache[f"blocks.{layer}.resid_pre"])
        out = block.attn.c_proj((pattern2 @ v).transpose(1, 2).flatten(2))
        assert torch.allclose(out, cache[f"blocks.{layer}.attn_out"], atol=1e-5)
    keep_all = {layer: torch.zeros(len(data), T, T, dtype=torch.bool) for layer in range(2)}
    with attention_control(hm, knockout=keep_all):
        same = hm.model(input_ids=data.inputs).logits
    assert torch.allclose(same, reference, atol=1e-5)


def test_knockout_changes_only_the_knocked_queries():
    hm = tiny_hm()
    data = analysis_trees(TASK, SETTINGS)
    with torch.no_grad():
        reference = hm.model(input_ids=data.inputs).logits
    T = data.inputs.shape[1]
    mask = torch.zeros(len(data), T, T, dtype=torch.bool)
    mask[:, data.layout.root :, data.layout.goal] = True
    with (
        torch.no_grad(),
        attention_control(hm, knockout={0: mask, 1: mask}, record=[0]) as patterns,
    ):
        knocked = hm.model(input_ids=data.inputs).logits
    root = data.layout.root
    assert torch.allclose(knocked[:, :root], reference[:, :root], atol=1e-6)
    assert float((knocked[:, root:] - reference[:, root:]).abs().max()) > 1e-4
    assert float(patterns[0][:, :, root:, data.layout.goal].abs().max()) == 0.0


# ---- accuracy -----------------------------------------------------------------------------


def test_accuracy_analysis_by_length_and_order():
    hm = tiny_hm()
    result = accuracy_analysis(hm, TASK, per_length=6, seed=2)
    assert result.counts == {k: 6 for k in range(1, N)}
    assert set(result.by_order) == {"backward", "random"}
    for entry in result.by_order.values():
        assert set(entry["by_length"]) == {str(k) for k in range(1, N)}
        assert 0.0 <= entry["overall"] <= 1.0
    direct = evaluate_accuracy(hm.model, heldout_trees(TASK, 6, seed=2))
    assert result.overall == pytest.approx(direct.overall)
    assert json.loads(json.dumps(result.to_json()))["per_length"] == 6


# ---- attention: planted previous-token head ---------------------------------------------


def previous_token_model():
    """One layer whose single head attends from every position to the previous one (token
    embeddings zero, orthogonal position embeddings, W_q maps each position to its
    predecessor)."""
    config = TreeModelConfig(n_nodes=N, n_layers=1, d_model=32, n_heads=1, d_mlp=16)
    model = build_model(config, seed=0).eval()
    T = model.config.n_positions
    with torch.no_grad():
        basis = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(0)))[0]
        positions = basis[:, :T].T * 10
        model.transformer.wpe.weight.copy_(positions)
        model.transformer.wte.weight.zero_()
        block = model.transformer.h[0]
        z = block.ln_1(positions)
        previous = torch.cat([z[:1], z[:-1]])
        w_q = torch.linalg.pinv(z) @ previous * 20
        weight = block.attn.c_attn.weight  # Conv1D: [in, 3 * out]
        weight.zero_()
        weight[:, :32] = w_q
        weight[:, 32:64] = torch.eye(32)
        weight[:, 64:] = torch.eye(32)
        block.attn.c_attn.bias.zero_()
    return hooked_tree_model(model), config


def test_planted_previous_token_head_is_edge_merging_not_goal_copying():
    hm, _ = previous_token_model()
    result = attention_analysis(hm, TASK, SETTINGS)
    assert result.edge_merging[0][0] > 0.95
    assert result.goal_copying[0][0] < 0.05
    assert result.edge_merging_uniform < 0.2
    findings = {f.name: f for f in summarize(attention=result).findings}
    assert findings["edge merging (layer 0)"].found is True
    assert findings["goal copying"].found is False
    # a random model's heads are spread out: neither mechanism
    random = attention_analysis(tiny_hm(), TASK, SETTINGS)
    assert len(random.edge_merging) == 2 and len(random.edge_merging[0]) == 2
    assert max(max(row) for row in random.edge_merging) < 0.95
    found = {f.name: f.found for f in summarize(attention=random).findings}
    assert found["edge merging (layer 0)"] is False


def test_edge_merged_at_the_separator_is_found_there_and_not_at_the_target():
    data = analysis_trees(TASK, AnalysisSettings(n_trees=30))
    T = data.layout.n_positions
    pattern = torch.eye(T).expand(len(data), 1, T, T).clone()
    commas = torch.arange(N - 2) * 3 + 2
    pattern[:, 0, commas, commas] = 0.0
    pattern[:, 0, commas, commas - 2] = 0.4  # source
    pattern[:, 0, commas, commas - 1] = 0.6  # target
    patterns = {0: pattern}
    assert separator_merging_mass(patterns, data)[0, 0] == pytest.approx(len(data) * (N - 2))
    assert edge_merging_mass(patterns, data)[0, 0] == 0.0

    def result(edge: float, separator: float) -> AttentionResult:
        return AttentionResult(
            edge_merging=[[edge]],
            edge_merging_uniform=0.1,
            separator_merging=[[separator]],
            separator_merging_uniform=0.2,
            goal_copying=[[0.0]],
            goal_copying_uniform=0.1,
            n_trees=len(data),
            edge_order="backward",
        )

    finding = {f.name: f for f in summarize(attention=result(0.0, 1.0)).findings}
    assert finding["edge merging (layer 0)"].found is True
    assert finding["edge merging (layer 0)"].evidence["site"] == "separator"
    finding = {f.name: f for f in summarize(attention=result(0.0, 0.5)).findings}
    assert finding["edge merging (layer 0)"].found is False  # 0.5 < 3 x uniform 0.2
    assert finding["edge merging (layer 0)"].evidence["site"] is None


def test_key_roles_partition_the_visible_keys_and_count_the_remaining_path():
    data = analysis_trees(TASK, AnalysisSettings(n_trees=40))
    roles = key_roles(data)
    q = data.queries
    assert ((roles >= 0).sum(1) == q.positions + 1).all()  # every visible key has one role
    remaining_targets = (roles == ROLES.index("remaining path edges: target")).sum(1)
    assert torch.equal(remaining_targets, q.distance)  # the edges p_i -> ... -> goal
    # a planted head reading the separator after the answer's edge puts all its mass there
    T = data.layout.n_positions
    pattern = torch.eye(T).expand(len(data), 1, T, T).clone()
    keys = data.target_position_of(q.rows, data.trees.path[q.rows, q.step + 1]) + 1
    pattern[q.rows, 0, q.positions, q.positions] = 0.0
    pattern[q.rows, 0, q.positions, keys] = 1.0
    mass = role_sums({0: pattern}, data)[0, 0] / len(q)
    assert mass[ROLES.index("remaining path edges: separator")] == pytest.approx(1.0)
    assert mass.sum() == pytest.approx(1.0)
    uniform = role_uniform_sums(data) / len(q)
    assert uniform.sum() == pytest.approx(1.0) and (uniform > 0).all()
    sums = separator_group_sums({0: pattern}, data)
    assert sums.mass[0, 0, SEPARATOR_GROUPS.index("answer edge")] / len(q) == pytest.approx(1.0)
    assert sums.mass.sum() / len(q) == pytest.approx(1.0)
    separators = [ROLES.index(f"{kind} edges: separator") for kind in ("remaining path", "other")]
    assert (sums.uniform / len(q)).sum() == pytest.approx(float(uniform[separators].sum()))
    # the choice: all on the answer edge for this head; even for a head reading both children
    with_choice = (
        separator_groups(data) == SEPARATOR_GROUPS.index("current node's other children")
    ).any(1)
    assert 0 < sums.choice_queries == int(with_choice.sum()) < len(q)
    assert sums.choice[0, 0].tolist() == pytest.approx([sums.choice_queries, 0.0])
    both = torch.zeros_like(pattern)
    groups = separator_groups(data)
    for index in range(len(q)):
        children = [e for e in range(data.n - 1) if groups[index, e] in (0, 3)]
        for e in children:
            both[q.rows[index], 0, q.positions[index], 3 * e + 2] = 1.0 / len(children)
    even = separator_group_sums({0: both}, data).choice[0, 0] / sums.choice_queries
    assert even.tolist() == pytest.approx([0.5, 0.5])


def test_separator_groups_of_a_hand_built_tree():
    # root 0 -> 1 -> 2 -> 3 (goal), 1 -> 4, 0 -> 5; query at p_1 = 1 (step 1)
    trees = heldout_trees(TASK, 1, seed=0)
    one = trees.select(torch.tensor([0]))
    one.edges[0] = torch.tensor([[2, 3], [1, 4], [1, 2], [0, 5], [0, 1]])
    one.parent[0] = torch.tensor([-1, 0, 1, 2, 1, 0])
    one.path[0] = torch.tensor([0, 1, 2, 3, -1, -1])
    one.path_length[0] = 3
    one.root[0], one.goal[0] = 0, 3
    data = TreeData(one)
    step_one = data.queries.step == 1
    groups = separator_groups(data)[step_one][0].tolist()
    names = [SEPARATOR_GROUPS[g] for g in groups]
    assert names == [
        "rest of remaining path",  # 2 -> 3
        "current node's other children",  # 1 -> 4
        "answer edge",  # 1 -> 2
        "off the path",  # 0 -> 5
        "walked path",  # 0 -> 1
    ]


# ---- deduction: planted patterns ----------------------------------------------------------


def planted_chain_patterns(data, n_layers: int, offset: int = 0):
    """Layer 0: queries attend to the goal; layer l >= 1: to the edge into a_{l-1} (its target
    token, or with ``offset=1`` the separator after it) while the chain still climbs (else to
    themselves)."""
    B, T = len(data), data.layout.n_positions
    q = data.queries
    patterns = {}
    for layer in range(n_layers):
        pattern = torch.eye(T).expand(B, 1, T, T).clone()  # non-queries attend to themselves
        if layer == 0:
            keys = torch.full_like(q.positions, data.layout.goal)
        else:
            edge = data.target_position_of(q.rows, data.chain_node(layer - 1)) + offset
            keys = torch.where(q.distance - 1 >= layer, edge, q.positions)
        pattern[q.rows, 0, q.positions, q.positions] = 0.0
        pattern[q.rows, 0, q.positions, keys] = 1.0
        patterns[layer] = pattern
    return patterns


def test_deduction_scores_of_planted_and_uniform_patterns():
    data = analysis_trees(TASK, AnalysisSettings(n_trees=60))
    patterns = planted_chain_patterns(data, 3)
    result = deduction_result(deduction_sums(patterns, data), len(data), "backward")
    assert result.scores[0] == [None]
    assert result.scores[1][0] == pytest.approx(1.0) and result.scores[2][0] == pytest.approx(1.0)
    assert result.best_steps()[1:] == [0, 1]
    assert result.counts[1] > result.counts[2] > 0
    assert goal_copying_mass(patterns, data)[0, 0] == pytest.approx(len(data.queries))
    assert edge_merging_mass(patterns, data)[0, 0] == 0.0
    findings = {f.name: f for f in summarize(deduction=result).findings}
    assert findings["deduction heads (backward chaining)"].found is True
    assert findings["deduction heads (backward chaining)"].evidence["chaining layers"] == [1, 2]

    T = data.layout.n_positions
    causal = torch.ones(T, T).tril()
    uniform = {
        layer: (causal / causal.sum(-1, keepdim=True)).expand(len(data), 1, T, T)
        for layer in range(3)
    }
    flat = deduction_result(deduction_sums(uniform, data), len(data), "backward")
    for layer in (1, 2):
        assert flat.scores[layer][0] == pytest.approx(flat.uniform[layer], rel=1e-5)
    assert summarize(deduction=flat).findings[0].found is False


def test_deduction_read_at_the_separator_is_found_at_that_site_only():
    data = analysis_trees(TASK, AnalysisSettings(n_trees=60))
    patterns = planted_chain_patterns(data, 3, offset=1)
    at_target = deduction_result(deduction_sums(patterns, data), len(data), "backward")
    at_separator = deduction_result(
        deduction_sums(patterns, data, "separator"), len(data), "backward", site="separator"
    )
    assert at_separator.scores[1][0] == pytest.approx(1.0)
    assert at_separator.scores[2][0] == pytest.approx(1.0)
    assert at_target.scores[1][0] == pytest.approx(0.0)
    finding = summarize(deduction=at_target).findings[0]
    assert finding.found is False
    at_target.separator = at_separator
    finding = summarize(deduction=at_target).findings[0]
    assert finding.found is True
    assert finding.evidence["chaining layers"] == []
    assert finding.evidence["separator chaining layers"] == [1, 2]


def test_deduction_analysis_is_well_formed_on_a_random_model():
    result = deduction_analysis(tiny_hm(), TASK, SETTINGS)
    assert result.scores[0] == [None, None]
    assert all(0.0 <= v <= 1.0 for v in result.scores[1])
    assert result.profile_counts == sorted(result.profile_counts, reverse=True)
    assert len(result.profile[0][0]) == N - 1
    json.dumps(result.to_json())


# ---- probes -------------------------------------------------------------------------------


def test_multilabel_probe_fits_separable_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    y = torch.stack([x[:, 0] > 0, x[:, 1] + x[:, 2] > 0, torch.zeros(400, dtype=torch.bool)], 1)
    probe = fit_multilabel_probe(x[:200], y[:200])
    prediction = probe.predict(x[200:])
    assert subset_accuracy(prediction, y[200:]) > 0.9
    assert micro_f1(prediction, y[200:]) > 0.9


def test_probes_decode_the_token_but_not_the_goal_at_embed():
    hm = tiny_hm()
    result = probe_analysis(hm, TASK, AnalysisSettings(n_trees=80, batch_size=64))
    assert result.rows == ["embed", "L0", "L1"]
    assert set(result.curves) == {
        "source_at_target",
        "source_at_separator",
        "goal_at_path",
        "current_at_path",
        "next_at_path",
        "chain_at_path",
        "children_at_path",
        "nonleaf_children_at_path",
    }
    assert result.curves["current_at_path"].test_accuracy[0] > 0.95  # the token itself
    goal = result.curves["goal_at_path"]
    assert goal.test_accuracy[0] < goal.chance + 0.35  # the goal is not at the query
    separator = result.curves["source_at_separator"]  # a comma at embed knows only its position
    assert separator.position == "commas" and separator.test_accuracy[0] < separator.chance + 0.1
    assert result.curves["chain_at_path"].test_accuracy[0] is None
    children = result.curves["children_at_path"]
    assert children.kind == "multilabel" and len(children.test_f1) == 3
    assert 0.0 <= children.chance <= 1.0 and 0.0 <= children.chance_f1 <= 1.0
    json.dumps(result.to_json())


# ---- scrubbing ----------------------------------------------------------------------------


def test_scrubbing_recovers_everything_where_attention_is_silent():
    hm = tiny_hm()
    with torch.no_grad():
        hm.model.lm_head.weight.mul_(30)  # a confident random model: loss far below uniform
    zero_attention(hm, layers=[0])
    result = scrubbing_analysis(hm, TASK, ScrubbingSettings(n_trees=40, donors=512))
    assert result.lengths == list(range(1, N))
    assert result.depth_bound == 2
    assert all(v == pytest.approx(1.0) for v in result.recovered[0] if v is not None)
    assert all(v == pytest.approx(1.0) for v in result.control[0] if v is not None)
    assert any(v is not None for v in result.recovered[0])
    assert all(math.isfinite(v) for v in result.recovered[1] if v is not None)
    # layer 1 still attends: an unmatched donor's attention output changes the prediction
    assert any(abs(v - 1.0) > 1e-3 for v in result.control[1] if v is not None)
    assert all(n > 0 for n in result.matched[0])  # the goal always has a matching donor
    finding = summarize(scrubbing=result).findings[0]
    assert finding.name == "depth bound" and finding.found in (True, False)
    json.dumps(result.to_json())


def test_chain_value_climbs_from_the_goal_and_stops_at_the_answer():
    trees = heldout_trees(TASK, 2, seed=4, path_lengths=[3])
    path = trees.path
    expected = {0: path[:, 3], 1: path[:, 2], 2: path[:, 1], 3: path[:, 1]}
    for layer, nodes in expected.items():
        value, climbing = chain_value(trees, layer)
        assert torch.equal(value, nodes)
        assert climbing.tolist() == [layer <= 2] * 2


# ---- registers ----------------------------------------------------------------------------


def test_register_scan_is_zero_without_attention_and_well_formed_otherwise():
    silent = register_analysis(zero_attention(tiny_hm()), TASK, RegisterSettings(n_trees=30))
    assert len(silent.positions) == 3 * N - 1
    assert max(abs(e) for e in silent.effect_logprob) == 0.0  # nothing depends on a knockout
    assert silent.candidates == [] and silent.blocked_by_length is None
    settings = RegisterSettings(n_trees=30, batch_size=64, min_effect=0.0)
    result = register_analysis(tiny_hm(), TASK, settings)
    assert result.kinds == position_kinds(analysis_trees(TASK, settings))
    assert result.kinds[-3:] == ["bar", "goal", "colon"]
    assert result.kinds.count("target") == N - 1  # one target token per edge
    assert any(abs(e) > 0 for e in result.effect_logprob)
    # the edge token kind the queries read is derived from the model's attention, and left out
    assert set(result.query_reads) == {"source", "target", "comma"}
    assert result.edge_read_kind == max(result.query_reads, key=result.query_reads.get)
    assert result.candidates and all(c.kind != result.edge_read_kind for c in result.candidates)
    for c in result.candidates:  # shares of its accepted reads (none: all zero)
        total = sum(c.read_kinds.values())
        assert total == 0 or total == pytest.approx(1.0)
    assert all(0.0 <= c.chain_fraction <= 1.0 for c in result.candidates)
    assert set(result.blocked_by_length) == set(result.baseline_by_length) == set(range(1, N))
    finding = summarize(registers=result).findings[0]
    assert finding.name == "register tokens"
    json.dumps(result.to_json())


def test_subpath_tracing_follows_a_planted_climb():
    data = analysis_trees(TASK, AnalysisSettings(n_trees=20))
    long = (data.trees.path_length >= 3).nonzero().flatten()
    data = data.select(long)
    B, T = len(data), data.layout.n_positions
    register = data.layout.goal  # the goal position sees every edge
    rows = torch.arange(B)
    goal = data.trees.goal
    parent = data.trees.parent[rows, goal]
    edge_into_goal = data.target_position_of(rows, goal)
    edge_into_parent = data.target_position_of(rows, parent)
    patterns = {}
    for layer, keys in enumerate((edge_into_goal, edge_into_goal, edge_into_parent)):
        pattern = torch.zeros(B, 1, T, T)
        pattern[rows, 0, register, keys] = 1.0
        patterns[layer] = pattern
    paths = trace_subpaths(patterns, data, register, min_attention=0.5)
    grandparent = data.trees.parent[rows, parent]
    assert paths == [[int(goal[b]), int(parent[b]), int(grandparent[b])] for b in range(B)]
    # a read that does not continue the climb ends the subpath
    patterns[2] = patterns[0]
    assert trace_subpaths(patterns, data, register, 0.5) == [
        [int(goal[b]), int(parent[b])] for b in range(B)
    ]


def test_subpath_tracing_reads_edges_held_at_commas():
    """A model that merges each edge into the comma after it (layer 0) and whose register reads
    commas: the same climb, found through comma reads; a layer-0 comma read holds no node."""
    data = analysis_trees(TASK, AnalysisSettings(n_trees=20))
    data = data.select((data.trees.path_length >= 3).nonzero().flatten())
    B, T = len(data), data.layout.n_positions
    register, rows = data.layout.goal, torch.arange(len(data))
    goal = data.trees.goal
    parent = data.trees.parent[rows, goal]
    comma_into_goal = data.target_position_of(rows, goal) + 1
    comma_into_parent = data.target_position_of(rows, parent) + 1
    patterns = {}
    for layer, keys in enumerate((comma_into_goal, comma_into_goal, comma_into_parent)):
        pattern = torch.zeros(B, 1, T, T)
        pattern[rows, 0, register, keys] = 1.0
        patterns[layer] = pattern
    grandparent = data.trees.parent[rows, parent]
    expected = [[int(goal[b]), int(parent[b]), int(grandparent[b])] for b in range(B)]
    assert trace_subpaths(patterns, data, register, min_attention=0.5) == expected
    counts = read_kinds(patterns, data, register, 0.5)
    assert counts == {"source": 0, "target": 0, "comma": 2 * B}  # layer 0 is not counted
    # the queries read what the pattern says: every query attends to the commas only
    queries = data.queries
    reading = torch.zeros(B, 1, T, T)
    reading[queries.rows, 0, queries.positions, 2] = 1.0  # the first edge's comma
    shares = query_reads_by_kind({1: reading}, data, from_layer=1)
    assert shares == {"source": 0.0, "target": 0.0, "comma": 1.0}


# ---- pipeline and CLI ---------------------------------------------------------------------


def test_cli_analyze_writes_results_and_rejects_bad_checkpoints(tmp_path):
    folder = save_tree_model(build_model(TINY, 3), TINY, TASK, tmp_path / "ckpt")
    out = tmp_path / "analysis"
    runner = CliRunner()
    args = ["tree", "analyze", "--checkpoint", str(folder), "--out", str(out)]
    result = runner.invoke(app, [*args, "--n-trees", "16", "--per-length", "4", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "mechanisms" in result.output and "deduction heads" in result.output
    saved = json.loads((out / "results.json").read_text())
    for key in ("accuracy", "attention", "roles", "probes", "subtrees", "deduction"):
        assert key in saved and key in saved["seconds"]
    assert all(key in saved for key in ("scrubbing", "registers", "goal_reads", "sample"))
    names = [f["name"] for f in saved["summary"]["findings"]]
    assert "edge merging (layer 0)" in names and "register tokens" in names
    assert saved["meta"]["model"]["n_layers"] == TINY.n_layers
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert figures == [
        "accuracy.png",
        "attention.png",
        "deduction.png",
        "probes.png",
        "registers.png",
        "roles.png",
        "scrubbing.png",
        "subtrees.png",
    ]
    summary = (out / "summary.md").read_text()
    assert (
        summary.startswith("# Mechanisms of") and "| remaining path edges: separator |" in summary
    )
    assert "## Subtrees held at the edge separators" in summary and "| embed |" in summary
    assert "## Where the goal is read" in summary and "| goal |" in summary
    assert "Analysed sample: 20 held-out trees, " in summary  # 16 rounded up to 4 per length

    too_few = runner.invoke(app, [*args, "--n-trees", "2"])
    assert too_few.exit_code == 2 and "n_trees" in too_few.output
    missing = runner.invoke(app, ["tree", "analyze", "--checkpoint", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "not a tree model checkpoint" in missing.output
    other = runner.invoke(app, [*args, "--expect", "paper", "--quiet"])
    assert other.exit_code == 2 and "another model config" in other.output
    meta = json.loads((folder / "tree_model.json").read_text())
    meta["model"]["d_model"] = 64
    (folder / "tree_model.json").write_text(json.dumps(meta))
    broken = runner.invoke(app, [*args, "--quiet"])
    assert broken.exit_code == 2 and "does not match the model config" in broken.output
    assert json.loads((out / "results.json").read_text()) == saved  # untouched by failures


def test_analyses_refuse_a_model_of_another_tree_size():
    hm = tiny_hm()
    with pytest.raises(ConfigError, match="does not fit trees of n=7"):
        attention_analysis(hm, TreeTaskConfig(n_nodes=7), SETTINGS)


# ---- subtrees at the separators -----------------------------------------------------------


def test_descendant_hops_count_edges_down_the_tree():
    # 0 -> 1 -> 2 -> 3 and 1 -> 4 (root 0)
    parent = torch.tensor([[-1, 0, 1, 2, 1]])
    hops = subtree_module.descendant_hops(parent)[0]
    assert hops[0].tolist() == [0, 1, 2, 3, 2]
    assert hops[1].tolist() == [0, 0, 1, 2, 1]
    assert hops[2].tolist() == [0, 0, 0, 1, 0]
    assert hops[3].sum() == 0 and hops[4].sum() == 0
    assert subtree_module.held_depth([0.9, 0.85, 0.5], 0.05) == 2
    assert subtree_module.held_depth([0.9, 0.85], 0.2) == 0  # too many false positives


def test_subtree_probe_finds_a_planted_subtree_and_nothing_at_noise(monkeypatch):
    """Separators whose features are the descendant indicators (plus noise) hold the whole
    subtree; features of pure noise hold none of it."""
    data = analysis_trees(TASK, SETTINGS)
    hops = subtree_module.descendant_hops(data.trees.parent)
    targets = data.trees.edges[..., 1]
    labels = (hops[torch.arange(len(data))[:, None], targets] > 0).flatten(0, 1).float()
    noise = torch.randn(labels.shape[0], 16, generator=torch.Generator().manual_seed(0))
    planted = torch.cat([4 * labels, noise], 1)
    rows = torch.stack([noise.repeat(1, 2)[:, : planted.shape[1]], planted])  # [R=2, edges, d]

    def fake_rows(hm, data, batch_size):
        return rows

    monkeypatch.setattr(subtree_module, "_separator_rows", fake_rows)
    hm = tiny_hm(TreeModelConfig(n_nodes=N, n_layers=1, d_model=32, n_heads=2, d_mlp=64))
    result = subtree_module.subtree_analysis(hm, TASK, SETTINGS)
    assert result.rows == ["embed", "L0"] and result.hops == list(range(1, N - 1))
    deepest = max(h for h, c in zip(result.hops, result.counts, strict=True) if c)
    assert result.held_depth == [0, deepest]
    assert all(r == 1.0 for r in result.recall[1] if r is not None)
    assert result.false_positive_rate[1] == 0.0
    assert max(r for r in result.recall[0] if r is not None) < 0.8
    assert "| L0 |" in result.markdown()


# ---- where the goal is read -----------------------------------------------------------------


def test_goal_reads_cost_nothing_without_attention_and_the_block_hits_only_the_goal():
    from mechunlearn.reasoning.analysis.goal_reads import goal_read_analysis, key_block

    silent = goal_read_analysis(zero_attention(tiny_hm()), TASK, SETTINGS)
    for key in ("goal", "colon"):  # attention adds nothing, so blocking it changes nothing
        assert silent.blocked_loss[key] == pytest.approx([silent.clean_loss] * TINY.n_layers)
        assert silent.blocked_all_layers[key] == pytest.approx(silent.clean_loss)
    result = goal_read_analysis(tiny_hm(), TASK, SETTINGS)
    assert result.n_queries == len(analysis_trees(TASK, SETTINGS).queries)
    assert result.blocked_all_layers["goal"] != pytest.approx(result.clean_loss)
    assert "| colon |" in result.markdown()
    data = analysis_trees(TASK, SETTINGS)
    mask = key_block(data, data.layout.goal)
    assert mask[:, :, data.layout.goal].sum() == len(data) * (data.layout.n_positions - 1)
    assert mask.sum() == mask[:, :, data.layout.goal].sum()


# ---- the analysed sample ----------------------------------------------------------------------


def test_sample_flags_probes_tested_on_their_own_training_trees():
    from mechunlearn.reasoning.analysis.sample import sample_analysis

    settings = AnalysisSettings(n_trees=128, seed=0, edge_order="backward", batch_size=64)
    # n = 5: 9 held-out identities, so every probe test tree is also a training tree
    small = sample_analysis(TreeTaskConfig(n_nodes=5), settings)
    assert (small.trees, small.distinct, small.probe_test_trees) == (128, 9, 64)
    assert small.probe_test_repeats == 1.0 and not small.probes_trustworthy
    assert "probe results below are not evidence" in small.markdown()
    # n = 8: plenty of identities, few repeats, no warning
    large = sample_analysis(TreeTaskConfig(n_nodes=8), settings)
    assert large.distinct >= 120 and large.probe_test_repeats <= 0.1 and large.probes_trustworthy
    assert "not evidence" not in large.markdown()
    assert large.to_json()["probes_trustworthy"] is True
