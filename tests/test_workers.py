"""Parallel workers: a run in two worker processes gives the results of the in-process run, and a
``--workers 2`` run whose parent is SIGKILLed resumes with no lost unit to the same summary."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mechunlearn.experiments.edit_job import plan_units, run_experiment
from mechunlearn.experiments.workers import Unit, run_units
from tests.test_experiment_run import tiny_config


def _without_seconds(value):
    """Wall-clock numbers differ between any two runs; everything else must not."""
    if isinstance(value, dict):
        return {k: _without_seconds(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_without_seconds(v) for v in value]
    return value


def _summary(folder: Path):
    return _without_seconds(json.loads((folder / "summary.json").read_text()))


def _config(saved_llama):
    return tiny_config(saved_llama, seeds=[0])


def test_units_form_the_expected_graph(saved_llama):
    units = {u.key: u for u in plan_units(_config(saved_llama))}
    assert "localize/_budget" not in units  # the tiny config gives its budget
    assert units["sweep/random/r0p0"].deps == ("localize/random",)
    assert units["edit/random/seed0"].deps == ("localize/random", "sweep/random/r0p0")
    assert units["base/seed0"].deps == ()
    # ct_mlps is the first causal-tracing row, so it is traced itself
    assert units["localize/ct_mlps"].deps == ()


def test_halving_sweep_trains_a_third_and_keeps_the_best(saved_llama, tmp_path, monkeypatch):
    from mechunlearn.experiments.sweep import sweep_rungs

    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    config = _config(saved_llama).model_dump(mode="json")
    config["train"]["steps"] = 6
    config["sweep"] = {"lr": [1e-4, 1e-3, 1e-2], "selection": "halving"}
    config["localizations"] = [{"name": "all_mlps", "method": "all_mlps"}]
    config["evaluation"] |= {"relearn": None, "soft_prompt": None}
    from mechunlearn.experiments.config import validate_config
    from mechunlearn.experiments.edit_config import ExperimentConfig

    cfg = validate_config(ExperimentConfig, config, "t")
    assert sweep_rungs(cfg.sweep, 3, 6) == [2]
    assert sweep_rungs(cfg.sweep.model_copy(update={"selection": "full"}), 3, 6) == [6]
    assert sweep_rungs(cfg.sweep, 9, 18) == [2, 6]
    later = cfg.sweep.model_copy(update={"rung_fraction": 0.65})  # the main job's: 13 of 20
    assert sweep_rungs(later, 3, 20) == [13] and sweep_rungs(later, 9, 18) == [8, 12]
    out = run_experiment(cfg, tmp_path / "run", progress=False)
    sweep = json.loads((out / "sweep" / "all_mlps.json").read_text())
    assert sweep["rung_steps"] == [2] and len(sweep["points"]) == 3
    best = max(sweep["points"], key=lambda p: (p["score"], -p["lr"]))
    assert sweep["chosen"]["lr"] == best["lr"]
    run = json.loads((out / "run.json").read_text())
    assert run["hyperparameters"]["all_mlps"]["lr"] == best["lr"]


def test_two_rung_halving_resumes_survivors_as_one_uninterrupted_run(
    saved_llama, tmp_path, monkeypatch
):
    """``rung_steps: [2, 4]``, ``eta: 2``: three points to step 2, the best two resume from
    their checkpoints to step 4 and end exactly where uninterrupted 4-step runs end; the
    checkpoints are gone afterwards."""
    import torch

    from mechunlearn.experiments import edit_job
    from mechunlearn.experiments.config import validate_config
    from mechunlearn.experiments.edit_config import ExperimentConfig
    from mechunlearn.experiments.sweep import sweep_point, sweep_rungs
    from mechunlearn.localize import Localization

    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    config = _config(saved_llama).model_dump(mode="json")
    config["train"]["steps"] = 6
    config["sweep"] = {
        "lr": [1e-4, 1e-3, 1e-2], "selection": "halving", "eta": 2, "rung_steps": [2, 4]
    }  # fmt: skip
    config["localizations"] = [{"name": "all_mlps", "method": "all_mlps"}]
    config["evaluation"] |= {"relearn": None, "soft_prompt": None}
    cfg = validate_config(ExperimentConfig, config, "t")
    assert sweep_rungs(cfg.sweep, 3, 6) == [2, 4]
    with pytest.raises(Exception, match="go past"):
        sweep_rungs(cfg.sweep.model_copy(update={"rung_steps": [2, 8]}), 3, 6)
    with pytest.raises(Exception, match="increasing"):
        validate_config(ExperimentConfig, {**config, "sweep": {"rung_steps": [4, 4]}}, "t")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = run_experiment(cfg, tmp_path / "run", progress=False)
        sweep = json.loads((out / "sweep" / "all_mlps.json").read_text())
        assert sweep["rung_steps"] == [2, 4]
        second = [p for p in sweep["points"] if p["rung"] == 1]
        assert len(second) == 2 and all(p["steps"] == 4 for p in second)
        assert [p["resumed_at"] for p in sweep["points"]] == [0, 0, 0, 2, 2]
        assert not (out / "units" / "sweep-checkpoints").exists()
        # each survivor ends where an uninterrupted 4-step run of its point ends
        ctx = edit_job.build_context(out)
        loc = Localization.load(out / "localizations" / "all_mlps.json")
        data = edit_job.train_data(ctx.config, ctx.validation, ctx.text_train)
        for point in second:
            again = sweep_point(
                ctx.hm, ctx.config.localizations[0], loc, ctx.validation, data, ctx.config,
                ctx.base_retain, point["lr"], point["forget_coef"], stop_after=4,
            )  # fmt: skip
            assert again["final_loss"] == pytest.approx(point["final_loss"], rel=1e-5)
            assert again["score"] == point["score"]
    finally:
        torch.set_num_threads(threads)


def test_a_failing_unit_names_itself(tmp_path):
    units = [Unit("a", "x", "a.json"), Unit("b", "x", "b.json", deps=("a",))]
    with pytest.raises(ZeroDivisionError):
        run_units(tmp_path, units, make_context=lambda _: None, executor=_fail_on_b, workers=1)
    assert (tmp_path / "a.json").is_file() and not (tmp_path / "b.json").exists()


def _fail_on_b(_, unit):
    if unit.key == "b":
        raise ZeroDivisionError("b")
    return {"ok": unit.key}


@pytest.mark.slow
def test_sigkilled_worker_run_resumes_to_the_same_summary(saved_llama, tmp_path, monkeypatch):
    """The parent of a ``--workers 2`` run is SIGKILLed once some units are done; its workers
    die with it, the resumed run redoes nothing finished, and the summary equals an
    uninterrupted in-process run's (wall-clock numbers aside)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(cache))
    config = _config(saved_llama)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every worker: float sums then agree bit for bit
    try:
        reference = run_experiment(config, tmp_path / "reference", progress=False)
    finally:
        torch.set_num_threads(threads)

    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    out = tmp_path / "killed"
    partial = tmp_path / "killed.partial"
    command = [sys.executable, "-m", "mechunlearn", "run", str(config_file), "--out", str(out)]
    env = {**os.environ, "MECHUNLEARN_CACHE": str(cache)}
    parent = subprocess.Popen(
        [*command, "--workers", "2", "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        edits = partial / "units" / "edit"
        done = list(edits.glob("*/seed0.json")) if partial.exists() else []
        if len(done) >= 2 or parent.poll() is not None:
            break
        time.sleep(0.05)
    assert parent.poll() is None, f"the run ended before it was killed: {parent.stderr.read()}"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    time.sleep(3)  # workers die with their parent: nothing is written after this
    finished = sorted(p.relative_to(partial) for p in partial.rglob("*.json"))
    time.sleep(2)
    assert sorted(p.relative_to(partial) for p in partial.rglob("*.json")) == finished
    assert not out.exists()
    kept = {p: (partial / p).read_text() for p in finished if p.parts[0] == "units"}
    assert kept, "no unit had finished"

    resumed = subprocess.run(
        [*command, "--workers", "2", "--resume", "--quiet"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr
    for path, text in kept.items():  # finished units were kept, not redone
        assert (out / path).read_text() == text
    assert _summary(out) == _summary(reference)
    run = json.loads((out / "run.json").read_text())
    assert run["workers"] == 2
    # the killed part recorded nothing; the resumed part ran only the units left
    units = plan_units(config)
    n_done = sum(Path(u.path) in set(finished) for u in units)
    assert run["parts"][-1]["units_run"] == len(units) - n_done > 0
    timeline = run["parts"][-1]["timeline"]
    assert len(timeline) == len(units) - n_done
    assert {t["worker"] for t in timeline.values()} == {0, 1}
    starts = [t["start"] for t in timeline.values()]
    assert starts == sorted(starts) and starts[0] == 0


def test_idle_cores_come_from_cpu_time_sampled_now(monkeypatch):
    """The default worker count subtracts what other work uses *now* (CPU time over a short
    sample), not the 1-minute load average, which after an install still counts the finished
    pip; without /proc/stat it falls back to the load average."""
    from mechunlearn.experiments import workers

    samples = iter([(100, 1000), (150, 1100)])  # half the CPU time busy during the sample
    monkeypatch.setattr(workers, "_cpu_times", lambda: next(samples))
    monkeypatch.setattr(workers.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(workers.os, "getloadavg", lambda: (3.9, 0.0, 0.0))
    monkeypatch.setattr(workers.time, "sleep", lambda s: None)
    monkeypatch.setattr(workers.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert workers.busy_cores() == pytest.approx(2.0)
    samples = iter([(100, 1000), (150, 1100)])
    assert workers.idle_cores() == 2  # the load average (3.9) would have said 1
    monkeypatch.setattr(workers, "_cpu_times", lambda: None)
    assert workers.busy_cores() == 3.9 and workers.idle_cores() == 1


def test_a_twin_trains_with_the_hyperparameters_chosen_for_its_row(
    saved_llama, tmp_path, monkeypatch
):
    """``hyperparameters_from``: no sweep of its own, its edits wait for the other row's sweep
    and train with its choice (a row and its LAT variant differ only in the adversary)."""
    from mechunlearn.errors import ConfigError
    from mechunlearn.experiments.config import validate_config
    from mechunlearn.experiments.edit_config import ExperimentConfig

    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    config = _config(saved_llama).model_dump(mode="json")
    config["sweep"] = {"lr": [1e-5, 1e-2], "forget_coef": [1.0]}
    config["localizations"] = [
        {"name": "all_mlps", "method": "all_mlps"},
        {
            "name": "all_mlps_lat",
            "method": "all_mlps",
            "hyperparameters_from": "all_mlps",
            "latent_adversary": {"layers": [0], "epsilon": 0.5, "steps": 1},
        },
    ]
    config["evaluation"] |= {"relearn": None, "soft_prompt": None, "probes": False}
    cfg = validate_config(ExperimentConfig, config, "t")
    units = {u.key: u for u in plan_units(cfg)}
    assert not any(k.startswith("sweep/all_mlps_lat") for k in units)
    assert units["edit/all_mlps_lat/seed0"].deps == (
        "localize/all_mlps_lat", "sweep/all_mlps/r0p0", "sweep/all_mlps/r0p1",
    )  # fmt: skip
    out = run_experiment(cfg, tmp_path / "run", progress=False)
    chosen = json.loads((out / "run.json").read_text())["hyperparameters"]
    assert chosen["all_mlps_lat"] == chosen["all_mlps"]
    assert (out / "sweep" / "all_mlps.json").is_file()
    assert not (out / "sweep" / "all_mlps_lat.json").exists()
    assert "## Twins" in (out / "results.md").read_text()  # the twin minus its row, paired
    twins = json.loads((out / "claims.json").read_text())["twins"]
    assert twins and {(r["twin"], r["other"]) for r in twins} == {("all_mlps_lat", "all_mlps")}
    for bad, message in [
        ("nowhere", "names no other localization"),
        ("all_mlps_lat", "names no other localization"),
    ]:
        broken = json.loads(json.dumps(config))
        broken["localizations"][1]["hyperparameters_from"] = bad
        with pytest.raises(ConfigError, match=message):
            validate_config(ExperimentConfig, broken, "t")
    chained = json.loads(json.dumps(config))
    chained["localizations"].append(
        {"name": "third", "method": "all_mlps", "hyperparameters_from": "all_mlps_lat"}
    )
    with pytest.raises(ConfigError, match="name the row that is swept"):
        validate_config(ExperimentConfig, chained, "t")
