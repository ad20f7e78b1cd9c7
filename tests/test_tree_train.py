"""Tree path-finding model and trainer: HF model works with the hook layer, training lowers the
loss, teacher-forced accuracy equals greedy decoding, checkpoints round-trip and refuse other
configs, resume is exact, and the ``tree`` CLI runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mechunlearn.cli import app
from mechunlearn.errors import ConfigError, DataError
from mechunlearn.models.handle import HookedModel
from mechunlearn.reasoning.model import (
    MODEL_PRESETS,
    TreeModelConfig,
    build_model,
    config_of,
    hooked_tree_model,
    load_tree_model,
    save_tree_model,
)
from mechunlearn.reasoning.tokens import TreeLayout, TreeVocab, encode_batch, serialise
from mechunlearn.reasoning.train import (
    TreeTrainConfig,
    evaluate_accuracy,
    greedy_paths,
    lr_at,
    path_correct,
    train_tree_model,
)
from mechunlearn.reasoning.trees import TreeTaskConfig, generate_trees, heldout_trees

N = 6
TINY = TreeModelConfig(n_nodes=N, n_layers=2, d_model=32, n_heads=2, d_mlp=64)


def tiny_config(**overrides) -> TreeTrainConfig:
    values = {
        "model": TINY.model_dump(),
        "task": {"n_nodes": N, "heldout_fraction": 0.05},
        "steps": 40,
        "batch_size": 64,
        "lr": 3e-3,
        "warmup_steps": 5,
        "log_every": 10,
        "eval_every": 20,
        "eval_per_length": 10,
        "final_eval_per_length": 20,
        "checkpoint_every": 20,
    }
    return TreeTrainConfig.model_validate(values | overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tree-run")
    result = train_tree_model(tiny_config(), out, progress=False)
    return out, result


def test_presets_match_the_paper_and_fit_the_cpu():
    paper = MODEL_PRESETS.get("paper")
    assert (paper.n_layers, paper.n_heads, paper.d_model, paper.d_mlp) == (6, 1, 128, 512)
    cpu = MODEL_PRESETS.get("cpu")
    assert cpu.n_layers < cpu.n_nodes - 1  # fewer layers than the longest path
    model = build_model(paper)
    assert model.config.vocab_size == 35 and model.config.n_positions == 62
    assert model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr()
    assert config_of(model) == paper
    with pytest.raises(ConfigError, match="unknown tree model preset"):
        TreeTrainConfig(model="huge")


def test_hook_layer_caches_every_layer():
    model = build_model(TINY, seed=1).eval()
    hm = HookedModel(model, tokenizer=None)
    tokens = encode_batch(generate_trees(N, 3, 0))[:, :-1]
    _, cache = hm.run_with_cache(input_ids=tokens)
    for layer in range(TINY.n_layers):
        assert cache[f"blocks.{layer}.resid_post"].shape == (3, tokens.shape[1], TINY.d_model)
    with_tok = hooked_tree_model(model)
    example = generate_trees(N, 1, 4).example(0)
    assert (
        with_tok.tokenize(serialise(example))
        == encode_batch(generate_trees(N, 1, 4))[
            0, : len(with_tok.tokenize(serialise(example)))
        ].tolist()
    )


def test_build_model_is_deterministic():
    a, b, c = build_model(TINY, 3), build_model(TINY, 3), build_model(TINY, 4)
    wa, wb, wc = (m.transformer.h[0].attn.c_attn.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_training_lowers_loss_and_writes_outputs(trained):
    out, result = trained
    loss = result.history["loss"]
    assert len(loss) == 4 and loss[-1] < 0.8 * loss[0]
    assert result.sequences_per_s > 0 and result.steps == 40
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["accuracy"]["by_length"]) == {str(k) for k in range(1, N)}
    assert metrics["accuracy"]["counts"] == {str(k): 20 for k in range(1, N)}
    assert len(metrics["evals"]) == 1 and metrics["evals"][0]["step"] == 20
    loaded = load_tree_model(out, expect=TINY)
    assert loaded.meta["recipe"]["steps"] == 40
    assert loaded.meta["accuracy"]["overall"] == pytest.approx(result.accuracy.overall)


class LookupModel(torch.nn.Module):
    """Predicts each example's true next token, except that rows in ``wrong`` predict a wrong
    node at path step ``wrong[row]``; rows are recognised by their prompt."""

    def __init__(self, trees, wrong: dict[int, int]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.layout, self.vocab = TreeLayout(trees.n), TreeVocab(trees.n)
        tokens = encode_batch(trees)
        self.rows = {tuple(t[: self.layout.path_start].tolist()): i for i, t in enumerate(tokens)}
        self.targets = tokens.clone()
        for row, step in wrong.items():
            position = self.layout.path_start + step
            true = int(tokens[row, position])
            self.targets[row, position] = self.vocab.target(0) + (
                (true - self.vocab.target(0) + 1) % trees.n
            )

    def forward(self, input_ids):
        rows = [self.rows[tuple(t[: self.layout.path_start].tolist())] for t in input_ids]
        nxt = self.targets[rows, 1 : input_ids.shape[1] + 1]
        logits = torch.nn.functional.one_hot(nxt, self.vocab.size).float() + self.anchor
        return type("Output", (), {"logits": logits})()


def test_teacher_forced_accuracy_equals_greedy_decoding():
    trees = generate_trees(N, 40, 8)
    lengths = trees.path_length.tolist()
    wrong = {row: (row * 7) % lengths[row] for row in range(0, 40, 3)}
    model = LookupModel(trees, wrong)
    correct, _, _ = path_correct(model, trees)
    assert correct.tolist() == [row not in wrong for row in range(40)]
    paths = greedy_paths(model, trees)
    assert [
        p == list(e.path) for p, e in zip(paths, trees.examples(), strict=True)
    ] == correct.tolist()


def test_teacher_forced_equals_greedy_on_a_trained_model(trained):
    out, _ = trained
    model = load_tree_model(out).model
    trees = heldout_trees(TreeTaskConfig(n_nodes=N, heldout_fraction=0.05), 20, seed=3)
    correct, _, _ = path_correct(model, trees)
    paths = greedy_paths(model, trees)
    assert [
        p == list(e.path) for p, e in zip(paths, trees.examples(), strict=True)
    ] == correct.tolist()
    accuracy = evaluate_accuracy(model, trees)
    assert accuracy.overall == pytest.approx(float(correct.float().mean()))
    assert sum(accuracy.counts.values()) == len(trees)


def test_checkpoint_round_trip_and_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(TINY, seed=2).eval()
    folder = save_tree_model(model, TINY, TreeTaskConfig(n_nodes=N), tmp_path / "ckpt")
    tokens = encode_batch(generate_trees(N, 4, 1))[:, :-1]
    expected = model(input_ids=tokens).logits
    loaded = load_tree_model(folder)
    assert loaded.config == TINY
    assert torch.allclose(loaded.model(input_ids=tokens).logits, expected, atol=1e-6)
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert torch.allclose(plain(input_ids=tokens).logits, expected, atol=1e-6)


def test_checkpoint_of_another_config_is_refused(tmp_path):
    folder = save_tree_model(build_model(TINY), TINY, TreeTaskConfig(n_nodes=N), tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="n_layers: expected 3, found 2"):
        load_tree_model(folder, expect=TINY.model_copy(update={"n_layers": 3}))
    with pytest.raises(ConfigError, match="another model config"):
        load_tree_model(folder, expect="paper")
    meta_file = folder / "tree_model.json"
    meta = json.loads(meta_file.read_text())
    meta["model"]["d_model"] = 64
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="does not match the model config"):
        load_tree_model(folder)
    with pytest.raises(DataError, match="not a tree model checkpoint"):
        load_tree_model(tmp_path / "nothing")


def test_shipped_checkpoint_name_resolves_to_the_package_folder(tmp_path, monkeypatch):
    from mechunlearn.reasoning import model as model_module

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(model_module, "shipped_checkpoint_folder", lambda: empty)
    with pytest.raises(DataError, match="no shipped tree checkpoint"):
        load_tree_model("shipped")
    result = CliRunner().invoke(app, ["tree", "train", "--config", "shipped", "--quiet"])
    assert result.exit_code == 2 and "ships no tree recipe" in result.output
    folder = save_tree_model(build_model(TINY), TINY, TreeTaskConfig(n_nodes=N), tmp_path / "pkg")
    monkeypatch.setattr(model_module, "shipped_checkpoint_folder", lambda: folder)
    assert load_tree_model("shipped").config == TINY


def test_the_shipped_checkpoint_solves_held_out_trees_and_its_recipe_is_its_own():
    import yaml

    from mechunlearn.reasoning.model import SHIPPED_RECIPE, shipped_checkpoint_folder

    loaded = load_tree_model("shipped")
    assert loaded.config.n_layers < loaded.task.max_path_length  # the depth-bound regime
    assert loaded.meta["accuracy"]["overall"] >= 0.99  # measured at training time, 3,500 trees
    trees = heldout_trees(loaded.task, 40, seed=7)  # a fresh held-out sample, not the same one
    assert evaluate_accuracy(loaded.model, trees, 512).overall >= 0.98
    recipe = TreeTrainConfig.model_validate(
        yaml.safe_load((shipped_checkpoint_folder() / SHIPPED_RECIPE).read_text())
    )
    assert recipe.model_dump(mode="json") == loaded.meta["recipe"]


def test_config_errors():
    with pytest.raises(ConfigError, match="differs from task.n_nodes"):
        TreeTrainConfig(model=TINY, task=TreeTaskConfig(n_nodes=7))
    with pytest.raises(ConfigError, match="too small"):
        TreeModelConfig(n_nodes=2)
    with pytest.raises(ConfigError, match="divisible"):
        TreeModelConfig(d_model=30, n_heads=4)
    config = tiny_config(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, config) == pytest.approx(3e-4)
    assert lr_at(10, config) == pytest.approx(3e-3)
    assert lr_at(100, config) == pytest.approx(3e-4)


def test_resume_is_exact_and_checks_the_config(tmp_path):
    config = tiny_config(steps=20, checkpoint_every=10)
    straight = train_tree_model(config, tmp_path / "a", progress=False)
    half = tmp_path / "b"
    partial = train_tree_model(config, half, progress=False, until=10)
    assert partial.steps == 10 and partial.accuracy is None and not (half / "model").exists()
    assert json.loads((half / "state" / "state.json").read_text())["step"] == 10
    resumed = train_tree_model(config, half, resume=True, progress=False)
    assert resumed.steps == 20
    assert resumed.history["loss"] == straight.history["loss"]
    a = load_tree_model(tmp_path / "a").model.state_dict()
    b = load_tree_model(half).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="cannot resume .*lr: saved 0.003"):
        train_tree_model(tiny_config(steps=20, lr=1e-3), half, resume=True, progress=False)


def test_unfinished_run_exports_its_state(tmp_path):
    config = tiny_config(steps=20, checkpoint_every=10)
    run = tmp_path / "run"
    train_tree_model(config, run, progress=False, until=10)
    result = CliRunner().invoke(
        app,
        ["tree", "export", "--run", str(run), "--out", str(tmp_path / "ck"), "--per-length", "4"],
    )
    assert result.exit_code == 0, result.output
    exported = load_tree_model(tmp_path / "ck")
    assert exported.meta["step"] == 10 and 0 <= exported.meta["accuracy"]["overall"] <= 1
    saved = load_file(str(run / "state" / "model.safetensors"))
    assert all(torch.equal(exported.model.state_dict()[k], v) for k, v in saved.items())
    result = CliRunner().invoke(
        app, ["tree", "export", "--run", str(tmp_path / "none"), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and "no readable training state" in result.output
    assert not (tmp_path / "x").exists()


def test_cli_train_and_eval(tmp_path):
    import yaml

    config = tmp_path / "tree.yaml"
    config.write_text(yaml.safe_dump(tiny_config(steps=10).model_dump(mode="json")))
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        ["tree", "train", "--config", str(config), "--out", str(out), "--quiet", "--steps", "6"],
    )
    assert result.exit_code == 0, result.output
    assert "path accuracy" in result.output and (out / "model" / "model.safetensors").is_file()
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6
    saved = tmp_path / "eval" / "seed3.json"
    args = ["tree", "eval", "--checkpoint", str(out), "--per-length", "5", "--seed", "3"]
    result = runner.invoke(app, [*args, "--out", str(saved)])
    assert result.exit_code == 0, result.output
    assert "overall" in result.output and "backward" in result.output
    record = json.loads(saved.read_text())
    assert record["seed"] == 3 and record["per_length"] == 5 and record["edge_order"] == "mixed"
    accuracy = record["accuracy"]
    assert sum(accuracy["counts"].values()) == 5 * len(accuracy["by_length"])
    assert f"overall {accuracy['overall']:.4f}" in result.output
    distinct = record["distinct_trees"]  # JSON keys are strings
    assert set(distinct) == {str(length) for length in accuracy["counts"]}
    assert all(1 <= count <= 5 for count in distinct.values())
    assert "distinct trees (structure and goal) by path length: 1: " in result.output
    result = runner.invoke(app, ["tree", "eval", "--checkpoint", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not a tree model checkpoint" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {n_nodes: 2}\ntask: {n_nodes: 2}\n")
    result = runner.invoke(app, ["tree", "train", "--config", str(bad), "--out", str(out)])
    assert result.exit_code == 2 and "too small" in result.output


def test_curriculum_caps_path_lengths_then_releases_them(tmp_path):
    from mechunlearn.reasoning.train import training_batch
    from mechunlearn.reasoning.trees import training_trees

    config = tiny_config(
        curriculum=[{"until": 3, "max_path_length": 1}, {"until": 5, "max_path_length": 3}]
    )
    assert [config.max_path_length_at(s) for s in (0, 2, 3, 4, 5, 99)] == [1, 1, 3, 3, None, None]
    lengths = {
        step: training_trees(config.task, 64, 0, step, config.max_path_length_at(step)).path_length
        for step in (0, 4, 7)
    }
    assert int(lengths[0].max()) == 1 and int(lengths[4].max()) == 3
    assert int(lengths[7].max()) == N - 1
    tokens, mask = training_batch(config, 0)
    assert int(mask.sum(1).max()) == 1  # one predicted token per tree while paths have one edge
    with pytest.raises(ConfigError, match="increasing"):
        tiny_config(
            curriculum=[{"until": 5, "max_path_length": 1}, {"until": 3, "max_path_length": 2}]
        )
    with pytest.raises(ConfigError, match="exceeds"):
        tiny_config(curriculum=[{"until": 5, "max_path_length": N}])
    # a state saved before the curriculum field existed still resumes with the default
    run = tmp_path / "old"
    train_tree_model(tiny_config(steps=20, checkpoint_every=10), run, progress=False, until=10)
    state_file = run / "state" / "state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["curriculum"]
    state_file.write_text(json.dumps(state))
    assert train_tree_model(tiny_config(steps=20), run, resume=True, progress=False).steps == 20


def test_extend_continues_a_run_with_a_longer_schedule(tmp_path):
    from mechunlearn.reasoning.train import lr_at

    run = tmp_path / "run"
    train_tree_model(tiny_config(steps=10, checkpoint_every=5), run, progress=False, until=5)
    longer = tiny_config(steps=30, checkpoint_every=5)
    with pytest.raises(ConfigError, match="needs extend"):
        train_tree_model(longer, run, resume=True, progress=False)
    with pytest.raises(ConfigError, match="needs resume"):
        train_tree_model(longer, run, extend=True, progress=False)
    result = train_tree_model(longer, run, resume=True, extend=True, progress=False)
    assert result.steps == 30
    logged = dict(zip(result.history["step"], result.history["lr"], strict=True))
    assert logged[10] == pytest.approx(lr_at(9, longer))  # the stretched schedule...
    assert logged[10] != pytest.approx(lr_at(9, tiny_config(steps=10)))  # ...not the old one
    meta = load_tree_model(run).meta
    assert meta["schedule_extensions"] == [{"at_step": 5, "from_steps": 10, "to_steps": 30}]
    with pytest.raises(ConfigError, match="already at step 30"):
        train_tree_model(tiny_config(steps=20), run, resume=True, extend=True, progress=False)
    saved = json.loads((run / "state" / "state.json").read_text())["config"]
    assert saved["schedule_restarts"] == [[5, 10]]


def test_schedule_restarts_train_an_extended_run_in_one_go(tmp_path):
    extended = tmp_path / "extended"
    train_tree_model(tiny_config(steps=10, checkpoint_every=5), extended, progress=False)
    two_parts = train_tree_model(
        tiny_config(steps=20, checkpoint_every=5), extended, resume=True, extend=True,
        progress=False,
    )  # fmt: skip
    recipe = tiny_config(steps=20, checkpoint_every=5, schedule_restarts=[[10, 10]])
    one_go = train_tree_model(recipe, tmp_path / "one_go", progress=False)
    assert one_go.history["lr"] == two_parts.history["lr"]
    assert (
        one_go.history["lr"]
        != train_tree_model(tiny_config(steps=20), tmp_path / "plain", progress=False).history["lr"]
    )
    a = load_file(str(extended / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "one_go" / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    # the extended run's saved config is that recipe; resuming it with the recipe agrees
    saved = json.loads((extended / "state" / "state.json").read_text())["config"]
    assert saved["schedule_restarts"] == [[10, 10]]
    again = train_tree_model(recipe, extended, resume=True, progress=False)  # nothing to train
    assert again.steps == 20 and again.sequences_per_s == pytest.approx(
        20 * recipe.batch_size / again.seconds
    )  # the whole run's rate, not 0
    with pytest.raises(ConfigError, match="schedule_restarts"):
        train_tree_model(
            tiny_config(steps=20, schedule_restarts=[[12, 12]]), extended, resume=True,
            progress=False,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="schedule_restarts"):
        tiny_config(steps=20, schedule_restarts=[[10, 5]])
    with pytest.raises(ConfigError, match="schedule_restarts"):
        tiny_config(steps=20, schedule_restarts=[[20, 20]])


def test_tree_train_takes_its_model_preset_as_preset():
    """--model is a model spec in every other command; tree train's preset is --preset."""
    result = CliRunner().invoke(app, ["tree", "train", "--model", "paper", "--quiet"])
    assert result.exit_code == 2 and "No such option: --model" in result.output
    result = CliRunner().invoke(app, ["tree", "train", "--help"])
    assert "--preset" in result.output


def test_shipped_recipes_resolve_by_name_and_are_valid_recipes(tmp_path):
    import yaml

    from mechunlearn.reasoning.shipped_recipes import resolve_recipe, shipped_recipes

    recipes = shipped_recipes()
    assert {
        "depth-n5-3layers",
        "depth-n8-4layers",
        "depth-n8-6layers",
        "depth-n8-7layers",
        "depth-n8-8layers",
        "paper-n16",
    } <= set(recipes)
    for name, path in recipes.items():
        assert resolve_recipe(name) == path
        recipe = TreeTrainConfig.model_validate(yaml.safe_load(path.read_text()))
        assert recipe.task.n_nodes == recipe.model.n_nodes
    mine = tmp_path / "depth-n8-4layers"  # an existing file wins over a shipped name
    mine.write_text("steps: 10\n")
    assert resolve_recipe(mine) == mine
    with pytest.raises(ConfigError, match="neither a file nor a shipped recipe.*depth-n8-6layers"):
        resolve_recipe("depth-n8-99layers")
    result = CliRunner().invoke(app, ["tree", "train", "--config", "nope", "--quiet"])
    assert result.exit_code == 2 and "neither a file nor a shipped recipe" in result.output


def test_named_shipped_checkpoints_load_by_name(tmp_path, monkeypatch):
    from mechunlearn.reasoning import model as model_module
    from mechunlearn.reasoning.analysis.run import TreeAnalysisConfig, analyze_checkpoint

    root = tmp_path / "checkpoints"
    save_tree_model(build_model(TINY), TINY, TreeTaskConfig(n_nodes=N), root / "depth-tiny")
    (root / "not-a-model").mkdir()
    monkeypatch.setattr(model_module, "named_checkpoints_root", lambda: root)
    assert set(model_module.named_checkpoint_folders()) == {"shipped", "depth-tiny"}
    assert load_tree_model("depth-tiny").config == TINY
    with pytest.raises(DataError, match=r"nor the name of a shipped one \(shipped, depth-tiny\)"):
        load_tree_model("not-a-model")
    out = tmp_path / "analysis"
    analyze_checkpoint("depth-tiny", out, TreeAnalysisConfig(n_trees=16, per_length=2))
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["checkpoint"].startswith("the shipped checkpoint 'depth-tiny'")


def test_every_named_shipped_checkpoint_solves_trees_and_matches_its_recipe():
    """A checkpoint shipped under ``reasoning/checkpoints/<name>`` was trained by the shipped
    recipe of the same name (the recipe reproduces it) and still solves fresh held-out trees."""
    import yaml

    from mechunlearn.reasoning.model import SHIPPED, named_checkpoint_folders
    from mechunlearn.reasoning.shipped_recipes import shipped_recipes

    named = {k: v for k, v in named_checkpoint_folders().items() if k != SHIPPED}
    assert "depth-n8-6layers" in named
    recipes = shipped_recipes()
    for name in named:
        loaded = load_tree_model(name)
        recipe = TreeTrainConfig.model_validate(yaml.safe_load(recipes[name].read_text()))
        assert recipe.model_dump(mode="json") == loaded.meta["recipe"], name
        assert loaded.meta["accuracy"]["overall"] >= 0.99, name
        trees = heldout_trees(loaded.task, 20, seed=11)
        assert evaluate_accuracy(loaded.model, trees, 512).overall >= 0.98, name
