"""``HookedModel``: a plain HF causal LM with its tokenizer and architecture adapter.

Nothing is wrapped or rewritten: ``.model`` stays a ``PreTrainedModel`` that saves, trains
and shards as usual; hooks exist only inside ``with hm.hooks(...)`` blocks, except one
numerically neutral pre-hook that makes the unembedding's input contiguous (a 10-20x faster
``logits_to_keep`` forward and backward on the CPU; ``contiguous_unembedding_input``).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mechunlearn.errors import SiteError
from mechunlearn.models.adapters import ArchitectureAdapter, Dimensions, adapter_for, dimensions
from mechunlearn.models.batches import Batch, left_pad
from mechunlearn.models.components import ParamSlice, parameters_of
from mechunlearn.models.hooks import ActivationCache, Handler, Intervention, hooked
from mechunlearn.models.sites import Site, SiteFilter


def cache_argument(model: nn.Module) -> str:
    """The forward's name for the KV cache (transformers 5.x renamed ``past_key_values``)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _contiguous(_module: nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_contiguous():
        return (args[0].contiguous(), *args[1:])
    return None


def contiguous_unembedding_input(model: nn.Module) -> None:
    """Make the unembedding's input contiguous (once per model; a permanent pre-hook).

    With ``logits_to_keep`` HF models slice the last positions out of the hidden states, a
    non-contiguous ``[batch, keep, d]`` view; on the CPU ``linear`` then runs a batched matmul
    against the weight expanded per row, reading the whole unembedding once per row (Gemma's
    262k x 640 matrix, 670 MB, 16 times for a batch of 16): 4.5 s instead of 0.2 s for one
    forward of 16 prompts, and as much again in the backward. A contiguous copy of the few
    kept rows makes it one matrix product. Numbers are the same up to float summation order.
    """
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or getattr(head, "_mechunlearn_contiguous", False):
        return
    head.register_forward_pre_hook(_contiguous)
    head._mechunlearn_contiguous = True


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether ``model``'s forward takes ``logits_to_keep`` (cached on the model)."""
    known = getattr(model, "_mechunlearn_keeps_logits", None)
    if known is None:
        known = "logits_to_keep" in inspect.signature(model.forward).parameters
        model._mechunlearn_keeps_logits = known
    return known


@dataclass
class HookedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None = None
    name: str = ""
    adapter: ArchitectureAdapter | None = None
    forward_module: nn.Module | None = field(default=None, repr=False, compare=False)
    """What ``forward`` calls instead of ``.model`` when set: a distributed wrapper of ``.model``
    (DDP) during training, so gradients are synchronised while hooks stay on ``.model``'s modules."""

    def __post_init__(self) -> None:
        if self.adapter is None:
            try:
                self.adapter = adapter_for(self.model.config)
            except SiteError as exc:  # evaluation works without hooks; hooks will say why not
                self._adapter_error: SiteError | None = exc
            else:
                self._adapter_error = None
        contiguous_unembedding_input(self.model)

    def require_adapter(self) -> ArchitectureAdapter:
        if self.adapter is None:
            raise self._adapter_error or SiteError("this model has no architecture adapter")
        return self.adapter

    @property
    def dims(self) -> Dimensions:
        return dimensions(self.model.config)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's device (models may be sharded)."""
        return self.model.get_input_embeddings().weight.device

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        if tok is None:
            return 0
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    def hooks(
        self,
        interventions: Iterable[Intervention] = (),
        cache: SiteFilter | bool = False,
        detach: bool = True,
        handlers: Iterable[tuple[str | Site, Handler]] = (),
    ) -> AbstractContextManager[ActivationCache]:
        return hooked(self.model, self.require_adapter(), interventions, cache, detach, handlers)

    def run_with_cache(self, names: SiteFilter = None, detach: bool = True, **model_inputs):
        """One forward pass returning ``(output, cache)``; ``names`` filters the sites."""
        with self.hooks(cache=True if names is None else names, detach=detach) as cache:
            output = self.model(**self.on_device(model_inputs))
        return output, cache

    def forward(self, **model_inputs):
        """The model's forward, through ``forward_module`` when one is set (see ``forward_via``).

        Tensor inputs are moved to the model's device first, so a batch built on the CPU
        runs unchanged on a GPU model (a no-op when they are already there)."""
        module = self.model if self.forward_module is None else self.forward_module
        return module(**self.on_device(model_inputs))

    @property
    def keeps_logits(self) -> bool:
        """Whether the model's forward takes ``logits_to_keep`` (every HF causal LM here)."""
        return accepts_logits_to_keep(self.model)

    def forward_for_activations(self, **model_inputs):
        """A forward whose logits nobody reads (hooks cache, read or patch activations): only
        the last position is unembedded. With a 262k vocabulary, full logits at every position
        cost more than the whole transformer body (latent probes on 128 facts: 28 s -> 12 s)."""
        if self.keeps_logits:  # an HF causal LM: no KV cache either
            model_inputs = {"logits_to_keep": 1, "use_cache": False, **model_inputs}
        return self.model(**self.on_device(model_inputs))

    def forward_predicting_last(self, keep: int, **model_inputs) -> torch.Tensor:
        """Logits ``[batch, keep, vocab]`` of the ``keep`` positions that predict the last
        ``keep`` tokens (positions ``width - keep - 1 .. width - 2``), through ``forward``.

        ``logits_to_keep=keep + 1`` would also unembed the final position, whose prediction
        (the token after the continuation) no loss uses: for a one-token answer that is half of
        the unembedding's work, forward and backward."""
        width = model_inputs["input_ids"].shape[1]
        if not 0 < keep < width:
            raise ValueError(f"cannot predict the last {keep} of {width} tokens")
        if not self.keeps_logits:
            return self.forward(**model_inputs).logits[:, width - keep - 1 : width - 1]
        positions = torch.arange(width - keep - 1, width - 1, device=self.device)
        return self.forward(**model_inputs, logits_to_keep=positions).logits

    def on_device(self, model_inputs: dict) -> dict:
        """``model_inputs`` with every tensor moved to ``self.device``."""
        device = self.device
        return {
            key: value.to(device) if isinstance(value, torch.Tensor) else value
            for key, value in model_inputs.items()
        }

    @contextmanager
    def forward_via(self, module: nn.Module | None) -> Iterator[HookedModel]:
        """Route ``forward`` through ``module`` (e.g. ``DistributedDataParallel(hm.model)``)."""
        previous, self.forward_module = self.forward_module, module
        try:
            yield self
        finally:
            self.forward_module = previous

    def parameters_of(self, components: Iterable[str]) -> list[ParamSlice]:
        return parameters_of(self.model, self.require_adapter(), components)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer")
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def batch(self, texts: Sequence[str]) -> Batch:
        """Tokenize and left-pad texts onto the model's device."""
        return left_pad([self.tokenize(t) for t in texts], self.pad_id).to(self.device)
