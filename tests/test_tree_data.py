"""Tree path-finding data (Brinkmann et al. 2024): generator validity, determinism, edge order,
held-out split, serialisation round trips, loss mask, and clear errors for bad input."""

from __future__ import annotations

import random

import pytest
import torch

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.reasoning.tokens import (
    BAR,
    COLON,
    PAD,
    TreeLayout,
    TreeVocab,
    decode_tokens,
    detokenize,
    encode_batch,
    loss_mask,
    make_tokenizer,
    parse,
    serialise,
    tokenize,
)
from mechunlearn.reasoning.trees import (
    ORDER_CODES,
    TreeBatch,
    TreeExample,
    TreeTaskConfig,
    check_example,
    children_of,
    generate_trees,
    goal_is_leaf,
    heldout_trees,
    is_binary,
    is_connected_tree,
    is_unique_root_path,
    training_trees,
)

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    HAVE_HYPOTHESIS = True
except ImportError:  # pragma: no cover - hypothesis is in the dev extra
    HAVE_HYPOTHESIS = False

ORDERS = ["mixed", "backward", "random", "forward"]


def check_generated(n: int, seed: int, order: str, batch: int = 32) -> None:
    """Every generated tree is valid, has the paper's shape, and round-trips."""
    trees = generate_trees(n, batch, seed, edge_order=order)
    tokens = encode_batch(trees)
    mask = loss_mask(trees.path_length, n)
    vocab, layout = TreeVocab(n), TreeLayout(n)
    assert tokens.shape == (batch, layout.seq_len)
    for i, example in enumerate(trees.examples()):
        assert check_example(example) == []
        assert is_connected_tree(n, example.edges)
        assert is_binary(example.edges)
        assert goal_is_leaf(example.edges, example.goal)
        assert is_unique_root_path(example)
        assert 1 <= example.path_length <= n - 1
        # The second branch: the root has two children unless the path uses every node.
        root_children = len(children_of(example.edges).get(example.root, []))
        assert root_children == (1 if example.path_length == n - 1 else 2)
        text = serialise(example)
        assert parse(text, n) == example
        ids = tokenize(text, n)
        assert tokens[i, : len(ids)].tolist() == ids
        assert bool((tokens[i, len(ids) :] == PAD).all())
        assert decode_tokens(tokens[i], n) == example
        # The loss mask covers exactly the path after the root, in order.
        marked = torch.nonzero(mask[i]).flatten().tolist()
        assert marked == list(range(layout.path_start, layout.path_start + example.path_length))
        assert tokens[i, mask[i]].tolist() == [vocab.target(v) for v in example.path[1:]]
        assert tokens[i, layout.root] == vocab.source(example.root)
        assert tokens[i, layout.goal] == vocab.source(example.goal)
        assert tokens[i, layout.colon] == COLON and tokens[i, layout.bar] == BAR


@pytest.mark.parametrize("n", [3, 4, 7, 16, 20])
def test_generated_trees_are_valid_seeded(n):
    rng = random.Random(n)
    for _ in range(6):
        check_generated(n, rng.randrange(2**40), rng.choice(ORDERS))


if HAVE_HYPOTHESIS:

    @settings(max_examples=40, deadline=None)
    @given(
        n=st.integers(min_value=3, max_value=24),
        seed=st.integers(min_value=0, max_value=2**62),
        order=st.sampled_from(ORDERS),
    )
    def test_generated_trees_are_valid_property(n, seed, order):
        check_generated(n, seed, order, batch=8)

    @settings(max_examples=60, deadline=None)
    @given(seed=st.integers(min_value=0, max_value=2**40), data=st.data())
    def test_corrupted_examples_are_rejected_property(seed, data):
        example = generate_trees(16, 1, seed).example(0)
        kind = data.draw(st.sampled_from(CORRUPTIONS))
        bad = corrupt(example, kind, random.Random(seed))
        assert check_example(bad), (kind, serialise(bad))
        with pytest.raises(DataError):
            parse(serialise(bad), 16)

else:  # pragma: no cover

    @pytest.mark.skip(reason="hypothesis is not installed (pip install -e '.[dev]')")
    def test_generated_trees_are_valid_property():
        raise AssertionError("unreachable")


CORRUPTIONS = ["path_node", "goal", "drop_path_step", "retarget_edge", "extra_child", "root"]


def corrupt(example: TreeExample, kind: str, rng: random.Random) -> TreeExample:
    """A variant of a valid example that breaks one rule of the task."""
    edges, path, goal = list(example.edges), list(example.path), example.goal
    n = example.n
    if kind == "path_node":  # a path step replaced by a node off the path (or swapped)
        i = rng.randrange(1, len(path))
        off_path = [v for v in range(n) if v not in path]
        if off_path:
            path[i] = rng.choice(off_path)
        else:
            j = rng.choice([j for j in range(len(path)) if j != i])
            path[i], path[j] = path[j], path[i]
    elif kind == "goal":  # the goal is not where the path ends
        goal = rng.choice([v for v in range(n) if v != goal])
    elif kind == "drop_path_step" and len(path) > 2:
        del path[rng.randrange(1, len(path) - 1)]
    elif kind == "drop_path_step":
        path.append(path[-1])
    elif kind == "retarget_edge":  # one edge points at the root: a cycle, the root has a parent
        i = rng.randrange(len(edges))
        edges[i] = (edges[i][0], example.root)
    elif kind == "extra_child":  # a leaf's edge moved under a node that has two children
        kids = children_of(edges)
        full = [v for v, c in kids.items() if len(c) == 2]
        if not full:
            return TreeExample(n, tuple(edges), goal, (path[1], *path[1:]))
        i = next(i for i, (s, _) in enumerate(edges) if s not in full)
        edges[i] = (full[0], edges[i][1])
    elif kind == "root":  # the path starts below the root
        path = path[1:] if len(path) > 2 else [path[1], path[0]]
    return TreeExample(n, tuple(edges), goal, tuple(path))


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_validity_checks_reject_corrupted_examples(kind):
    rng = random.Random(kind)
    for example in generate_trees(16, 20, 7).examples():
        bad = corrupt(example, kind, rng)
        assert bad != example
        assert check_example(bad), (kind, serialise(bad))


def test_paper_distribution_and_vocabulary():
    n = 16
    trees = generate_trees(n, 6000, 1)
    counts = torch.bincount(trees.path_length, minlength=n)
    assert counts[0] == 0 and bool((counts[1:] > 6000 / 15 * 0.7).all())  # uniform 1..15
    backward = float((trees.order == ORDER_CODES["backward"]).float().mean())
    assert 0.45 < backward < 0.55 and set(trees.order.tolist()) == {0, 1}
    assert TreeVocab(n).size == 35 and len(TreeVocab(n).tokens) == 35
    assert TreeLayout(n).seq_len == 63 and TreeLayout(n).n_positions == 62


def test_generation_is_deterministic_by_seed():
    a, b, c = (generate_trees(16, 64, s) for s in (5, 5, 6))
    for name in ("edges", "parent", "goal", "path", "path_length", "order"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.edges, c.edges)
    task = TreeTaskConfig()
    assert torch.equal(
        encode_batch(training_trees(task, 32, 0, 3)), encode_batch(training_trees(task, 32, 0, 3))
    )
    assert not torch.equal(
        encode_batch(training_trees(task, 32, 0, 3)), encode_batch(training_trees(task, 32, 0, 4))
    )


def test_edge_orders():
    forward = generate_trees(16, 50, 3, edge_order="forward")
    backward = generate_trees(16, 50, 3, edge_order="backward")
    shuffled = generate_trees(16, 50, 3, edge_order="random")
    assert torch.equal(forward.parent, backward.parent)  # same trees, other listing
    assert torch.equal(backward.edges, forward.edges.flip(1))
    for example in backward.examples():  # a node's outgoing edges come before its incoming one
        position = {t: i for i, (_, t) in enumerate(example.edges)}
        assert all(position[s] > i for i, (s, _) in enumerate(example.edges) if s in position)
    assert torch.equal(shuffled.parent, forward.parent)
    assert not torch.equal(shuffled.edges, forward.edges)
    assert torch.equal(shuffled.tree_hash(), forward.tree_hash())  # order is not identity


def test_forward_order_matches_reference_topological_sort():
    nx = pytest.importorskip("networkx")
    for example in generate_trees(16, 100, 11, edge_order="forward").examples():
        graph = nx.DiGraph()
        graph.add_nodes_from(range(16))  # node iteration order 0..n-1, as the reference's
        graph.add_edges_from(sorted(example.edges))
        order = list(nx.topological_sort(graph))
        rank = {v: i for i, v in enumerate(order)}
        expected = sorted(example.edges, key=lambda e: (rank[e[0]], rank[e[1]]))
        assert list(example.edges) == expected


def test_heldout_split_is_disjoint_and_stratified():
    task = TreeTaskConfig(n_nodes=8, heldout_fraction=0.1)
    heldout = heldout_trees(task, per_length=20, seed=0)
    assert torch.bincount(heldout.path_length).tolist() == [0] + [20] * 7
    assert bool(heldout.heldout(task.heldout_fraction).all())
    train_hashes = set()
    for step in range(20):
        batch = training_trees(task, 256, seed=0, step=step)
        assert len(batch) == 256
        assert not bool(batch.heldout(task.heldout_fraction).any())
        train_hashes |= set(batch.tree_hash().tolist())
    assert not train_hashes & set(heldout.tree_hash().tolist())
    # Without the filter about 10% of fresh trees would be held-out ones.
    fresh = generate_trees(8, 5000, 99)
    assert 0.07 < float(fresh.heldout(0.1).float().mean()) < 0.13


def test_a_split_without_trees_is_a_data_error_not_an_endless_loop():
    # n = 4 has 24 tree identities per path length: the 2% held-out split holds one with a
    # 1-edge path and none with 2 or 3 edges, which used to make the sampler loop for ever.
    task = TreeTaskConfig(n_nodes=4)
    assert len(heldout_trees(task, per_length=4, seed=0, path_lengths=[1])) == 4
    with pytest.raises(DataError, match="no tree of 4 nodes with a path of 2 edges.*held-out"):
        heldout_trees(task, per_length=4, seed=0)
    almost_all_heldout = TreeTaskConfig(n_nodes=4, heldout_fraction=0.999)
    with pytest.raises(DataError, match="paths of up to 1 edges falls in the training split"):
        training_trees(almost_all_heldout, 8, seed=0, step=0, max_path_length=1)


def test_distinct_trees_count_identities_not_rows():
    batch = generate_trees(8, 50, 1)
    assert sum(batch.distinct_by_length().values()) == 50  # n = 8: repeats are vanishingly rare
    assert TreeBatch.cat([batch, batch]).distinct_by_length() == batch.distinct_by_length()
    # n = 5 has 180 + 240 + 120 + 120 identities (path lengths 1-4), all drawn in 20,000 trees
    assert generate_trees(5, 20_000, 0).distinct_by_length() == {1: 180, 2: 240, 3: 120, 4: 120}


def test_tokenizer_matches_vocabulary():
    n = 16
    tokenizer = make_tokenizer(n)
    assert len(tokenizer) == 35
    for example in generate_trees(n, 10, 2).examples():
        text = serialise(example)
        ids = tokenize(text, n)
        assert tokenizer(text)["input_ids"] == ids
        assert tokenizer.decode(ids) == text == detokenize(ids, n)


def test_small_n_is_a_config_error():
    for make in (
        lambda: TreeTaskConfig(n_nodes=2),
        lambda: generate_trees(2, 4, 0),
        lambda: TreeLayout(1),
        lambda: TreeVocab(2),
        lambda: parse("0>1|1:0>1", 2),
    ):
        with pytest.raises(ConfigError, match="too small"):
            make()
    with pytest.raises(ConfigError, match="path lengths"):
        generate_trees(5, 4, 0, path_lengths=5)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "malformed"),
        ("0>1,1>2,0>3", "malformed"),  # no goal / path
        ("0>1,1>2,0>3|2:0>1>2>", "malformed"),
        ("0>1,1>2,0>3|2:0", "malformed"),  # the path has no step
        ("0>1;1>2,0>3|2:0>1>2", "malformed"),
        ("0>1,1>2,0>9|2:0>1>2", "outside"),
        ("0>1,1>2|2:0>1>2", "edges"),
        ("0>1,1>2,2>3|3:0>1>2>3,", "malformed"),
        ("0>1,1>2,0>3|1:0>1", "not a leaf"),
        ("0>1,1>2,0>3|2:0>2", "not the root-to-goal path"),
        ("0>1,1>2,0>3|2:1>2", "not the root-to-goal path"),
        ("0>1,1>2,2>0|2:0>1>2", "one tree"),
        ("0>1,0>2,0>3|3:0>3", "more than two children"),
    ],
)
def test_malformed_examples_are_data_errors(text, message):
    with pytest.raises(DataError, match=message):
        parse(text, 4)


def test_bad_tokens_are_data_errors():
    with pytest.raises(DataError, match="vocabulary"):
        tokenize("0>1,1>17|1:0>1", 16)
    with pytest.raises(DataError, match="unexpected"):
        tokenize("0>1 ,1>2", 16)
    with pytest.raises(DataError, match="outside the vocabulary"):
        detokenize([3, 99], 16)
