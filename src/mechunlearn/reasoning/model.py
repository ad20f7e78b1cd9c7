"""The path-finding transformer as a plain Hugging Face GPT-2 (Brinkmann et al. 2024,
arXiv:2402.11917, Sec. 2: a 6-layer, 1-head, d_model 128, d_mlp 512 decoder with learned
positional embeddings, trained from scratch).

Using ``GPT2LMHeadModel`` (not a custom module) keeps the toolkit's hook layer, sites and
components working unchanged: ``HookedModel(model, tokenizer=None)`` reads ``blocks.L.*``
sites through the GPT-2 adapter. The reference model (TransformerLens) had an untied
unembedding and exact GELU; both are kept. Dropout is off (data are fresh every step).

Presets: ``paper`` (the paper's architecture) and ``cpu`` (smaller width for a 2-core CPU, still
fewer layers than the longest path, 15 steps at n = 16, so it cannot solve every path one layer
per step and must compose steps in parallel as the paper's model does).

A saved model is a folder: Hugging Face's ``config.json`` + ``model.safetensors`` + the
tokenizer files (``save_pretrained``, loadable by plain transformers) and ``tree_model.json`` (the model and
task configs, the training recipe and metrics). ``load_tree_model`` rebuilds the model from
``tree_model.json`` and refuses a checkpoint whose config differs from the one expected.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, ValidationError, model_validator
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.io import atomic_directory, atomic_write_json
from mechunlearn.reasoning.tokens import TreeLayout, make_tokenizer
from mechunlearn.reasoning.trees import TreeTaskConfig, check_n_nodes
from mechunlearn.registry import Registry
from mechunlearn.schema import STRICT_CONFIG

FORMAT = "mechunlearn-tree-model"
FORMAT_VERSION = 1
META_FILE = "tree_model.json"


class TreeModelConfig(BaseModel):
    """Architecture of the path-finding model (defaults: the paper's)."""

    model_config = STRICT_CONFIG

    n_nodes: int = Field(default=16, description="tree size the vocabulary and positions fit")
    n_layers: int = Field(default=6, ge=1)
    d_model: int = Field(default=128, ge=1)
    n_heads: int = Field(default=1, ge=1)
    d_mlp: int = Field(default=512, ge=1)
    activation: Literal["gelu", "gelu_new", "relu"] = "gelu"
    tie_embeddings: bool = False

    @model_validator(mode="after")
    def _check(self) -> TreeModelConfig:
        check_n_nodes(self.n_nodes)
        if self.d_model % self.n_heads:
            raise ConfigError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        return self

    @property
    def layout(self) -> TreeLayout:
        return TreeLayout(self.n_nodes)


MODEL_PRESETS: Registry[TreeModelConfig] = Registry("tree model preset")
MODEL_PRESETS.register("paper")(TreeModelConfig())
MODEL_PRESETS.register("cpu")(TreeModelConfig(n_layers=6, d_model=64, n_heads=1, d_mlp=256))


def resolve_model_config(value: str | TreeModelConfig | dict[str, Any]) -> TreeModelConfig:
    """A preset name, a config, or a dict of config fields -> ``TreeModelConfig``."""
    if isinstance(value, TreeModelConfig):
        return value
    if isinstance(value, str):
        return MODEL_PRESETS.get(value)
    try:
        return TreeModelConfig.model_validate(value)
    except ValidationError as exc:
        raise ConfigError(f"invalid tree model config: {exc}") from None


def hf_config(config: TreeModelConfig) -> GPT2Config:
    """The Hugging Face config: vocabulary ``3 + 2n``, ``4n - 2`` learned positions."""
    layout = config.layout
    return GPT2Config(
        vocab_size=layout.vocab_size,
        n_positions=layout.n_positions,
        n_embd=config.d_model,
        n_layer=config.n_layers,
        n_head=config.n_heads,
        n_inner=config.d_mlp,
        activation_function=config.activation,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=config.tie_embeddings,
        # No special ids: "," (id 0) pads but is also the edge separator, and declaring it as
        # pad_token_id only makes transformers warn about unmasked padding (there is none
        # before the predicted positions: the layout pads at the end).
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def build_model(config: TreeModelConfig, seed: int = 0) -> GPT2LMHeadModel:
    """A freshly initialised model (GPT-2's init), deterministic in ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(hf_config(config))
    return model


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """All parameters, and the matmul parameters outside the embeddings (the ``N`` of the
    usual ``6 N`` training FLOPs per token: blocks' weight matrices and the unembedding)."""
    total = sum(p.numel() for p in model.parameters())
    matmul = sum(
        p.numel()
        for name, p in model.named_parameters()
        if p.dim() == 2 and not name.endswith(("wte.weight", "wpe.weight"))
    )
    return {"total": total, "non_embedding_matmul": matmul}


def config_of(model: GPT2LMHeadModel) -> TreeModelConfig:
    """The ``TreeModelConfig`` a GPT-2 model was built from (ConfigError if it fits none)."""
    hf = model.config
    n, rem = divmod(hf.vocab_size - 3, 2)
    if rem or n < 3:
        raise ConfigError(f"vocabulary size {hf.vocab_size} is not 3 + 2n for a tree size n")
    config = TreeModelConfig(
        n_nodes=n,
        n_layers=hf.n_layer,
        d_model=hf.n_embd,
        n_heads=hf.n_head,
        d_mlp=hf.n_inner or 4 * hf.n_embd,
        activation=hf.activation_function,
        tie_embeddings=bool(hf.tie_word_embeddings),
    )
    config.layout.check_model_positions(hf.n_positions)
    return config


def hooked_tree_model(model: GPT2LMHeadModel, name: str = "tree-model"):
    """``HookedModel`` over ``model`` with the fixed-vocabulary tokenizer."""
    from mechunlearn.models.handle import HookedModel

    return HookedModel(model, make_tokenizer(config_of(model).n_nodes), name=name)


# ---- saving and loading ----------------------------------------------------------------------


@dataclass
class LoadedTreeModel:
    model: GPT2LMHeadModel
    config: TreeModelConfig
    task: TreeTaskConfig
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def save_tree_model(
    model: GPT2LMHeadModel,
    config: TreeModelConfig,
    task: TreeTaskConfig,
    folder: str | Path,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder`` atomically: HF ``config.json`` + ``model.safetensors`` + ``tree_model.json``."""
    if config.n_nodes != task.n_nodes:
        raise ConfigError(
            f"model built for n={config.n_nodes} nodes saved with a task of n={task.n_nodes}"
        )
    folder = Path(folder)
    with atomic_directory(folder) as tmp, _quiet_transformers():
        model.save_pretrained(tmp, safe_serialization=True)
        make_tokenizer(config.n_nodes).save_pretrained(tmp)
        atomic_write_json(
            tmp / META_FILE,
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "model": config.model_dump(),
                "task": task.model_dump(),
                **(meta or {}),
            },
        )
    return folder


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No "Writing model shards" bar for a one-file save."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


SHIPPED = "shipped"
SHIPPED_RECIPE = "recipe.yaml"


def shipped_checkpoint_folder() -> Path:
    """The trained checkpoint shipped inside the package (``mechunlearn/reasoning/checkpoint``),
    with the recipe (``recipe.yaml``) that ``mechunlearn tree train --config`` reproduces it from."""
    from importlib import resources

    return Path(str(resources.files("mechunlearn.reasoning").joinpath("checkpoint")))


def named_checkpoints_root() -> Path:
    """``mechunlearn/reasoning/checkpoints``: one folder per named shipped checkpoint."""
    from importlib import resources

    return Path(str(resources.files("mechunlearn.reasoning").joinpath("checkpoints")))


def named_checkpoint_folders() -> dict[str, Path]:
    """Checkpoints shipped in the package by name: ``shipped`` (``reasoning/checkpoint``) and
    every folder of ``reasoning/checkpoints/`` that holds a saved tree model, e.g. the depth
    study's models, so that an analysis of them is reproduced without retraining."""
    folders = {SHIPPED: shipped_checkpoint_folder()}
    more = named_checkpoints_root()
    if more.is_dir():
        folders |= {p.name: p for p in sorted(more.iterdir()) if (p / META_FILE).is_file()}
    return folders


def resolve_checkpoint_folder(path: str | Path) -> Path:
    """A shipped checkpoint's name (``shipped``, ``named_checkpoint_folders``), or ``path``
    itself, or its ``model/`` subfolder (a ``tree train`` output folder)."""
    named = named_checkpoint_folders()
    if str(path) in named:
        folder = named[str(path)]
        if not (folder / META_FILE).is_file():
            raise DataError(
                f"this installation has no shipped tree checkpoint ({folder}); train one with "
                "`mechunlearn tree train` and pass its folder"
            )
        return folder
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / META_FILE).is_file():
            return candidate
    raise DataError(
        f"{path} is not a tree model checkpoint (no {META_FILE} in it or in model/), nor the "
        f"name of a shipped one ({', '.join(named)})"
    )


def shipped_checkpoint_name(folder: Path) -> str | None:
    """The name under which ``folder`` is shipped, or None for a checkpoint of the user's."""
    for name, shipped in named_checkpoint_folders().items():
        if shipped.resolve() == folder.resolve():
            return name
    return None


def load_tree_model(
    path: str | Path, expect: TreeModelConfig | str | None = None, device: str | None = None
) -> LoadedTreeModel:
    """Load a saved tree model; ConfigError if ``expect`` is given and differs, or if the
    weights do not match the recorded config."""
    folder = resolve_checkpoint_folder(path)
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{folder / META_FILE} is unreadable: {exc}") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{folder / META_FILE} is not a {FORMAT} file")
    try:
        config = TreeModelConfig.model_validate(meta["model"])
        task = TreeTaskConfig.model_validate(meta["task"])
    except (KeyError, ValidationError) as exc:
        raise DataError(f"{folder / META_FILE} has an invalid config: {exc}") from None
    if expect is not None:
        expected = resolve_model_config(expect)
        check_same_config(expected, config, f"checkpoint {folder}")
    weights_file = folder / "model.safetensors"
    if not weights_file.is_file():
        raise DataError(f"{folder} has no model.safetensors")
    state = load_file(str(weights_file))
    model = build_model(config)
    load_state_checked(model, state, f"checkpoint {folder}")
    if device is not None:
        model.to(device)
    model.eval()
    return LoadedTreeModel(model=model, config=config, task=task, meta=meta, path=folder)


def check_same_config(expected: TreeModelConfig, found: TreeModelConfig, what: str) -> None:
    diffs = {
        key: (value, getattr(found, key))
        for key, value in expected.model_dump().items()
        if getattr(found, key) != value
    }
    if diffs:
        detail = ", ".join(f"{k}: expected {a!r}, found {b!r}" for k, (a, b) in diffs.items())
        raise ConfigError(f"{what} was made for another model config ({detail})")


def load_state_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` that reports missing, unexpected or mis-shaped tensors as ConfigError."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}")
        raise ConfigError(f"{what} does not match the model config: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)
