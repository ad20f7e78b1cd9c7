"""What a trainer updates: localized weights, LoRA adapters on them, or the whole model.

Mechanistic unlearning (Guo et al. 2024, "Mechanistic Unlearning: Robust Knowledge Unlearning
and Editing via Mechanistic Localization", arXiv:2410.12949) trains only the components a
localization selects. Three parametrizations share one interface (``Trainable``):

- ``localized``: exactly ``hm.parameters_of(components)`` is trained (``GradientMask``:
  whole matrices for whole components; head components train their rows/columns only);
  every other parameter is frozen;
- ``lora``: LoRA (Hu et al. 2021, ``W + (alpha / r) B A``) via peft, injected in place into the
  ``nn.Linear`` (and GPT-2 ``Conv1D``) modules that hold the components' weights, so module paths
  stay valid for the hook layer (a LoRA module's input/output are the adapted linear's);
- ``full``: every parameter.

``Trainable.restore()`` undoes the parametrization (removes masks, unloads adapters without
merging) and ``WeightSnapshot`` undoes a training run's weight changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file
from torch import nn

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.io import atomic_path
from mechunlearn.models.components import GradientMask, count_parameters
from mechunlearn.models.handle import HookedModel
from mechunlearn.schema import STRICT_CONFIG

MODES = ("localized", "lora", "full")
ADAPTER_NAME = "mechunlearn"


class LoraOptions(BaseModel):
    """LoRA hyperparameters; ``seed`` makes the random ``A`` initialisation reproducible."""

    model_config = STRICT_CONFIG

    rank: int = Field(8, ge=1)
    alpha: float = Field(16, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    seed: int = 0


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _linear_types() -> tuple[type[nn.Module], ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def _has_adapters(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in model.modules())


def merge_adapters(model: nn.Module) -> int:
    """Merge every peft adapter layer in ``model`` into its base layer and remove the wrapper.

    For models that carry adapters not made by ``make_trainable`` (e.g. loaded elsewhere);
    returns how many layers were merged.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    paths = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    merged = 0
    for path in paths:
        try:
            layer = model.get_submodule(path)
        except AttributeError:  # nested inside an already-replaced layer
            continue
        if not isinstance(layer, BaseTunerLayer):
            continue
        layer.merge()
        parent_path, _, child = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.get_base_layer())
        merged += 1
    if merged and hasattr(model, "peft_config"):
        del model.peft_config
    return merged


class Trainable:
    """The parameters a trainer updates; ``restore()`` puts the model back as it was.

    ``n_params`` counts trained entries (slices of partially selected matrices count their
    selected rows/columns only), so it equals the Localization's parameter budget in
    ``localized`` mode.
    """

    def __init__(
        self,
        hm: HookedModel,
        mode: str,
        components: Sequence[str],
        params: list[nn.Parameter],
        n_params: int,
        saved_requires_grad: dict[str, bool],
        mask: GradientMask | None = None,
        lora_modules: Sequence[str] = (),
        frozen_entries: Sequence[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = (),
        added_peft_config: bool = False,
    ) -> None:
        self.hm = hm
        self.mode = mode
        self.components = list(components)
        self.params = params
        self.n_params = n_params
        self.lora_modules = list(lora_modules)
        self._saved_requires_grad = saved_requires_grad
        self._mask = mask
        self._frozen_entries = list(frozen_entries)
        self._added_peft_config = added_peft_config
        self.active = True

    # ---- names (for checkpoints) -------------------------------------------------------
    def named_params(self) -> dict[str, nn.Parameter]:
        """The trained parameters under their names in ``hm.model``."""
        mine = {id(p) for p in self.params}
        return {n: p for n, p in self.hm.model.named_parameters() if id(p) in mine}

    # ---- training hooks ----------------------------------------------------------------
    def after_step(self) -> None:
        """Re-pin the unselected entries of partially trained matrices.

        Their gradient is masked to zero, but AdamW's decoupled weight decay would still shrink
        them; copying the saved values back keeps "only the selected entries change" exact.
        """
        with torch.no_grad():
            for param, keep, saved in self._frozen_entries:
                param.copy_(torch.where(keep, param, saved.to(param.device)))

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """LoRA: run the frozen base model inside the block (e.g. reference logits for a KL
        term, as targeted LAT does); adapters and ``requires_grad`` flags are restored after."""
        if self.mode != "lora" or not self.active:
            raise ConfigError("adapters_disabled() needs an active LoRA trainable")
        layers = [self.hm.model.get_submodule(path) for path in self.lora_modules]
        flags = [p.requires_grad for p in self.params]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            for p, flag in zip(self.params, flags, strict=True):
                p.requires_grad_(flag)

    # ---- undo --------------------------------------------------------------------------
    def restore(self) -> None:
        """Remove masks / unload LoRA adapters without merging; ``requires_grad`` as before."""
        if not self.active:
            return
        if self._mask is not None:
            self._mask.remove()
        if self.lora_modules:
            self._unload(merge=False)
        self._finish()

    def merge(self) -> None:
        """LoRA: fold ``(alpha / r) B A`` into the base weights and drop the adapters.

        Afterwards the model is a plain HF model with edited weights; ``restore()`` is a no-op.
        """
        if self.mode != "lora":
            raise ConfigError(f"merge() applies to LoRA trainables, not mode {self.mode!r}")
        if not self.active:
            return
        self._unload(merge=True)
        self._finish()

    def _unload(self, merge: bool) -> None:
        model = self.hm.model
        for path in self.lora_modules:
            layer = model.get_submodule(path)
            if merge:
                layer.merge(adapter_names=[ADAPTER_NAME])
            parent_path, _, child = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, child, layer.get_base_layer())
        if self._added_peft_config and hasattr(model, "peft_config"):
            del model.peft_config

    def _finish(self) -> None:
        for name, p in self.hm.model.named_parameters():
            if name in self._saved_requires_grad:
                p.requires_grad_(self._saved_requires_grad[name])
        self._frozen_entries.clear()
        self.active = False

    def __enter__(self) -> Trainable:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __repr__(self) -> str:
        return (
            f"Trainable(mode={self.mode!r}, components={self.components}, n_params={self.n_params})"
        )


def _localized(hm: HookedModel, components: Sequence[str], saved: dict[str, bool]) -> Trainable:
    slices = hm.parameters_of(components)
    if not slices:
        raise ConfigError(f"components {list(components)} select no parameters")
    mask = GradientMask(hm.model, slices).apply()
    params = mask.trainable()
    frozen = []
    for param in params:
        keep = mask.keep_mask(param)
        if keep is not None:
            frozen.append((param, keep, param.detach().clone()))
    return Trainable(
        hm,
        "localized",
        components,
        params,
        count_parameters(slices),
        saved,
        mask=mask,
        frozen_entries=frozen,
    )


def lora_target_modules(hm: HookedModel, components: Sequence[str]) -> list[str]:
    """Paths of the linear modules whose weight belongs to one of ``components``."""
    targets: list[str] = []
    for s in hm.parameters_of(components):
        path, _, attr = s.name.rpartition(".")
        module = hm.model.get_submodule(path)
        if attr == "weight" and isinstance(module, _linear_types()) and path not in targets:
            targets.append(path)
    return targets


def _lora(
    hm: HookedModel, components: Sequence[str], options: LoraOptions, saved: dict[str, bool]
) -> Trainable:
    from peft import LoraConfig, inject_adapter_in_model

    if _has_adapters(hm.model):
        raise ConfigError("the model already carries adapters; restore() or merge() them first")
    targets = lora_target_modules(hm, components)
    if not targets:
        raise ConfigError(
            f"components {list(components)} contain no linear modules to put LoRA adapters on"
        )
    from transformers.pytorch_utils import Conv1D

    config = LoraConfig(
        r=options.rank,
        fan_in_fan_out=all(isinstance(hm.model.get_submodule(t), Conv1D) for t in targets),
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=targets,
        bias="none",
    )
    had_config = hasattr(hm.model, "peft_config")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(options.seed)
        inject_adapter_in_model(config, hm.model, adapter_name=ADAPTER_NAME)
    params = _unique(
        p
        for path in targets
        for name, p in hm.model.get_submodule(path).named_parameters()
        if ".lora_" in f".{name}" and ADAPTER_NAME in name
    )
    for p in hm.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return Trainable(
        hm,
        "lora",
        components,
        params,
        sum(p.numel() for p in params),
        saved,
        lora_modules=targets,
        added_peft_config=not had_config,
    )


def make_trainable(
    hm: HookedModel,
    mode: Literal["localized", "lora", "full"],
    components: Sequence[str] = (),
    lora: LoraOptions | None = None,
) -> Trainable:
    """Make ``hm.model`` trainable as ``mode`` says; undo with ``Trainable.restore()``.

    ``hm.model`` stays the same object (LoRA is injected in place), so hooks, adapters and
    ``HookedModel`` keep working during and after training.
    """
    if mode not in MODES:
        raise ConfigError(f"unknown training mode {mode!r}; known: {', '.join(MODES)}")
    components = list(components)
    if mode in ("localized", "lora") and not components:
        raise ConfigError(f"mode {mode!r} needs at least one component to train")
    if lora is not None and mode != "lora":
        raise ConfigError(f"LoRA options given for mode {mode!r}")
    saved = {name: p.requires_grad for name, p in hm.model.named_parameters()}
    if mode == "localized":
        return _localized(hm, components, saved)
    if mode == "lora":
        return _lora(hm, components, lora or LoraOptions(), saved)
    params = _unique(hm.model.parameters())
    for p in params:
        p.requires_grad_(True)
    return Trainable(hm, "full", components, params, sum(p.numel() for p in params), saved)


class WeightSnapshot:
    """A CPU copy of some parameters; ``restore()`` writes it back in place.

    The cheap undo between runs of an experiment loop: snapshot the parameters a run trains,
    train, evaluate, restore (same tensors, so optimizers/hooks holding them stay valid).
    """

    def __init__(self, params: Iterable[nn.Parameter]) -> None:
        self._saved = [(p, p.detach().to("cpu", copy=True)) for p in _unique(params)]

    def restore(self) -> None:
        with torch.no_grad():
            for param, saved in self._saved:
                param.copy_(saved.to(param.device))

    def __len__(self) -> int:
        return len(self._saved)


@contextmanager
def editing(
    hm: HookedModel,
    mode: Literal["localized", "lora", "full"],
    components: Sequence[str] = (),
    lora: LoraOptions | None = None,
) -> Iterator[Trainable]:
    """``make_trainable`` for one training run inside an experiment loop: on exit (errors
    included) the parametrization is undone and the weights it may have changed (the
    components' parameters, LoRA merges into them included) are restored, so the next run
    starts from the original model."""
    snapshot = WeightSnapshot(s.param for s in hm.parameters_of(components))
    trainable = make_trainable(hm, mode, components, lora)
    try:
        yield trainable
    finally:
        trainable.restore()
        snapshot.restore()


def _named(hm: HookedModel, components: Sequence[str]) -> dict[str, nn.Parameter]:
    names = {id(p): n for n, p in hm.model.named_parameters(remove_duplicate=False)}
    return {names[id(p)]: p for p in _unique(s.param for s in hm.parameters_of(components))}


def save_weights(hm: HookedModel, components: Sequence[str] | None, path: str | Path) -> Path:
    """Write the current values of the components' parameters (whole tensors; ``None``: every
    parameter, tied ones once) to a safetensors file, atomically: an edited model is the
    original plus this file."""
    named = dict(hm.model.named_parameters()) if components is None else _named(hm, components)
    tensors = {n: p.detach().to("cpu").contiguous() for n, p in named.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    return Path(path)


@contextmanager
def swapped_in(hm: HookedModel, path: str | Path) -> Iterator[None]:
    """Run with the parameters saved by ``save_weights`` in place of the model's, restored
    afterwards (errors included). Names must match the model's parameters and shapes agree."""
    if not Path(path).is_file():
        raise DataError(f"saved weights {path} are missing")
    saved = load_file(str(path))
    params = dict(hm.model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(saved) - set(params))
    if unknown:
        raise ConfigError(f"{path}: parameters {unknown[:3]} are not in model {hm.name!r}")
    for name, tensor in saved.items():
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ConfigError(
                f"{path}: {name} has shape {tuple(tensor.shape)}, the model's is "
                f"{tuple(params[name].shape)}"
            )
    snapshot = WeightSnapshot(params[n] for n in saved)
    try:
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
        yield
    finally:
        snapshot.restore()
