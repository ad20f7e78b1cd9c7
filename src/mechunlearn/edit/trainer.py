"""One trainer for editing and unlearning: localized, LoRA or full fine-tuning, on CPU, one GPU
or several processes (``accelerate``).

Every step minimises (Guo et al. 2024, "Mechanistic Unlearning", arXiv:2410.12949, Sec. 3)::

    L = forget_coef   * objective(forget batch)          # edit / unlearn / GA / GradDiff / NPO / RMU
      + maintain_coef * CE(retain batch, true answers)   # keep the other facts
      + lm_coef       * next-token CE(general text)      # keep the language model

A term is left out when its coefficient is 0 or it has no data. The objective is looked up by
name in ``OBJECTIVES`` and bound to the data by ``bind_objective`` before any weight changes, so
references (NPO's log-probs, RMU's activations) come from the unedited model.

With a ``forget_perturbation`` (targeted LAT on the forget term, ``edit.lat.ForgetLat``) the
objective is computed on each step's forget batch under a perturbation found for that batch;
the maintain and LM terms stay clean. Its per-step numbers (e.g. the adversary's loss) go into
the history as they are on each process (not averaged).

Optimisation: AdamW over ``trainable.params``, linear warmup then cosine decay (or constant),
gradient-norm clipping. Batches are drawn by seeded ``torch.Generator``s cycling through
reshuffled data; dropout (LoRA) is seeded per step, so runs are reproducible and a resumed run
ends with the same weights as an uninterrupted one.

Several processes (``accelerate launch``): the model is wrapped by ``accelerator.prepare``
(DDP) and every forward goes through the wrapper (``hm.forward_via``) while hooks stay on
``hm.model``'s modules. All processes draw the same global batch indices; process ``r`` of
``N`` trains on rows ``r::N`` of each step's batch, and DDP averages the gradients. The update
is therefore driven by the mean of the per-shard mean losses, which equals the single-process
loss when every shard holds the same number of loss tokens (e.g. single-token answers and a
batch size divisible by ``N``); otherwise the rows are weighted slightly differently. All
processes end with identical weights.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mechunlearn.edit.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mechunlearn.edit.data import TrainData
from mechunlearn.edit.objectives import (
    OBJECTIVES,
    BoundObjective,
    ObjectiveStep,
    TargetBatch,
    bind_objective,
    edit_loss,
)
from mechunlearn.edit.parametrization import Trainable
from mechunlearn.errors import ConfigError, DataError
from mechunlearn.models.handle import Batch, HookedModel, left_pad
from mechunlearn.report.progress import progress_bar


class TrainConfig(BaseModel):
    """Hyperparameters of one training run (see the module docstring for the loss)."""

    model_config = ConfigDict(extra="forbid")

    objective: str = "edit"
    objective_options: dict[str, Any] = Field(default_factory=dict)
    forget_coef: float = 1.0
    maintain_coef: float = 1.0
    lm_coef: float = 1.0
    steps: int = Field(30, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    batch_size: int = Field(16, ge=1)
    retain_batch_size: int = Field(16, ge=1)
    lm_batch_size: int = Field(4, ge=1)
    lm_max_tokens: int = Field(128, ge=2, description="general texts are cut to this many tokens")
    seed: int = 0
    checkpoint_every: int | None = Field(None, ge=1)

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, name: str) -> str:
        OBJECTIVES.get(name)  # ConfigError listing the known names
        return name


@dataclass
class TrainResult:
    """``history[key][i]`` is step ``i``'s value: ``loss`` (total), one entry per active term
    (``forget``, ``maintain``, ``lm``; unweighted, averaged over processes), ``lr``,
    ``grad_norm`` (before clipping) and ``seconds``. ``info``: processes, the module the forward
    went through (``DistributedDataParallel`` when several), the objective setup's choices."""

    steps: int
    history: dict[str, list[float]]
    seconds: float
    n_trainable: int
    info: dict[str, Any] = field(default_factory=dict)


def lr_factor(
    step: int, total: int, warmup: int = 0, schedule: Literal["cosine", "constant"] = "cosine"
) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based) of ``total``.

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


class ForgetPerturbation(Protocol):
    """Perturbs the forward of each step's forget batch (e.g. a latent adversary: targeted LAT
    on top of any objective). ``bind`` runs once before training (tokenize, validate);
    ``perturb`` returns the forget batch, a context applying the perturbation to forwards of
    exactly that batch, and numbers for the step's history."""

    def describe(self) -> dict[str, Any]: ...

    def bind(self, hm: HookedModel, data: TrainData) -> None: ...

    def perturb(
        self, hm: HookedModel, forget_index: list[int], seed: int
    ) -> tuple[TargetBatch, AbstractContextManager, dict[str, float]]: ...


def next_token_loss(hm: HookedModel, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens of a left-padded batch."""
    logits = hm.forward(**batch.model_inputs()).logits[:, :-1].float()
    targets = batch.input_ids[:, 1:]
    valid = batch.attention_mask[:, 1:].bool() & batch.attention_mask[:, :-1].bool()
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return nll[valid].mean()


@dataclass
class _Run:
    """Everything a training step needs (one place, so ``_train_step`` stays a plain function)."""

    hm: HookedModel
    trainable: Trainable
    data: TrainData
    config: TrainConfig
    accelerator: Any
    optimizer: Any
    scheduler: Any
    objective: BoundObjective | None
    streams: dict[str, BatchStream]
    lm_tokens: list[list[int]]
    use_maintain: bool
    rank: int
    world: int
    perturbation: ForgetPerturbation | None = None

    def shard(self, indices: list[int]) -> list[int]:
        return indices[self.rank :: self.world]


def _train_step(run: _Run, step: int) -> dict[str, float]:
    """One optimizer step; returns the step's history entries."""
    hm, cfg = run.hm, run.config
    device = hm.device
    terms: dict[str, torch.Tensor] = {}
    loss = torch.zeros((), device=device)

    retain_batch, retain_index = None, None
    if "retain" in run.streams:
        retain_index = run.shard(run.streams["retain"].next())
        retain_batch = TargetBatch.from_pairs(
            hm, [run.data.retain[i] for i in retain_index], device=device
        )
    extra: dict[str, float] = {}
    if run.objective is not None:
        forget_index = run.shard(run.streams["forget"].next())
        if run.perturbation is None:
            forget_batch = TargetBatch.from_pairs(
                hm, [run.data.forget[i] for i in forget_index], device=device
            )
            perturbed: AbstractContextManager = nullcontext()
        else:
            seed = (cfg.seed * 1_000_003 + step) * 1_009 + run.rank
            forget_batch, perturbed, extra = run.perturbation.perturb(hm, forget_index, seed)
        with perturbed:
            value = run.objective(
                hm, ObjectiveStep(forget_batch, forget_index, retain_batch, retain_index)
            )
        terms["forget"] = value
        loss = loss + cfg.forget_coef * value
    if run.use_maintain and retain_batch is not None:
        value = edit_loss(hm, retain_batch)
        terms["maintain"] = value
        loss = loss + cfg.maintain_coef * value
    if "lm" in run.streams:
        lm_index = run.shard(run.streams["lm"].next())
        batch = left_pad([run.lm_tokens[i] for i in lm_index], hm.pad_id).to(device)
        value = next_token_loss(hm, batch)
        terms["lm"] = value
        loss = loss + cfg.lm_coef * value
    grad_norm, lr = apply_update(run, loss, cfg.max_grad_norm)

    values = torch.stack([loss.detach().float(), *(t.detach().float() for t in terms.values())])
    values = run.accelerator.reduce(values, "mean").tolist()
    record = {"loss": values[0], **dict(zip(terms, values[1:], strict=True))}
    record.update(lr=lr, grad_norm=float(grad_norm), **extra)
    return record


def _default_accelerator(hm: HookedModel):
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


def _check_sizes(config: TrainConfig, data: TrainData, world: int, active: dict[str, bool]) -> None:
    sizes = {
        "forget": (config.batch_size, len(data.forget)),
        "retain": (config.retain_batch_size, len(data.retain)),
        "lm": (config.lm_batch_size, len(data.general_text)),
    }
    for name, (size, n) in sizes.items():
        if active.get(name) and min(size, n) < world:
            raise ConfigError(
                f"the {name} batch ({min(size, n)} examples) cannot be split over {world} processes"
            )


def _meta(
    config: TrainConfig,
    trainable: Trainable,
    names: list[str],
    perturbation: ForgetPerturbation | None,
) -> dict[str, Any]:
    cfg = config.model_dump(mode="json")
    cfg.pop("checkpoint_every")
    return {
        "config": cfg,
        "mode": trainable.mode,
        "components": trainable.components,
        "params": names,
        "forget_perturbation": perturbation.describe() if perturbation is not None else None,
    }


def train(
    hm: HookedModel,
    trainable: Trainable,
    data: TrainData,
    config: TrainConfig,
    *,
    accelerator=None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    forget_perturbation: ForgetPerturbation | None = None,
) -> TrainResult:
    """Train ``trainable`` on ``data`` for ``config.steps`` steps (see the module docstring).

    ``on_step(steps_done, record)`` is called after every step with the model in eval mode
    (e.g. to evaluate during training, as the relearning attack does); training resumes after.

    ``checkpoint_dir`` + ``config.checkpoint_every``: save a checkpoint every that many steps
    (and at the end); ``resume=True`` continues from the newest checkpoint there (the model
    and trainable must be freshly made as for the original run: references are recomputed
    from the unedited weights, then the trained parameters are loaded).
    """
    data.validate()
    if not trainable.active:
        raise ConfigError("this Trainable was restored or merged; make a new one")
    if trainable.hm is not hm:
        raise ConfigError("the Trainable was made for another HookedModel")
    if config.checkpoint_every is not None and checkpoint_dir is None:
        raise ConfigError("checkpoint_every is set but no checkpoint_dir was given")
    if resume and checkpoint_dir is None:
        raise ConfigError("resume=True needs a checkpoint_dir")

    active = {
        "forget": config.forget_coef != 0,
        "retain": bool(data.retain),
        "maintain": config.maintain_coef != 0 and bool(data.retain),
        "lm": config.lm_coef != 0 and bool(data.general_text),
    }
    if not (active["forget"] or active["maintain"] or active["lm"]):
        raise ConfigError("every loss term has a zero coefficient or no data: nothing to train")
    accelerator = accelerator or _default_accelerator(hm)
    world, rank = accelerator.num_processes, accelerator.process_index
    _check_sizes(config, data, world, active)

    with ExitStack() as stack:
        stack.callback(hm.model.train, hm.model.training)  # runs last, even on errors
        hm.model.eval()
        objective = None
        if active["forget"]:
            objective = bind_objective(
                hm,
                config.objective,
                data.forget,
                data.retain,
                config.objective_options,
                batch_size=config.batch_size,
            )
        if forget_perturbation is not None:
            if objective is None:
                raise ConfigError("a forget perturbation needs an active forget term")
            forget_perturbation.bind(hm, data)
        lm_tokens: list[list[int]] = []
        if active["lm"]:
            lm_tokens = [hm.tokenize(t)[: config.lm_max_tokens] for t in data.general_text]
            if any(len(t) < 2 for t in lm_tokens):
                raise DataError("every general text needs at least two tokens for the LM term")

        streams: dict[str, BatchStream] = {}
        seeds = {"forget": 1, "retain": 2, "lm": 3}
        counts = {"forget": len(data.forget), "retain": len(data.retain), "lm": len(lm_tokens)}
        sizes = {
            "forget": config.batch_size,
            "retain": config.retain_batch_size,
            "lm": config.lm_batch_size,
        }
        for name in ("forget", "retain", "lm"):
            if active[name]:
                streams[name] = BatchStream(
                    counts[name], sizes[name], config.seed * 7919 + seeds[name]
                )

        named = trainable.named_params()
        names = list(named)
        optimizer = torch.optim.AdamW(
            list(named.values()), lr=config.lr, weight_decay=config.weight_decay
        )
        total, warmup, schedule = config.steps, config.warmup_steps, config.schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, warmup, schedule)
        )
        # accelerate steps a prepared scheduler once per process unless batches are split (ours
        # are: one global batch per step), so only hand it over in that case.
        prepare_scheduler = world == 1 or accelerator.split_batches
        if prepare_scheduler:
            model, optimizer, scheduler = accelerator.prepare(hm.model, optimizer, scheduler)
        else:
            model, optimizer = accelerator.prepare(hm.model, optimizer)
        stack.callback(_release, accelerator, model, optimizer, scheduler)

        history: dict[str, list[float]] = {}
        start = 0
        meta = _meta(config, trainable, names, forget_perturbation)
        if resume and (path := latest_checkpoint(checkpoint_dir)) is not None:
            start = _load(path, meta, named, optimizer, scheduler, streams, history)
            log(f"resumed from {path} at step {start}")

        run = _Run(
            hm,
            trainable,
            data,
            config,
            accelerator,
            optimizer,
            scheduler,
            objective,
            streams,
            lm_tokens,
            active["maintain"],
            rank,
            world,
            forget_perturbation,
        )
        lat = " under a latent adversary (LAT)" if forget_perturbation is not None else ""
        log(
            f"training {trainable.mode} ({trainable.n_params:,} parameters) with "
            f"{config.objective if objective else '(no objective)'}{lat}; terms: "
            f"{', '.join(k for k in ('forget', 'maintain', 'lm') if active[k])}; "
            f"{config.steps} steps on {world} process(es), {hm.device}"
            + (f"; objective setup: {objective.info}" if objective and objective.info else "")
        )
        began = time.perf_counter()
        device = hm.device
        stack.enter_context(hm.forward_via(model if model is not hm.model else None))
        stack.enter_context(
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        )
        advance = stack.enter_context(
            progress_bar(
                config.steps - start,
                f"{trainable.mode} {config.objective}",
                enabled=progress and accelerator.is_main_process,
            )
        )
        hm.model.train()
        for step in range(start, config.steps):
            torch.manual_seed((config.seed * 1_000_003 + step) * 1_009 + rank)
            tick = time.perf_counter()
            record = _train_step(run, step)
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
                and config.checkpoint_every
                and (done % config.checkpoint_every == 0 or done == config.steps)
            ):
                _save(
                    checkpoint_dir,
                    done,
                    named,
                    optimizer,
                    scheduler,
                    streams,
                    history,
                    meta,
                    accelerator,
                )
                log(f"step {done}: loss {record['loss']:.4f}; checkpoint saved")
    seconds = time.perf_counter() - began
    if history:
        log(
            f"trained {config.steps - start} steps in {seconds:.1f}s; final loss {history['loss'][-1]:.4f}"
        )
    info = {
        "processes": world,
        "forward_module": type(model).__name__,
        "objective": dict(objective.info) if objective else {},
    }
    return TrainResult(config.steps, history, seconds, trainable.n_params, info)


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


def _save(
    directory, step, named, optimizer, scheduler, streams, history, meta, accelerator
) -> None:
    if accelerator.is_main_process:
        save_checkpoint(
            directory,
            step,
            {name: p.detach() for name, p in named.items()},
            optimizer.state_dict(),
            scheduler.state_dict(),
            {name: s.state_dict() for name, s in streams.items()},
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
    with torch.no_grad():
        for name, param in named.items():
            param.copy_(ckpt.params[name].to(device=param.device, dtype=param.dtype))
    optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(ckpt.scheduler)
    for name, stream in streams.items():
        stream.load_state_dict(ckpt.streams[name])
    history.update({k: list(v) for k, v in ckpt.history.items()})
    return ckpt.step


def apply_update(
    run, loss: torch.Tensor, max_grad_norm: float | None
) -> tuple[torch.Tensor, float]:
    """Backward, clip, optimizer and scheduler step, then the trainable's post-step fix-up.

    ``run`` has ``accelerator``, ``optimizer``, ``scheduler``, ``trainable`` and ``world``;
    shared by the editing trainer and the LAT trainer. Returns the gradient norm and the
    learning rate the step used.
    """
    if run.world > 1:
        # DDP (without find_unused_parameters) waits for a gradient of every trained
        # parameter; a term may not reach all of them (RMU stops mattering above its layer).
        loss = loss + 0.0 * sum(p.reshape(-1)[:1].sum() for p in run.trainable.params)
    run.accelerator.backward(loss)
    max_norm = max_grad_norm if max_grad_norm is not None else math.inf
    grad_norm = run.accelerator.clip_grad_norm_(run.trainable.params, max_norm)
    lr = float(run.optimizer.param_groups[0]["lr"])
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.trainable.after_step()
    return grad_norm, lr
