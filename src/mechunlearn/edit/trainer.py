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

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import BaseModel, Field, field_validator, model_validator

from mechunlearn.edit.data import TrainData
from mechunlearn.edit.engine import (
    BatchStream,
    Engine,
    OptimConfig,
    check_trainable,
    default_accelerator,
    keep_mode,
    lr_factor,
    nest_optim_fields,
    run_training,
    step_seed,
    total_loss,
)
from mechunlearn.edit.latent_adversary import checked_adversary_progress
from mechunlearn.edit.objectives import (
    OBJECTIVES,
    BoundObjective,
    ObjectiveStep,
    bind_objective,
    edit_loss,
    shared_forward,
)
from mechunlearn.edit.parametrization import Trainable
from mechunlearn.errors import ConfigError, DataError
from mechunlearn.models.batches import TargetBatch, left_pad
from mechunlearn.models.handle import HookedModel
from mechunlearn.models.next_token import next_token_loss
from mechunlearn.schema import STRICT_CONFIG

__all__ = ["BatchStream", "TrainConfig", "TrainResult", "lr_factor", "next_token_loss", "train"]


class TrainConfig(BaseModel):
    """Hyperparameters of one training run (see the module docstring for the loss)."""

    model_config = STRICT_CONFIG

    objective: str = "edit"
    objective_options: dict[str, Any] = Field(default_factory=dict)
    forget_coef: float = 1.0
    maintain_coef: float = 1.0
    lm_coef: float = 1.0
    steps: int = Field(30, ge=1)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    batch_size: int = Field(16, ge=1)
    retain_batch_size: int = Field(16, ge=1)
    lm_batch_size: int = Field(4, ge=1)
    lm_max_tokens: int = Field(128, ge=2, description="general texts are cut to this many tokens")
    joint_forward: bool = Field(
        True,
        description="one forward for the forget and maintain batches when the objective only "
        "scores target tokens (that pass about 15% faster on Gemma; equal up to float summation order)",
    )
    seed: int = 0
    checkpoint_every: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _nest_optim(cls, data: Any) -> Any:
        return nest_optim_fields(data)

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
    went through (``DistributedDataParallel`` when several), the objective setup's choices and
    ``resumed_at`` (the checkpoint's step a resumed run began from; 0 when fresh) and, under a
    latent adversary, ``adversary`` (``edit.latent_adversary.adversary_progress``)."""

    steps: int
    history: dict[str, list[float]]
    seconds: float
    n_trainable: int
    info: dict[str, Any] = field(default_factory=dict)


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


@dataclass
class _Terms:
    """What the editing step draws from, bound once before training."""

    data: TrainData
    config: TrainConfig
    objective: BoundObjective | None
    lm_tokens: list[list[int]]
    use_maintain: bool
    perturbation: ForgetPerturbation | None = None


def _train_step(run: _Terms, engine: Engine, step: int) -> dict[str, float]:
    """One optimizer step: the weighted sum of the active terms; returns the step's history
    entries (the total and every unweighted term, averaged over processes)."""
    hm, cfg = engine.hm, run.config
    device = hm.device
    terms: dict[str, torch.Tensor] = {}
    coefs: dict[str, float] = {}

    retain_batch, retain_index = None, None
    if "retain" in engine.streams:
        retain_index = engine.shard(engine.streams["retain"].next())
        retain_batch = TargetBatch.from_pairs(
            hm, [run.data.retain[i] for i in retain_index], device=device
        )
    extra: dict[str, float] = {}
    maintain = run.use_maintain and retain_batch is not None
    shared: AbstractContextManager = nullcontext()
    if run.objective is not None:
        forget_index = engine.shard(engine.streams["forget"].next())
        if run.perturbation is None:
            forget_batch = TargetBatch.from_pairs(
                hm, [run.data.forget[i] for i in forget_index], device=device
            )
            perturbed: AbstractContextManager = nullcontext()
            joint = cfg.joint_forward and getattr(
                run.objective.objective, "target_tokens_only", False
            )
            if maintain and joint:
                shared = shared_forward(hm, [forget_batch, retain_batch])
        else:
            seed = step_seed(cfg.seed, step, engine.rank)
            forget_batch, perturbed, extra = run.perturbation.perturb(hm, forget_index, seed)
    with shared:
        if run.objective is not None:
            with perturbed:
                terms["forget"] = run.objective(
                    hm, ObjectiveStep(forget_batch, forget_index, retain_batch, retain_index)
                )
            coefs["forget"] = cfg.forget_coef
        if maintain:
            terms["maintain"] = edit_loss(hm, retain_batch)
            coefs["maintain"] = cfg.maintain_coef
    if "lm" in engine.streams:
        lm_index = engine.shard(engine.streams["lm"].next())
        batch = left_pad([run.lm_tokens[i] for i in lm_index], hm.pad_id).to(device)
        terms["lm"] = next_token_loss(hm, batch)
        coefs["lm"] = cfg.lm_coef
    loss = total_loss(terms, coefs, device)
    grad_norm, lr = engine.update(loss)

    values = torch.stack([loss.detach().float(), *(t.detach().float() for t in terms.values())])
    values = engine.accelerator.reduce(values, "mean").tolist()
    record = {"loss": values[0], **dict(zip(terms, values[1:], strict=True))}
    record.update(lr=lr, grad_norm=float(grad_norm), **extra)
    return record


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
    config: TrainConfig, trainable: Trainable, perturbation: ForgetPerturbation | None
) -> dict[str, Any]:
    cfg = config.model_dump(mode="json")
    cfg.pop("checkpoint_every")
    return {
        "config": cfg,
        "mode": trainable.mode,
        "components": trainable.components,
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
    stop_after: int | None = None,
) -> TrainResult:
    """Train ``trainable`` on ``data`` for ``config.steps`` steps (see the module docstring).

    ``on_step(steps_done, record)`` is called after every step with the model in eval mode
    (e.g. to evaluate during training, as the relearning attack does); training resumes after.

    ``checkpoint_dir`` + ``config.checkpoint_every``: save a checkpoint every that many steps
    (and at the end); ``resume=True`` continues from the newest checkpoint there (the model
    and trainable must be freshly made as for the original run: references are recomputed
    from the unedited weights, then the trained parameters are loaded).

    ``stop_after``: stop after that many steps of the ``config.steps``-long schedule.
    """
    data.validate()
    check_trainable(hm, trainable)
    if config.checkpoint_every is not None and checkpoint_dir is None:
        raise ConfigError("checkpoint_every is set but no checkpoint_dir was given")

    active = {
        "forget": config.forget_coef != 0,
        "retain": bool(data.retain),
        "maintain": config.maintain_coef != 0 and bool(data.retain),
        "lm": config.lm_coef != 0 and bool(data.general_text),
    }
    if not (active["forget"] or active["maintain"] or active["lm"]):
        raise ConfigError("every loss term has a zero coefficient or no data: nothing to train")
    accelerator = accelerator or default_accelerator(hm)
    world = accelerator.num_processes
    _check_sizes(config, data, world, active)

    with keep_mode(hm):
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
            streams[name] = BatchStream(counts[name], sizes[name], config.seed * 7919 + seeds[name])

    run = _Terms(data, config, objective, lm_tokens, active["maintain"], forget_perturbation)
    lat = " under a latent adversary (LAT)" if forget_perturbation is not None else ""
    log(
        f"training {trainable.mode} ({trainable.n_params:,} parameters) with "
        f"{config.objective if objective else '(no objective)'}{lat}; terms: "
        f"{', '.join(k for k in ('forget', 'maintain', 'lm') if active[k])}; "
        f"{config.steps} steps on {world} process(es), {hm.device}"
        + (f"; objective setup: {objective.info}" if objective and objective.info else "")
    )
    loop = run_training(
        hm,
        trainable,
        config.optim,
        lambda engine, step: _train_step(run, engine, step),
        steps=config.steps,
        seed=config.seed,
        streams=streams,
        label=f"{trainable.mode} {config.objective}",
        accelerator=accelerator,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=config.checkpoint_every,
        resume=resume,
        meta=_meta(config, trainable, forget_perturbation),
        progress=progress,
        log=log,
        on_step=on_step,
        stop_after=stop_after,
    )
    history = loop.history
    if history:
        log(
            f"trained {len(history['loss']) - loop.started_at} steps in {loop.seconds:.1f}s; "
            f"final loss {history['loss'][-1]:.4f}"
        )
    info = {
        "processes": loop.world,
        "forward_module": loop.forward_module,
        "objective": dict(objective.info) if objective else {},
        "resumed_at": loop.started_at,
        "adversary": checked_adversary_progress(history, log),
    }
    steps_done = len(history.get("loss", []))
    return TrainResult(steps_done, history, loop.seconds, trainable.n_params, info)
