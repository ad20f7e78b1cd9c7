"""Save an edited model as a plain Hugging Face checkpoint (safetensors + tokenizer).

The result loads with ``AutoModelForCausalLM.from_pretrained`` in plain transformers and
behaves like the edited model: LoRA adapters are merged first, and leftovers of a dequantized
load (a GGUF's ``quantization_config`` / ``hf_quantizer``) are dropped so the reloaded model is
not treated as quantized.
"""

from __future__ import annotations

from pathlib import Path

from mechunlearn.edit.parametrization import Trainable, merge_adapters
from mechunlearn.errors import ConfigError
from mechunlearn.io import atomic_directory
from mechunlearn.models.handle import HookedModel


def save_edited(hm: HookedModel, out_dir: str | Path, trainable: Trainable | None = None) -> Path:
    """Write ``hm``'s model and tokenizer to ``out_dir`` atomically; returns the folder.

    A LoRA ``trainable`` (or any peft adapters left in the model) is merged into the base
    weights first; the model stays merged afterwards (its outputs are unchanged by merging).
    """
    model = hm.model
    if trainable is not None:
        if trainable.hm is not hm:
            raise ConfigError("the Trainable was made for another HookedModel")
        if trainable.mode == "lora":
            trainable.merge()
    merge_adapters(model)
    quantized = [n for n, p in model.named_parameters() if not p.dtype.is_floating_point]
    if quantized:
        raise ConfigError(
            f"{len(quantized)} parameter(s) are quantized (e.g. {quantized[0]}); "
            "dequantize before saving a plain checkpoint"
        )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        if hm.tokenizer is not None:
            hm.tokenizer.save_pretrained(tmp)
    return Path(out_dir)
