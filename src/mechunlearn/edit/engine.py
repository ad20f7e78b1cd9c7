"""The one training loop under every trainer: editing/unlearning (``edit.trainer``), targeted
LAT (``edit.lat``) and the attacks built on them (relearning).

A trainer says *what* one step computes (a ``step_fn`` returning the step's history entries)
and which seeded batch streams it draws from; the engine owns everything else, once:

- ``accelerate`` preparation of the model, optimizer and scheduler, and their release (the
  model is a plain module again afterwards, even on errors);
- AdamW over the trainable parameters, linear warmup then cosine (or constant) decay counted
  in optimizer updates, gradient-norm clipping (``OptimConfig``, nested in every trainer's
  config so no trainer copies its fields);
- RNG: the global RNG is forked for the run (the caller's state is untouched) and reseeded
  before every step from ``(seed, step, rank)``, so a resumed run draws what the uninterrupted
  one drew;
- optional bf16 autocast of the forward passes (fp32 master weights and optimizer state);
- progress bar, ``on_step`` callbacks (model in eval mode), checkpoint every N steps and resume
  from the newest checkpoint (parameters, optimizer, scheduler, streams, history).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from mechunlearn.edit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mechunlearn.edit.parametrization import Trainable
from mechunlearn.errors import ConfigError
from mechunlearn.models.handle import HookedModel
from mechunlearn.progress import progress_bar
from mechunlearn.schema import STRICT_CONFIG

OPTIM_FIELDS = ("lr", "weight_decay", "warmup_steps", "schedule", "max_grad_norm", "precision")
"""``OptimConfig``'s fields: trainer configs accept them at their top level as well (configs
written before the optimiser block was nested) and move them into ``optim``."""


class OptimConfig(BaseModel):
    """AdamW, its learning-rate schedule, clipping and the arithmetic of forward passes."""

    model_config = STRICT_CONFIG

    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="linear warmup, in optimizer updates")
    schedule: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: forward passes under bf16 autocast; weights, gradients and AdamW "
        "state stay fp32",
    )


def nest_optim_fields(data: Any, defaults: dict[str, Any] | None = None) -> Any:
    """Move top-level optimiser keys of a trainer config into its ``optim`` block.

    ``defaults``: the trainer's own optimiser defaults where they differ from ``OptimConfig``'s
    (e.g. a smaller learning rate); keys given explicitly always win. A key given both at the
    top level and in ``optim`` is an error, not a silent choice.
    """
    if not isinstance(data, dict):
        return data
    flat = {k: data[k] for k in OPTIM_FIELDS if k in data}
    nested = data.get("optim")
    if isinstance(nested, BaseModel):
        nested = nested.model_dump()
    nested = dict(nested or {})
    both = sorted(set(flat) & set(nested))
    if both:
        raise ValueError(f"{', '.join(both)} given both at the top level and in optim")
    if not flat and not defaults and "optim" in data:
        return data
    out = {k: v for k, v in data.items() if k not in OPTIM_FIELDS}
    out["optim"] = {**(defaults or {}), **nested, **flat}
    return out


def with_changes(config: BaseModel, **changes: Any) -> BaseModel:
    """A validated copy of a trainer config with ``changes``; optimiser keys (``lr``, ...) go
    into its ``optim`` block (``model_copy(update=...)`` would neither validate nor nest)."""
    data = config.model_dump()
    for key, value in changes.items():
        if key in OPTIM_FIELDS:
            data["optim"][key] = value
        else:
            data[key] = value
    return type(config).model_validate(data)


def lr_factor(
    step: int, total: int, warmup: int = 0, schedule: Literal["cosine", "constant"] = "cosine"
) -> float:
    """Multiplier of the base learning rate for optimizer update ``step`` (0-based) of ``total``.

    Warmup: ``(step + 1) / (warmup + 1)`` for ``step < warmup`` (never a zero-lr step); then
    ``cosine``: ``0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))`` (1 at the first
    step after warmup, above 0 at the last) or ``constant``: 1.
    """
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ConfigError(f"unknown schedule {schedule!r}; known: cosine, constant")
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class BatchStream:
    """Endless seeded stream of example indices: each pass over the data in a fresh order.

    ``next()`` returns the next ``size`` indices (``size = min(batch_size, n)``); the state
    (generator, current order and position) is saved in checkpoints.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n = n
        self.size = min(batch_size, n)
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.position = 0

    def next(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.size:
            if self.position >= len(self.order):
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
                self.position = 0
            take = self.order[self.position : self.position + self.size - len(out)]
            out.extend(take)
            self.position += len(take)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "order": torch.tensor(self.order, dtype=torch.long),
            "position": self.position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order = state["order"].tolist()
        self.position = int(state["position"])


def step_seed(seed: int, step: int, rank: int) -> int:
    """The global RNG seed of one step (dropout, random starts): fixed by run seed, step and
    process, so a resumed run and every rerun draw the same numbers."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def default_accelerator(hm: HookedModel):
    """An ``Accelerator`` on the model's device kind; batches are split across processes."""
    from accelerate import Accelerator, DataLoaderConfiguration

    _forget_single_process_state_on_another_device(hm.device)
    return Accelerator(
        cpu=hm.device.type == "cpu",
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


def _forget_single_process_state_on_another_device(device: torch.device) -> None:
    """Let one process train models on different devices, one after another.

    ``accelerate`` keeps one process-wide state, fixed by the first ``Accelerator``: after a
    GPU run, ``Accelerator(cpu=True)`` raises, and after a CPU run ``prepare`` silently moves a
    GPU model to the CPU (stranding gradient masks built on the GPU). Outside a distributed
    launch nothing else depends on that state, so a stale one is dropped; under
    ``accelerate launch`` it is the launch's and is left alone.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    shared = PartialState._shared_state
    if not shared or shared.get("distributed_type", DistributedType.NO) != DistributedType.NO:
        return
    current = shared.get("device")
    if current is None:
        return
    current = torch.device(current)
    same = current.type == device.type and (
        current.index is None or device.index is None or current.index == device.index
    )
    if not same:
        AcceleratorState._reset_state(reset_partial_state=True)


def total_loss(
    terms: dict[str, torch.Tensor], coefs: dict[str, float], device: torch.device
) -> torch.Tensor:
    """``sum(coefs[name] * terms[name])``: the one place the terms are weighted."""
    loss = torch.zeros((), device=device)
    for name, value in terms.items():
        loss = loss + coefs[name] * value.float()
    return loss


@contextmanager
def keep_mode(hm: HookedModel) -> Iterator[None]:
    """Eval mode for set-up work (references from the unedited model); the model's train/eval
    flag is restored afterwards, even on errors."""
    was_training = hm.model.training
    hm.model.eval()
    try:
        yield
    finally:
        hm.model.train(was_training)


@dataclass
class Engine:
    """What a ``step_fn`` sees: the model, the prepared optimizer and the process layout."""

    hm: HookedModel
    trainable: Trainable
    optim: OptimConfig
    accelerator: Any
    optimizer: Any
    scheduler: Any
    streams: dict[str, BatchStream]
    rank: int
    world: int
    seed: int

    def shard(self, indices: list[int]) -> list[int]:
        """This process's rows of a global batch (``r::N``)."""
        return indices[self.rank :: self.world]

    def autocast(self) -> AbstractContextManager:
        """bf16 autocast of forward passes when ``optim.precision`` asks for it."""
        if self.optim.precision != "bf16":
            return nullcontext()
        return torch.autocast(device_type=self.hm.device.type, dtype=torch.bfloat16)

    def update(self, loss: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Backward, clip, optimizer and scheduler step, then the trainable's post-step
        fix-up (e.g. re-masking). Returns the gradient norm before clipping and the learning
        rate the update used."""
        if self.world > 1:
            # DDP (without find_unused_parameters) waits for a gradient of every trained
            # parameter; a term may not reach all of them (RMU stops mattering above its layer).
            loss = loss + 0.0 * sum(p.reshape(-1)[:1].sum() for p in self.trainable.params)
        with torch.autocast(device_type=self.hm.device.type, enabled=False):
            self.accelerator.backward(loss)
        max_norm = self.optim.max_grad_norm if self.optim.max_grad_norm is not None else math.inf
        grad_norm = self.accelerator.clip_grad_norm_(self.trainable.params, max_norm)
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.trainable.after_step()
        return grad_norm, lr

    def mean_over_processes(self, record: dict[str, float]) -> dict[str, float]:
        """A step's numbers averaged over processes (identity on one process)."""
        if self.world == 1 or not record:
            return record
        keys = sorted(record)
        values = torch.tensor([float(record[k]) for k in keys], device=self.hm.device)
        return dict(zip(keys, self.accelerator.reduce(values, "mean").tolist(), strict=True))


@dataclass
class LoopResult:
    """``history[key][i]``: step ``i``'s value (including ``seconds``, the step's wall time);
    ``started_at``: the step a resumed run began from (0 when fresh)."""

    history: dict[str, list[float]]
    seconds: float
    started_at: int
    world: int
    forward_module: str
    info: dict[str, Any] = field(default_factory=dict)


def check_trainable(hm: HookedModel, trainable: Trainable) -> None:
    if not trainable.active:
        raise ConfigError("this Trainable was restored or merged; make a new one")
    if trainable.hm is not hm:
        raise ConfigError("the Trainable was made for another HookedModel")


def _fused_adamw(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW applies: one kernel per step instead of a dozen elementwise
    passes (measured on one CPU thread: 10 vs 62 ms per step for 15.7M parameters, 52 vs 186 ms
    for 70.8M). Same update rule; it differs from the loop only by float rounding."""
    return bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )


def run_training(
    hm: HookedModel,
    trainable: Trainable,
    optim: OptimConfig,
    step_fn: Callable[[Engine, int], dict[str, float]],
    *,
    steps: int,
    seed: int,
    streams: dict[str, BatchStream],
    label: str,
    updates_per_step: int = 1,
    accelerator=None,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    stop_after: int | None = None,
) -> LoopResult:
    """Run ``steps`` calls of ``step_fn(engine, step)`` (see the module docstring).

    ``updates_per_step``: optimizer updates one step makes (LAT's defender steps), so that the
    schedule spans ``steps * updates_per_step`` updates. ``meta``: the run's description; a
    checkpoint written with another description is refused on resume. ``on_step(done,
    record)`` runs after every step in eval mode. ``stop_after``: end after that many steps of
    the ``steps``-long schedule (an early-stopped run, e.g. a rung of successive halving).
    """
    check_trainable(hm, trainable)
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ConfigError("checkpoint_every is set but no checkpoint_dir was given")
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs a checkpoint_dir")
    accelerator = accelerator or default_accelerator(hm)
    world, rank = accelerator.num_processes, accelerator.process_index
    meta = dict(meta or {})

    with ExitStack() as stack:
        stack.callback(hm.model.train, hm.model.training)  # runs last, even on errors
        named = trainable.named_params()
        params = list(named.values())
        optimizer = torch.optim.AdamW(
            params, lr=optim.lr, weight_decay=optim.weight_decay, fused=_fused_adamw(params)
        )
        total, warmup, schedule = steps * updates_per_step, optim.warmup_steps, optim.schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, warmup, schedule)
        )
        # accelerate steps a prepared scheduler once per process unless batches are split (ours
        # are: one global batch per step), so only hand it over in that case.
        if world == 1 or accelerator.split_batches:
            model, optimizer, scheduler = accelerator.prepare(hm.model, optimizer, scheduler)
        else:
            model, optimizer = accelerator.prepare(hm.model, optimizer)
        stack.callback(_release, accelerator, model, optimizer, scheduler)

        meta["params"] = list(named)
        history: dict[str, list[float]] = {}
        start = 0
        if resume and (path := latest_checkpoint(checkpoint_dir)) is not None:
            start = _load(path, meta, named, optimizer, scheduler, streams, history)
            log(f"resumed from {path} at step {start}")
        engine = Engine(
            hm, trainable, optim, accelerator, optimizer, scheduler, streams, rank, world, seed
        )
        stack.enter_context(hm.forward_via(model if model is not hm.model else None))
        device = hm.device
        stack.enter_context(
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        )
        end = steps if stop_after is None else min(steps, stop_after)
        advance = stack.enter_context(
            progress_bar(end - start, label, enabled=progress and accelerator.is_main_process)
        )
        began = time.perf_counter()
        hm.model.train()
        for step in range(start, end):
            torch.manual_seed(step_seed(seed, step, rank))
            tick = time.perf_counter()
            with engine.autocast():
                record = step_fn(engine, step)
            record["seconds"] = time.perf_counter() - tick
            for key, value in record.items():
                history.setdefault(key, []).append(value)
            advance(1)
            done = step + 1
            if on_step is not None:
                hm.model.eval()
                on_step(done, record)
                hm.model.train()
            if (
                checkpoint_dir is not None
                and checkpoint_every
                and (done % checkpoint_every == 0 or done == end)
            ):
                _save(checkpoint_dir, done, named, engine, history, meta)
                log(f"step {done}: loss {record.get('loss', math.nan):.4f}; checkpoint saved")
        seconds = time.perf_counter() - began
    return LoopResult(history, seconds, start, world, type(model).__name__)


def _release(accelerator, model, optimizer, scheduler) -> None:
    """Leave ``hm.model`` as a plain module again and drop accelerate's references to this run
    (its DDP wrapper and hooks go with them; a caller's accelerator can be reused)."""
    accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    for registry, obj in (
        (accelerator._models, model),
        (accelerator._optimizers, optimizer),
        (accelerator._schedulers, scheduler),
    ):
        for i, held in enumerate(registry):
            if held is obj:
                del registry[i]
                break


def _save(directory, step, named, engine: Engine, history, meta) -> None:
    accelerator = engine.accelerator
    if accelerator.is_main_process:
        save_checkpoint(
            directory,
            step,
            {name: p.detach() for name, p in named.items()},
            engine.optimizer.state_dict(),
            engine.scheduler.state_dict(),
            {name: s.state_dict() for name, s in engine.streams.items()},
            history,
            {**meta, "world_size": accelerator.num_processes},
        )
    accelerator.wait_for_everyone()


def _load(path, meta, named, optimizer, scheduler, streams, history) -> int:
    ckpt = load_checkpoint(path)
    saved = {k: v for k, v in ckpt.meta.items() if k != "world_size"}
    if saved != meta:
        diff = sorted(k for k in set(saved) | set(meta) if saved.get(k) != meta.get(k))
        raise ConfigError(
            f"checkpoint {path} is from a different run (differs in: {', '.join(diff)})"
        )
    missing = sorted(set(streams) - set(ckpt.streams))
    if missing:
        raise ConfigError(f"checkpoint {path} has no state for batch streams {missing}")
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(ckpt.params[name].to(device=param.device, dtype=param.dtype))
    optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(ckpt.scheduler)
    for name, stream in streams.items():
        stream.load_state_dict(ckpt.streams[name])
    history.update({k: list(v) for k, v in ckpt.history.items()})
    return ckpt.step
