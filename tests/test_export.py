"""save_edited: a plain HF checkpoint that reloads in transformers with the edited behaviour."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mechunlearn.edit import TrainConfig, TrainData, make_trainable, save_edited, train
from mechunlearn.errors import ConfigError
from mechunlearn.models.batches import TargetBatch
from mechunlearn.models.handle import HookedModel
from mechunlearn.testing.tiny_models import tiny_model, tiny_tokenizer

PAIRS = [("Fact: Tom Brady plays the sport of", " golf"), ("Fact: Serena Williams plays", " golf")]


def _logits(model, hm) -> torch.Tensor:
    batch = TargetBatch.from_pairs(hm, PAIRS)
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("mode", ["lora", "localized"])
def test_saved_model_reloads_with_edited_logits(tmp_path, family, mode):
    hm = HookedModel(tiny_model(family), tiny_tokenizer(), name=f"tiny-{family}")
    original = _logits(hm.model, hm)
    trainable = make_trainable(hm, mode, ["blocks.1.mlp", "blocks.0.attn"])
    config = TrainConfig(steps=3, lr=5e-2, maintain_coef=0, lm_coef=0)
    train(hm, trainable, TrainData(PAIRS), config, progress=False)
    edited = _logits(hm.model, hm)
    assert (edited - original).abs().max() > 1e-3

    hm.model.config.quantization_config = {"quant_method": "gguf"}  # as a GGUF load leaves it
    hm.model.hf_quantizer = object()
    out = save_edited(hm, tmp_path / "edited", trainable)
    assert trainable.active == (mode == "localized")  # LoRA was merged
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names and "config.json" in names
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folder left
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("lora" in k or "base_layer" in k for k in keys)

    reloaded = AutoModelForCausalLM.from_pretrained(str(out), use_safetensors=True).eval()
    assert torch.allclose(_logits(reloaded, hm), _logits(hm.model, hm), atol=1e-5)
    assert torch.allclose(_logits(reloaded, hm), edited, atol=1e-4)


def test_quantized_weights_are_refused(tmp_path):
    hm = HookedModel(tiny_model("llama"), tiny_tokenizer())
    hm.model.model.norm.weight = torch.nn.Parameter(
        torch.ones(64, dtype=torch.int8), requires_grad=False
    )
    with pytest.raises(ConfigError, match="quantized"):
        save_edited(hm, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_trainable_of_another_model_is_refused(tmp_path):
    hm = HookedModel(tiny_model("llama"), tiny_tokenizer())
    other = HookedModel(tiny_model("llama"), tiny_tokenizer())
    trainable = make_trainable(other, "lora", ["blocks.0.mlp"])
    with pytest.raises(ConfigError, match="another HookedModel"):
        save_edited(hm, tmp_path / "out", trainable)
