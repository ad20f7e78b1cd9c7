"""Shared fixtures: tiny random models of every supported family, and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.set_num_threads(1)

from mechunlearn.models.handle import HookedModel  # noqa: E402
from mechunlearn.testing.tiny_models import TINY_CONFIGS, tiny_model, tiny_tokenizer  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FAMILIES = list(TINY_CONFIGS)
# The tiny-model fixtures live here; MECHUNLEARN_TEST_DEVICE=cuda runs them on a GPU
# (scripts/gpu_check.sh), so that the hook layer and trainers are exercised off the CPU.
TEST_DEVICE = torch.device(os.environ.get("MECHUNLEARN_TEST_DEVICE", "cpu"))


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny(family) -> HookedModel:
    return HookedModel(tiny_model(family).to(TEST_DEVICE), tiny_tokenizer(), name=f"tiny-{family}")


@pytest.fixture
def tiny_llama() -> HookedModel:
    return HookedModel(tiny_model("llama").to(TEST_DEVICE), tiny_tokenizer(), name="tiny-llama")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture
def saved_llama(tmp_path) -> Path:
    """A tiny llama saved as a local Hugging Face checkpoint folder (safetensors + tokenizer)."""
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
