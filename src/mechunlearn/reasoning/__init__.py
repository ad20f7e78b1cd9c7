"""Symbolic multi-step reasoning: path-finding in binary trees (Brinkmann et al. 2024, "A
Mechanistic Analysis of a Transformer Trained on a Symbolic Multi-Step Reasoning Task",
arXiv:2402.11917): the tree generator (``trees``), vocabulary and layout (``tokens``), the GPT-2
model and its checkpoints (``model``) and the trainer (``train``)."""

from mechunlearn.reasoning.model import (
    MODEL_PRESETS,
    LoadedTreeModel,
    TreeModelConfig,
    build_model,
    hooked_tree_model,
    load_tree_model,
    resolve_model_config,
    save_tree_model,
)
from mechunlearn.reasoning.tokens import (
    TreeLayout,
    TreeVocab,
    decode_tokens,
    encode_batch,
    loss_mask,
    make_tokenizer,
    parse,
    serialise,
)
from mechunlearn.reasoning.train import (
    TreeAccuracy,
    TreeTrainConfig,
    TreeTrainResult,
    evaluate_accuracy,
    greedy_paths,
    train_tree_model,
)
from mechunlearn.reasoning.trees import (
    TreeBatch,
    TreeExample,
    TreeTaskConfig,
    check_example,
    generate_trees,
    heldout_trees,
    training_trees,
)

__all__ = [
    "MODEL_PRESETS",
    "LoadedTreeModel",
    "TreeAccuracy",
    "TreeBatch",
    "TreeExample",
    "TreeLayout",
    "TreeModelConfig",
    "TreeTaskConfig",
    "TreeTrainConfig",
    "TreeTrainResult",
    "TreeVocab",
    "build_model",
    "check_example",
    "decode_tokens",
    "encode_batch",
    "evaluate_accuracy",
    "generate_trees",
    "greedy_paths",
    "heldout_trees",
    "hooked_tree_model",
    "load_tree_model",
    "loss_mask",
    "make_tokenizer",
    "parse",
    "resolve_model_config",
    "save_tree_model",
    "serialise",
    "train_tree_model",
    "training_trees",
]
