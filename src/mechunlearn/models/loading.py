"""``load_model(spec)``: one entry point for every way a researcher names a model.

Accepted specs: an embedded name (``gemma3-270m``, ``smollm2-135m``), a local Hugging Face
folder (with ``config.json``), a ``.gguf`` file, or a hub name (only when online). Weights are
read only from safetensors or GGUF: ``use_safetensors=True`` refuses pickled checkpoints.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from mechunlearn.errors import ConfigError, ModelNotFoundError
from mechunlearn.models.derived import DERIVED_NAMES, require_derived
from mechunlearn.models.embedded import EMBEDDED, ensure_cached
from mechunlearn.models.handle import HookedModel
from mechunlearn.runtime import configure_threads, resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_gguf_header(path: Path) -> None:
    """Refuse a file that is not GGUF before a reader parses it (its errors name no file)."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelNotFoundError(
            f"{path} is not a GGUF file: it does not start with the GGUF magic bytes"
        )


def _from_folder(folder: Path, load: dict[str, Any], gguf_file: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading from a local folder takes seconds
    kwargs = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    if gguf_file:
        _check_gguf_header(folder / gguf_file)
    # a damaged GGUF file fails inside the reader with whatever error its parser hits
    failures = (
        (OSError, ValueError, KeyError, IndexError, RuntimeError, struct.error)
        if gguf_file
        else OSError
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), **load, **kwargs)
    except failures as exc:
        what = f"GGUF file {gguf_file}" if gguf_file else "safetensors weights"
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ModelNotFoundError(
            f"could not load {what} from {folder} (pickled checkpoints are refused): {first}"
        ) from None
    if gguf_file:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(folder), **({"gguf_file": gguf_file} if gguf_file else {})
        )
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~"))
        or spec.endswith(".gguf")
        or "\\" in spec
        or spec.count("/") > 1
    )


def load_model(
    spec: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = torch.float32,
    log: Callable[[str], None] = lambda _: None,
    device_map: str | dict | None = None,
) -> HookedModel:
    """Load a causal LM and its tokenizer, in eval mode, on ``device`` (auto by default).

    ``device_map`` (e.g. ``"auto"``) shards a large model over several devices with
    accelerate instead of moving it to one ``device``.
    """
    configure_threads()
    load: dict[str, Any] = {"dtype": parse_dtype(dtype)}
    if device_map is not None:
        load["device_map"] = device_map
    name = spec
    if spec in EMBEDDED:
        model, tokenizer = _from_folder(ensure_cached(spec, log), load)
    elif spec in DERIVED_NAMES:
        model, tokenizer = _from_folder(require_derived(spec), load)
    else:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            model, tokenizer = _from_folder(path.parent, load, gguf_file=path.name)
        elif path.is_dir() and (path / "config.json").is_file():
            model, tokenizer = _from_folder(path, load)
        elif path.is_dir() and sorted(path.glob("*.gguf")):
            gguf = sorted(path.glob("*.gguf"))[0]
            model, tokenizer = _from_folder(path, load, gguf_file=gguf.name)
        elif path.exists():
            raise ModelNotFoundError(
                f"{spec!r} is neither a Hugging Face model folder (no config.json) nor a .gguf file"
            )
        elif _looks_like_path(spec):
            raise ModelNotFoundError(f"model path {spec!r} does not exist")
        else:
            model, tokenizer = _from_hub(spec, load)
    if device_map is None:
        model.to(resolve_device(device))
    model.eval()
    if (
        tokenizer is not None
        and tokenizer.pad_token_id is None
        and tokenizer.eos_token_id is not None
    ):
        tokenizer.pad_token = tokenizer.eos_token
    return HookedModel(model=model, tokenizer=tokenizer, name=name)


def hub_reachable() -> bool:
    """Whether the Hugging Face hub can be asked at all (fast: a DNS lookup, no request).

    Without this check an unknown name on an offline machine costs a minute of retries.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True


def _in_hub_cache(spec: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(spec, "config.json"), str)
    except ValueError:  # not a valid repository id
        return False


def _from_hub(spec: str, load: dict[str, Any]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    embedded = ", ".join(EMBEDDED)
    online = hub_reachable()
    # offline, only the local Hugging Face cache can still hold the model
    where = {} if online else {"local_files_only": True}
    if not online and not _in_hub_cache(spec):
        raise ModelNotFoundError(
            f"unknown model {spec!r}: not an embedded model ({embedded}), not a local path, and not in "
            "the local Hugging Face cache (the hub is unreachable from this machine)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(spec, use_safetensors=True, **where, **load)
        tokenizer = AutoTokenizer.from_pretrained(spec, **where)
    except (OSError, ValueError) as exc:
        reason = (
            "no such repository"
            if online
            else "the hub is unreachable and it is not in the local cache"
        )
        raise ModelNotFoundError(
            f"unknown model {spec!r}: not an embedded model ({embedded}), not a local path, and it "
            f"could not be loaded from the Hugging Face hub ({reason}): {str(exc).splitlines()[0]}"
        ) from None
    return model, tokenizer
