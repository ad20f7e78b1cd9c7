"""The trainer on tiny models: loss terms, schedule, seeds, checkpoint/resume, two processes."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import torch
from safetensors.torch import load_file

from mechunlearn.edit import (
    LoraOptions,
    TrainConfig,
    TrainData,
    fact_pairs,
    lr_factor,
    make_trainable,
    sequence_logprobs,
    train,
)
from mechunlearn.edit import engine as engine_module
from mechunlearn.edit import trainer as trainer_module
from mechunlearn.edit.engine import with_changes
from mechunlearn.edit.trainer import BatchStream
from mechunlearn.errors import ConfigError, DataError
from mechunlearn.models.batches import TargetBatch
from mechunlearn.models.handle import HookedModel
from mechunlearn.tasks.general_text import load_general_text
from mechunlearn.tasks.records import FactRecord
from mechunlearn.tasks.sports import load_sports
from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

RECORDS = load_sports()
FORGET = [(r.prompt(), " golf") for r in RECORDS[:6]]
RETAIN = fact_pairs(RECORDS[6:18])
TEXTS = load_general_text()[:6]
SCRIPT = Path(__file__).parent / "scripts" / "train_two_processes.py"


def _fresh() -> HookedModel:
    return HookedModel(tiny_model("llama"), tiny_tokenizer(), name="tiny-llama")


def _logprob(hm, pairs) -> torch.Tensor:
    with torch.no_grad():
        return sequence_logprobs(hm, TargetBatch.from_pairs(hm, pairs))


def _run(hm, data, mode="localized", components=("blocks.1.mlp",), **cfg):
    trainable = make_trainable(hm, mode, components)
    config = TrainConfig(**{"steps": 8, "lr": 1e-2, "batch_size": 6, **cfg})
    result = train(hm, trainable, data, config, progress=False)
    return trainable, result


# ---- data ------------------------------------------------------------------------------
def test_fact_pairs_prompts_and_targets():
    record = RECORDS[0]
    assert fact_pairs([record]) == [(record.prompt(), " " + record.answer)]
    ((prompt, cont),) = fact_pairs([record], prompt="completion")
    assert prompt == "Fact: Tiger Woods plays the sport of golf\n" + record.prompt()
    edited = record.model_copy(update={"new_answer": "tennis"})
    assert fact_pairs([edited], target="new_answer") == [(record.prompt(), " tennis")]
    with pytest.raises(DataError, match="no new_answer"):
        fact_pairs([record], target="new_answer")


def test_train_data_validation():
    with pytest.raises(DataError, match="no forget pairs"):
        TrainData([]).validate()
    with pytest.raises(DataError, match="both forget and retain"):
        TrainData(FORGET, [(FORGET[0][0], " baseball")]).validate()
    assert TrainData(FORGET, RETAIN, TEXTS).validate().forget == FORGET


# ---- schedule and batches --------------------------------------------------------------
def test_lr_factor_values():
    assert [lr_factor(s, 10, warmup=2) for s in (0, 1, 2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lr_factor(6, 10, warmup=2) == pytest.approx(0.5)
    assert lr_factor(9, 10, warmup=2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lr_factor(0, 4) == 1.0
    assert [lr_factor(s, 5, warmup=1, schedule="constant") for s in range(5)] == [0.5, 1, 1, 1, 1]
    with pytest.raises(ConfigError, match="unknown schedule"):
        lr_factor(3, 5, schedule="linear")


def test_history_lr_follows_the_schedule(tiny_llama):
    _, result = _run(tiny_llama, TrainData(FORGET), steps=6, warmup_steps=2, lr=0.1)
    expected = [0.1 * lr_factor(s, 6, 2) for s in range(6)]
    assert result.history["lr"] == pytest.approx(expected)


def test_on_step_sees_every_step_in_eval_mode(tiny_llama):
    seen = []
    trainable = make_trainable(tiny_llama, "localized", ["blocks.1.mlp"])
    config = TrainConfig(steps=4, lr=1e-2, batch_size=6)

    def record(done, values):
        seen.append((done, tiny_llama.model.training, round(values["loss"], 6)))

    result = train(tiny_llama, trainable, TrainData(FORGET), config, progress=False, on_step=record)
    assert [d for d, _, _ in seen] == [1, 2, 3, 4]
    assert not any(training for _, training, _ in seen)
    assert [v for _, _, v in seen] == [round(v, 6) for v in result.history["loss"]]


def test_batch_stream_covers_every_example_each_pass():
    stream = BatchStream(n=5, batch_size=2, seed=0)
    drawn = [i for _ in range(5) for i in stream.next()]  # 10 = two passes
    assert sorted(drawn[:5]) == list(range(5)) and sorted(drawn[5:]) == list(range(5))
    assert drawn[:5] != drawn[5:]  # reshuffled
    assert BatchStream(n=3, batch_size=8, seed=0).next().__len__() == 3


# ---- loss terms ------------------------------------------------------------------------
def test_edit_objective_raises_p_new_and_trains_only_selected(tiny_llama):
    hm = tiny_llama
    before_p = _logprob(hm, FORGET)
    before = {n: p.detach().clone() for n, p in hm.model.named_parameters()}
    trainable, result = _run(hm, TrainData(FORGET), steps=10)
    assert (_logprob(hm, FORGET) - before_p).min() > 1.0  # every new answer is more likely
    assert result.history["forget"][-1] < result.history["forget"][0]
    selected = set(trainable.named_params())
    assert selected == {
        f"model.layers.1.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")
    }
    for name, p in hm.model.named_parameters():
        assert torch.equal(p, before[name]) != (name in selected), name
    trainable.restore()


def test_maintain_term_protects_retain_facts():
    def retain_nll(maintain_coef):
        hm = _fresh()
        _run(
            hm,
            TrainData(FORGET, RETAIN),
            steps=10,
            maintain_coef=maintain_coef,
            retain_batch_size=12,
            lm_coef=0,
        )
        return -_logprob(hm, RETAIN).mean()

    start = -_logprob(_fresh(), RETAIN).mean()
    with_maintain, without = retain_nll(1.0), retain_nll(0.0)
    assert with_maintain < start - 1.0
    assert with_maintain < without - 1.0


def test_lm_term_reduces_lm_loss(tiny_llama):
    from mechunlearn.evals.lm_loss import lm_loss

    hm = tiny_llama
    before = lm_loss(hm, TEXTS)["loss"]
    _, result = _run(
        hm,
        TrainData(FORGET, general_text=TEXTS),
        forget_coef=0,
        steps=10,
        components=("blocks.1.mlp", "unembed"),
        lm_batch_size=6,
    )
    assert set(result.history) == {"loss", "lm", "lr", "grad_norm", "seconds"}
    assert lm_loss(hm, TEXTS)["loss"] < before - 0.3


def test_terms_without_data_or_weight_are_left_out(tiny_llama):
    _, result = _run(tiny_llama, TrainData(FORGET, RETAIN), steps=2, maintain_coef=0.0)
    assert set(result.history) == {"loss", "forget", "lr", "grad_norm", "seconds"}
    assert result.history["loss"] == pytest.approx(result.history["forget"])


@pytest.mark.parametrize(
    "objective,options",
    [
        ("unlearn", {"floor": -100.0}),
        ("gradient_ascent", {}),
        ("grad_diff", {}),
        ("npo", {"beta": 0.5}),
    ],
)
def test_unlearning_objectives_lower_the_forgotten_answer(tiny_llama, objective, options):
    """(RMU acts on representations; tests/test_rmu.py checks it through the trainer.)"""
    hm = tiny_llama
    forget = fact_pairs(RECORDS[:6])
    before = _logprob(hm, forget)
    _, result = _run(
        hm,
        TrainData(forget, RETAIN),
        objective=objective,
        objective_options=options,
        steps=10,
        lm_coef=0,
        maintain_coef=0,
        components=("blocks.0.mlp", "blocks.1.mlp"),
    )
    assert (_logprob(hm, forget) - before).mean() < -0.5
    assert len(result.history["forget"]) == 10


def test_npo_references_come_from_the_unedited_model(tiny_llama, monkeypatch):
    """NPO's loss at step 0 is (2/beta) * log 2 exactly: pi == pi_ref before any update."""
    _, result = _run(
        tiny_llama,
        TrainData(FORGET),
        objective="npo",
        objective_options={"beta": 0.2},
        steps=1,
        lm_coef=0,
    )
    assert result.history["forget"][0] == pytest.approx(2 / 0.2 * math.log(2), rel=1e-4)


def test_bad_configuration_errors(tiny_llama):
    hm = tiny_llama
    trainable = make_trainable(hm, "localized", ["blocks.0.mlp"])
    with pytest.raises(ConfigError, match="unknown objective 'nope'"):
        TrainConfig(objective="nope")
    with pytest.raises(pydantic.ValidationError):
        TrainConfig(step=3)
    hm.model.train()
    with pytest.raises(ConfigError, match="unknown option.*temperature.*known: beta"):
        train(
            hm,
            trainable,
            TrainData(FORGET),
            TrainConfig(objective="npo", objective_options={"temperature": 1}),
            progress=False,
        )
    assert hm.model.training  # the failed call left the mode as it found it
    hm.model.eval()
    with pytest.raises(DataError, match="grad_diff' needs retain"):
        train(hm, trainable, TrainData(FORGET), TrainConfig(objective="grad_diff"), progress=False)
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        train(hm, trainable, TrainData(FORGET), TrainConfig(checkpoint_every=2), progress=False)
    with pytest.raises(ConfigError, match="nothing to train"):
        train(hm, trainable, TrainData(FORGET), TrainConfig(forget_coef=0), progress=False)
    with pytest.raises(DataError, match="both forget and retain"):
        train(hm, trainable, TrainData(FORGET, [FORGET[1]]), TrainConfig(), progress=False)
    trainable.restore()
    with pytest.raises(ConfigError, match="restored or merged"):
        train(hm, trainable, TrainData(FORGET), TrainConfig(), progress=False)


def test_a_given_accelerator_is_left_reusable(tiny_llama):
    from accelerate import Accelerator

    on_cpu = tiny_llama.device.type == "cpu"
    engine_module._forget_single_process_state_on_another_device(tiny_llama.device)
    accelerator = Accelerator(cpu=on_cpu)
    for components in (["blocks.0.mlp"], ["blocks.1.mlp"]):
        trainable = make_trainable(tiny_llama, "localized", components)
        result = train(
            tiny_llama,
            trainable,
            TrainData(FORGET),
            TrainConfig(steps=2),
            accelerator=accelerator,
            progress=False,
        )
        trainable.restore()
        assert result.info == {
            "processes": 1,
            "forward_module": "LlamaForCausalLM",
            "objective": {},
            "resumed_at": 0,
            "adversary": None,  # no latent adversary, so no record of one
        }
    assert accelerator._models == [] and accelerator._optimizers == []
    assert tiny_llama.forward_module is None


# ---- reproducibility and checkpoints -----------------------------------------------------
def _lora_case(hm):
    trainable = make_trainable(
        hm, "lora", ["blocks.0.mlp", "blocks.1.attn"], LoraOptions(rank=4, dropout=0.2, seed=1)
    )
    data = TrainData(FORGET, RETAIN, TEXTS)  # more data than a batch: the streams matter
    config = TrainConfig(
        steps=6,
        lr=1e-2,
        batch_size=4,
        retain_batch_size=5,
        lm_batch_size=2,
        warmup_steps=1,
        weight_decay=0.01,
        seed=5,
    )
    return trainable, data, config


def _weights(trainable) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable.named_params().items()}


def test_same_seed_same_weights_other_seed_differs():
    runs = []
    for seed in (5, 5, 6):
        hm = _fresh()
        trainable, data, config = _lora_case(hm)
        train(hm, trainable, data, config.model_copy(update={"seed": seed}), progress=False)
        runs.append(_weights(trainable))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert any(not torch.equal(runs[0][n], runs[2][n]) for n in runs[0])


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path, monkeypatch):
    hm = _fresh()
    trainable, data, config = _lora_case(hm)
    reference = train(hm, trainable, data, config, progress=False)
    expected = _weights(trainable)

    config = config.model_copy(update={"checkpoint_every": 2})
    real_step, calls = trainer_module._train_step, []

    def crash_at_step_5(run, engine, step):
        calls.append(step)
        if step == 4:
            raise KeyboardInterrupt
        return real_step(run, engine, step)

    hm = _fresh()
    trainable, _, _ = _lora_case(hm)
    monkeypatch.setattr(trainer_module, "_train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(hm, trainable, data, config, checkpoint_dir=tmp_path, progress=False)
    monkeypatch.setattr(trainer_module, "_train_step", real_step)
    assert hm.forward_module is None and not hm.model.training  # cleaned up after the crash
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["step-000004"]

    hm = _fresh()  # a restarted process: fresh model, same setup
    trainable, _, _ = _lora_case(hm)
    logs: list[str] = []
    resumed = train(
        hm,
        trainable,
        data,
        config,
        checkpoint_dir=tmp_path,
        resume=True,
        progress=False,
        log=logs.append,
    )
    assert any("resumed" in line and "step 4" in line for line in logs)
    got = _weights(trainable)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    assert resumed.history["loss"] == reference.history["loss"]
    assert len(resumed.history["lr"]) == 6

    other = with_changes(config, lr=0.5)
    hm = _fresh()
    trainable, _, _ = _lora_case(hm)
    with pytest.raises(ConfigError, match="different run.*config"):
        train(hm, trainable, data, other, checkpoint_dir=tmp_path, resume=True, progress=False)


def test_checkpoint_tensors_load_without_pickle(tmp_path, tiny_llama):
    trainable = make_trainable(tiny_llama, "localized", ["blocks.2.mlp.down"])
    train(
        tiny_llama,
        trainable,
        TrainData(FORGET),
        TrainConfig(steps=2, checkpoint_every=1),
        checkpoint_dir=tmp_path,
        progress=False,
    )
    folder = tmp_path / "step-000002"
    params = load_file(str(folder / "params.safetensors"))
    assert list(params) == ["model.layers.2.mlp.down_proj.weight"]
    assert torch.equal(
        params["model.layers.2.mlp.down_proj.weight"], trainable.params[0].detach().cpu()
    )
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    assert state["state"][0]["step"].item() == 2
    assert json.loads((folder / "state.json").read_text())["step"] == 2


# ---- several processes -----------------------------------------------------------------
def _load_script():
    spec = importlib.util.spec_from_file_location("train_two_processes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_two_cpu_processes_train_identically_and_match_one_process(tmp_path):
    env = {**os.environ, "MECHUNLEARN_THREADS": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    meta = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [m["world"] for m in meta] == [2, 2]
    assert meta[0]["info"]["forward_module"] == "DistributedDataParallel"
    assert all(torch.equal(ranks[0][n], ranks[1][n]) for n in ranks[0])
    # each step's batches (retain, forget, LM: 4 rows each) were split between the ranks
    shards = [m["shards"] for m in meta]
    assert len(shards[0]) == len(shards[1]) == 3 * 4
    for mine, theirs in zip(*shards, strict=True):
        assert len(mine) == len(theirs) == 2 and sorted(mine + theirs) == [0, 1, 2, 3]
    loss = meta[0]["history"]["loss"]
    assert loss[-1] < loss[0] - 0.5 and meta[1]["history"]["loss"] == loss

    # one process on the whole batch: equal shard token counts make the updates the same
    hm, trainable, data, config = _load_script().case()
    start = {n: p.detach().clone() for n, p in trainable.named_params().items()}
    single = train(hm, trainable, data, config, progress=False)
    assert single.info["processes"] == 1
    assert single.history["loss"] == pytest.approx(loss, rel=1e-5)
    for name, p in trainable.named_params().items():
        moved = (p.detach() - start[name]).abs().max()
        assert moved > 1e-3
        close = (p.detach() - ranks[0][name]).abs() <= 1e-5
        assert close.float().mean() > 0.999, name  # Adam's sign-like first steps may flip ~0 grads


def test_batch_too_small_for_processes_is_rejected():
    config = TrainConfig(batch_size=1)
    data = TrainData(FORGET)
    with pytest.raises(ConfigError, match="cannot be split over 2 processes"):
        trainer_module._check_sizes(config, data, 2, {"forget": True})


def test_sports_new_answer_records_are_supported():
    record = FactRecord(
        id="x",
        subject="A",
        template="{subject} plays",
        answer="golf",
        options=("golf", "tennis"),
        new_answer="tennis",
    )
    assert fact_pairs([record], target="new_answer") == [("A plays", " tennis")]


def test_a_process_can_train_on_one_device_after_another():
    """accelerate's process-wide state is fixed by the first Accelerator; a single process
    that trains a GPU model and then a CPU one (or back) must not inherit the stale device.
    'meta' stands in for the other device on a CPU-only machine."""
    from accelerate import Accelerator
    from accelerate.state import PartialState

    forget = engine_module._forget_single_process_state_on_another_device
    forget(torch.device("cpu"))  # drops a GPU state an earlier test may have left
    Accelerator(cpu=True)
    forget(torch.device("cpu"))
    assert PartialState._shared_state["device"] == torch.device("cpu")  # same device: kept
    forget(torch.device("meta"))
    assert not PartialState._shared_state  # another device: dropped
    assert Accelerator(cpu=True).device == torch.device("cpu")  # and a fresh one works


def test_total_loss_is_the_coefficient_weighted_sum_of_the_terms():
    """Non-unit, pairwise different coefficients: a term weighted by another term's
    coefficient (or left unweighted) changes the recorded total and fails here."""
    hm = _fresh()
    trainable, data, config = _lora_case(hm)
    coefs = {"forget": 0.7, "maintain": 1.9, "lm": 0.3}
    config = with_changes(
        config,
        forget_coef=coefs["forget"],
        maintain_coef=coefs["maintain"],
        lm_coef=coefs["lm"],
    )
    history = train(hm, trainable, data, config, progress=False).history
    assert set(coefs) <= set(history)
    for step in range(config.steps):
        expected = sum(c * history[name][step] for name, c in coefs.items())
        assert history["loss"][step] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        # the terms are not all equal, so swapped coefficients would give another total
        swapped = (
            coefs["maintain"] * history["forget"][step]
            + coefs["forget"] * history["maintain"][step]
            + coefs["lm"] * history["lm"][step]
        )
        assert abs(swapped - expected) > 1e-4


def test_bf16_precision_trains_with_fp32_weights():
    hm = _fresh()
    trainable, data, config = _lora_case(hm)
    fp32 = train(hm, trainable, data, config, progress=False)
    hm = _fresh()
    trainable, data, config = _lora_case(hm)
    bf16 = train(hm, trainable, data, with_changes(config, precision="bf16"), progress=False)
    assert all(p.dtype == torch.float32 for p in trainable.params)
    # same data and seeds, lower-precision forwards: close, but not bit-identical
    assert bf16.history["loss"][0] == pytest.approx(fp32.history["loss"][0], rel=0.05)
    assert bf16.history["loss"] != fp32.history["loss"]
