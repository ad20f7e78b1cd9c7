"""Tiny randomly initialised models of the supported families, built from configs in code.

Test scaffolding (``mechunlearn.testing``), used by the test suite, its offline CLI smoke tests
included: each builds in milliseconds, needs no download, and exercises the real HF module code
of its family.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

TINY_VOCAB = 512


def _llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


def _gemma3_config():
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=128,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
    )


def _gemma2_config():
    from transformers import Gemma2Config

    return Gemma2Config(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        sliding_window=8,
        query_pre_attn_scalar=16,
    )


def _gpt2_config():
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=TINY_VOCAB,
        n_embd=64,
        n_layer=3,
        n_head=4,
        n_positions=128,
        bos_token_id=1,
        eos_token_id=2,
    )


def _neox_config(parallel: bool):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        use_parallel_residual=parallel,
        bos_token_id=1,
        eos_token_id=2,
    )


TINY_CONFIGS: dict[str, Callable] = {
    "llama": _llama_config,
    "gemma3": _gemma3_config,
    "gemma2": _gemma2_config,
    "gpt2": _gpt2_config,
    "gpt_neox": lambda: _neox_config(True),
    "gpt_neox_sequential": lambda: _neox_config(False),
}


def tiny_model(family: str, seed: int = 0) -> PreTrainedModel:
    """A tiny random model of ``family`` (see ``TINY_CONFIGS``), in eval mode, fp32."""
    config = TINY_CONFIGS[family]()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves Gemma's norm weights at zero (gain 1) and small embeddings;
    # perturb norms so that tests see non-trivial scales.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in memory on the package's own text (vocab 512)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mechunlearn.tasks.general_text import load_general_text
    from mechunlearn.tasks.sports import load_sports

    corpus = load_general_text() + [
        f"Fact: {r.subject} plays the sport of {r.answer}" for r in load_sports()
    ]
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    from tokenizers.processors import TemplateProcessing

    tokenizer.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
