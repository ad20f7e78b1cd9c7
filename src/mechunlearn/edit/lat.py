"""Targeted latent adversarial training (LAT; Sheshadri et al. 2024, arXiv:2407.15549, Sec. 3,
Eqs. 2-3), and its baselines RT (the same training without an adversary) and EAT (the
adversary in embedding space); with ``defender_loss="dpo"`` the defender's preference term is
DPO (Rafailov et al. 2023, arXiv:2305.18290, Eq. 7), giving DPO and DPO-LAT.

Every step draws a batch of (prompt, desired, unwanted) examples and

1. trains a latent adversary on it against the current model (``edit.latent_adversary``; weights
   frozen, eval mode): perturbations of the residual stream at chosen layers, per-token L2
   bound, pushing toward the unwanted completion (Eq. 2);
2. takes ``defender_steps`` optimizer steps with that perturbation frozen and active (Eq. 3)::

       L = t * CE(desired | x, delta)                 # toward the desired completion
         + a * (-log(1 - p(unwanted | x, delta)))     # away from the unwanted one (floor -5)
         + b * benign term (perturbation off)

   where the benign term is SFT (CE on benign (prompt, completion) pairs) or ``KL(current ||
   base)`` of the next-token distributions at the benign completion positions (the anchor
   implementation's direction). The base is the model before training: for LoRA the adapters
   are switched off (``Trainable.adapters_disabled``), otherwise log-probs of the unedited model
   are computed once before training (memory: benign completion tokens x vocabulary floats on
   the CPU). ``t, a, b`` are ``toward_coef, away_coef, benign_coef`` normalised to sum to 1 over
   the active terms (a term is active when its coefficient is > 0 and it has data).

DPO (``defender_loss="dpo"``) replaces the toward and away terms by (Eq. 7 of Rafailov et al.)::

       L_dpo = -log sigmoid(beta * [(log pi(y+ | x, delta) - log pi_ref(y+ | x))
                                   - (log pi(y- | x, delta) - log pi_ref(y- | x))])

   with sequence log-probs (sums over completion tokens), ``y+`` the desired completion (y_w)
   and ``y-`` the unwanted one (y_l), weighted by ``dpo_coef`` (normalised with ``benign_coef``).
   The reference is the model before training, without perturbation (as the anchor
   implementation disables its adversary hooks for the reference): computed once before
   training for the examples the seeded batches will draw, with the LoRA adapters switched off
   for LoRA trainables. With the
   adversary active this is DPO-LAT; ``adversary=None`` is plain DPO. SFT is
   ``defender_loss="toward_away"`` with ``away_coef=0``.

LAT on top of an editing or unlearning objective (Sec. 4.3: "LAT can augment existing unlearning
methods") is ``ForgetLat``, a ``forget_perturbation`` of ``edit.trainer.train``: every step a
latent adversary is trained on that step's forget batch toward the unwanted answer (the
original answer when editing, the answer being removed when unlearning), and the objective's
forget term (edit, unlearn, gradient ascent, NPO, RMU, ...) is computed under it; the maintain
and LM terms run clean.

``adversary=None`` gives RT (same batches, same number of defender steps, no perturbation);
with ``epsilon = 0`` LAT reduces exactly to RT (tested). EAT is ``layers=["embed"]``
(``lat_baseline``).

Machinery shared with ``edit.trainer``: ``BatchStream`` batches, ``lr_factor`` (warmup and
schedule count optimizer steps, i.e. ``steps * defender_steps``), AdamW, clipping, accelerate
(DDP via ``hm.forward_via``; process ``r`` of ``N`` takes rows ``r::N`` of each batch and
trains its own adversary on them, so relative bounds are per-shard medians), per-step seeds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field, model_validator

from mechunlearn.edit.data import TrainData
from mechunlearn.edit.engine import (
    BatchStream,
    Engine,
    OptimConfig,
    check_trainable,
    default_accelerator,
    keep_mode,
    nest_optim_fields,
    run_training,
    step_seed,
    total_loss,
)
from mechunlearn.edit.latent_adversary import (
    LatentAdversary,
    LatentAdversaryConfig,
    checked_adversary_progress,
    completion_terms,
    resolve_sites,
    train_adversary,
)
from mechunlearn.edit.objectives import DEFAULT_FLOOR, edit_loss, token_logprobs
from mechunlearn.edit.parametrization import Trainable
from mechunlearn.edit.trainer import TrainResult
from mechunlearn.errors import ConfigError, DataError, TokenizationError
from mechunlearn.models.batches import LatBatch, LatSequences, TargetBatch
from mechunlearn.models.handle import HookedModel
from mechunlearn.schema import STRICT_CONFIG
from mechunlearn.tasks.preference import KINDS, LatData


class LatConfig(BaseModel):
    """Hyperparameters of a LAT (or RT: ``adversary=None``) run; see the module docstring."""

    model_config = STRICT_CONFIG

    adversary: LatentAdversaryConfig | None
    steps: int = Field(30, ge=1)
    defender_steps: int = Field(1, ge=1, description="optimizer steps per adversary (K)")
    optim: OptimConfig = Field(default_factory=OptimConfig)
    batch_size: int = Field(8, ge=1)
    benign_batch_size: int = Field(8, ge=1)
    seed: int = 0
    toward_coef: float = Field(1.0, ge=0, description="CE toward the desired completion")
    away_coef: float = Field(1.0, ge=0, description="-log(1-p) away from the unwanted one")
    benign_coef: float = Field(1.0, ge=0)
    benign: Literal["sft", "kl"] = "sft"
    away_floor: float = Field(DEFAULT_FLOOR, lt=0)
    defender_loss: Literal["toward_away", "dpo"] = Field(
        "toward_away", description="toward/away terms, or DPO on (desired, unwanted)"
    )
    dpo_beta: float = Field(0.1, gt=0, description="DPO's beta (inverse KL strength)")
    dpo_coef: float = Field(1.0, gt=0, description="weight of the DPO term (dpo only)")

    checkpoint_every: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _nest_optim(cls, data: Any) -> Any:
        return nest_optim_fields(data)

    @model_validator(mode="after")
    def _something_to_defend(self) -> LatConfig:
        if self.defender_loss == "toward_away" and self.toward_coef == 0 and self.away_coef == 0:
            raise ValueError("toward_coef and away_coef are both 0: nothing to train against")
        return self


def lat_baseline(config: LatConfig, kind: Literal["rt", "eat"]) -> LatConfig:
    """RT (no adversary) or EAT (the same adversary on the embeddings) for a LAT config."""
    if kind == "rt":
        return config.model_copy(update={"adversary": None})
    if kind == "eat":
        if config.adversary is None:
            raise ConfigError("EAT needs an adversary configuration to move to the embeddings")
        return config.model_copy(
            update={"adversary": config.adversary.model_copy(update={"layers": ["embed"]})}
        )
    raise ConfigError(f"unknown LAT baseline {kind!r}; known: rt, eat")


def normalised_coefs(config: LatConfig, has_benign: bool) -> dict[str, float]:
    """Active terms' coefficients scaled to sum to 1 (inactive terms are left out)."""
    if config.defender_loss == "dpo":
        raw = {"dpo": config.dpo_coef}
    else:
        raw = {"toward": config.toward_coef, "away": config.away_coef}
    if has_benign:
        raw["benign"] = config.benign_coef
    active = {k: v for k, v in raw.items() if v > 0}
    total = sum(active.values())
    return {k: v / total for k, v in active.items()}


def check_benign(benign: Sequence[tuple[str, str]] | None) -> list[tuple[str, str]]:
    """Benign (prompt, completion) pairs, or ``DataError`` naming the malformed one."""
    out = []
    for index, pair in enumerate(benign or ()):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise DataError(f"benign example {index} is not a (prompt, completion) pair: {pair!r}")
        prompt, completion = pair
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"benign example {index}: {name} is missing or empty ({value!r})")
        out.append((prompt, completion))
    return out


def _pair_tokens(hm: HookedModel, pairs: Sequence[tuple[str, str]]) -> list[tuple[list, list]]:
    out = []
    for prompt, completion in pairs:
        p = hm.tokenize(prompt)
        c = hm.tokenize(completion, add_special_tokens=False)
        if not p or not c:
            raise TokenizationError(f"benign pair {(prompt, completion)!r} tokenizes to nothing")
        out.append((p, c))
    return out


def _target_log_softmax(hm: HookedModel, batch: TargetBatch) -> torch.Tensor:
    """``[rows, keep, vocab]`` next-token log-probs at the positions predicting the last
    ``keep = max(n_targets)`` tokens (row ``j`` predicts token ``width - keep + j``)."""
    keep = max(batch.n_targets)
    logits = hm.forward_predicting_last(keep, **batch.model_inputs())
    return logits.float().log_softmax(-1)


class _KLReference:
    """Base-model next-token log-probs on benign batches: LoRA adapters off, or precomputed."""

    def __init__(
        self,
        hm: HookedModel,
        trainable: Trainable,
        pairs: list[tuple[list, list]],
        batch_size: int,
    ) -> None:
        self.hm, self.trainable = hm, trainable
        self.lora = trainable.mode == "lora"
        self.saved: list[torch.Tensor] = []
        if not self.lora:
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start : start + batch_size]
                ref = self._compute(_benign_batch(hm, chunk))
                for row, (_, c) in enumerate(chunk):
                    self.saved.append(ref[row, ref.shape[1] - len(c) :].cpu())

    @torch.no_grad()
    def _compute(self, batch: TargetBatch) -> torch.Tensor:
        """The base model's log-probs now: adapters off (LoRA), eval mode, no DDP wrapper."""
        model = self.hm.model
        with ExitStack() as stack:
            stack.enter_context(self.hm.forward_via(None))
            if self.lora:
                stack.enter_context(self.trainable.adapters_disabled())
            stack.callback(model.train, model.training)
            model.eval()
            return _target_log_softmax(self.hm, batch)

    def __call__(self, batch: TargetBatch, index: Sequence[int]) -> torch.Tensor:
        if self.lora:
            return self._compute(batch)
        keep = max(batch.n_targets)
        first = self.saved[index[0]]
        out = torch.zeros(len(index), keep, first.shape[-1], device=self.hm.device)
        for row, i in enumerate(index):
            ref = self.saved[i]
            out[row, keep - ref.shape[0] :] = ref.to(self.hm.device)
        return out


def _benign_batch(hm: HookedModel, pairs: Sequence[tuple[list, list]]) -> TargetBatch:
    return TargetBatch.from_tokens([p for p, _ in pairs], [c for _, c in pairs], hm.pad_id).to(
        hm.device
    )


def kl_to_reference(hm: HookedModel, batch: TargetBatch, reference: torch.Tensor) -> torch.Tensor:
    """Mean over benign completion tokens of ``KL(current || reference)`` (next-token
    distributions at the positions predicting them)."""
    current = _target_log_softmax(hm, batch)
    keep = current.shape[1]
    mask = batch.target_mask[:, batch.input_ids.shape[1] - keep :].bool()
    kl = (current.exp() * (current - reference)).sum(-1)
    return kl[mask].mean()


def dpo_loss(
    policy_desired: torch.Tensor,
    policy_unwanted: torch.Tensor,
    ref_desired: torch.Tensor,
    ref_unwanted: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Mean over examples of Eq. 7 of Rafailov et al. 2023 (sequence log-probs ``[b]``; the
    desired completion is the preferred ``y_w``, the unwanted one ``y_l``)."""
    margin = (policy_desired - ref_desired) - (policy_unwanted - ref_unwanted)
    return -torch.nn.functional.logsigmoid(beta * margin).mean()


def _sequence_sums(logprobs: torch.Tensor, seqs: LatSequences, kind: str) -> torch.Tensor:
    rows = seqs.rows(kind)
    return (logprobs[rows] * seqs.batch.target_mask[rows].to(logprobs.dtype)).sum(-1)


class _DPOReference:
    """Per example, the sequence log-probs of the desired and the unwanted completion under the
    model before training (no perturbation; LoRA adapters off), computed once before training
    for the examples the run will draw (``used``; the batch stream is seeded)."""

    def __init__(
        self,
        hm: HookedModel,
        trainable: Trainable,
        examples: list[tuple[list, list, list]],
        used: Sequence[int],
        batch_size: int,
    ) -> None:
        self.values = torch.full((len(examples), 2), math.nan, dtype=torch.float64)
        model = hm.model
        used = sorted(set(used))
        with ExitStack() as stack, torch.no_grad():
            stack.enter_context(hm.forward_via(None))
            if trainable.mode == "lora":
                stack.enter_context(trainable.adapters_disabled())
            stack.callback(model.train, model.training)
            model.eval()
            for start in range(0, len(used), batch_size):
                rows = used[start : start + batch_size]
                chunk = [examples[i] for i in rows]
                batch = LatBatch(
                    [e[0] for e in chunk], [e[1] for e in chunk], [e[2] for e in chunk], hm.pad_id
                )
                seqs = batch.sequences(KINDS, hm.device)
                logprobs = token_logprobs(hm, seqs.batch)
                pair = [_sequence_sums(logprobs, seqs, k) for k in ("desired", "unwanted")]
                self.values[rows] = torch.stack(pair, -1).double().cpu()
        self.n_forwards = math.ceil(len(used) / batch_size)

    def __call__(self, index: Sequence[int], device: torch.device) -> tuple[torch.Tensor, ...]:
        picked = self.values[list(index)]
        if picked.isnan().any():
            raise RuntimeError(f"no DPO reference for examples {list(index)}: not precomputed")
        picked = picked.to(device=device, dtype=torch.float32)
        return picked[:, 0], picked[:, 1]


def _drawn_indices(n: int, batch_size: int, seed: int, steps: int) -> list[int]:
    """Every example index a ``BatchStream(n, batch_size, seed)`` yields in ``steps`` draws."""
    stream = BatchStream(n, batch_size, seed)
    return sorted({i for _ in range(steps) for i in stream.next()})


@dataclass
class _Run:
    hm: HookedModel
    trainable: Trainable
    config: LatConfig
    coefs: dict[str, float]
    kinds: tuple[str, ...]
    examples: list[tuple[list, list, list]]
    benign: list[tuple[list, list]]
    reference: _KLReference | None
    dpo_reference: _DPOReference | None


def _defender_step(
    run: _Run,
    engine: Engine,
    seqs: LatSequences,
    index: list[int],
    adversary: LatentAdversary | None,
    benign: tuple[TargetBatch, list[int]] | None,
) -> dict[str, float]:
    """One optimizer step against the frozen perturbation (plus the benign term without it)."""
    hm, cfg, coefs = run.hm, run.config, run.coefs
    with adversary.active(hm, seqs) if adversary is not None else nullcontext():
        logprobs = token_logprobs(hm, seqs.batch)
    parts = completion_terms(logprobs, seqs, cfg.away_floor)
    terms: dict[str, torch.Tensor] = {}
    if "toward" in coefs:
        terms["toward"] = parts["desired_nll"]
    if "away" in coefs:
        terms["away"] = parts["unwanted_away"]
    margin = None
    if "dpo" in coefs:
        ref_desired, ref_unwanted = run.dpo_reference(index, hm.device)
        desired = _sequence_sums(logprobs, seqs, "desired")
        unwanted = _sequence_sums(logprobs, seqs, "unwanted")
        terms["dpo"] = dpo_loss(desired, unwanted, ref_desired, ref_unwanted, cfg.dpo_beta)
        margin = ((desired - ref_desired) - (unwanted - ref_unwanted)).detach().mean()
    if benign is not None:
        batch, benign_index = benign
        if cfg.benign == "sft":
            terms["benign"] = edit_loss(hm, batch)
        else:
            terms["benign"] = kl_to_reference(hm, batch, run.reference(batch, benign_index))
    loss = total_loss(terms, coefs, hm.device)
    grad_norm, lr = engine.update(loss)

    record = {"loss": loss.detach().float(), **{k: v.detach().float() for k, v in terms.items()}}
    if "unwanted_nll" in parts:  # how far the (frozen) attack got, before this update
        record["unwanted_nll"] = parts["unwanted_nll"].detach().float()
    if margin is not None:  # DPO's implicit reward margin (over beta), before this update
        record["dpo_margin"] = margin.float()
    record = {k: float(v) for k, v in record.items()}
    record.update(lr=lr, grad_norm=float(grad_norm))
    return record


def _lat_step(run: _Run, engine: Engine, step: int) -> dict[str, float]:
    """Train an adversary on this step's batch, then ``defender_steps`` optimizer steps."""
    hm, cfg = run.hm, run.config
    index = engine.shard(engine.streams["lat"].next())
    batch = LatBatch(
        [run.examples[i][0] for i in index],
        [run.examples[i][1] for i in index],
        [run.examples[i][2] for i in index],
        hm.pad_id,
    )
    seqs = batch.sequences(run.kinds, hm.device)
    record: dict[str, float] = {}
    adversary = None
    if cfg.adversary is not None:
        tick = time.perf_counter()
        seed = step_seed(cfg.seed, step, engine.rank)
        adversary = train_adversary(hm, batch, cfg.adversary, seed=seed)
        record["adv_seconds"] = time.perf_counter() - tick
        if adversary.losses:
            record["adv_loss_first"] = adversary.losses[0]
            record["adv_loss_last"] = adversary.losses[-1]
        record.update({f"eps/{site}": eps for site, eps in adversary.epsilons.items()})
    benign = None
    if "benign" in run.coefs:
        b_index = engine.shard(engine.streams["benign"].next())
        benign = (_benign_batch(hm, [run.benign[i] for i in b_index]), b_index)

    sums: dict[str, float] = {}
    k_steps = cfg.defender_steps
    for k in range(k_steps):
        torch.manual_seed(step_seed(cfg.seed, step * k_steps + k, engine.rank))
        values = _defender_step(run, engine, seqs, index, adversary, benign)
        if k == 0:
            for key in ("lr", "unwanted_nll", "dpo_margin"):
                if key in values:
                    record[key] = values[key]
        for key, value in values.items():
            if key not in ("lr", "unwanted_nll", "dpo_margin"):
                sums[key] = sums.get(key, 0.0) + value / k_steps
    record.update(sums)
    return engine.mean_over_processes(record)


def _method_label(config: LatConfig, sites: Sequence[str]) -> str:
    name = "DPO" if config.defender_loss == "dpo" else "RT"
    if config.adversary is None:
        return name
    return f"{'DPO-LAT' if config.defender_loss == 'dpo' else 'LAT'} at {', '.join(sites)}"


def train_lat(
    hm: HookedModel,
    trainable: Trainable,
    data: LatData,
    benign: Sequence[tuple[str, str]] | None,
    config: LatConfig,
    *,
    accelerator=None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Targeted LAT (or RT / EAT) of ``trainable`` on ``data`` (see the module docstring).

    ``history[key][i]`` is LAT step ``i``'s value: ``loss``, ``toward``, ``away``, ``dpo``,
    ``benign`` (unweighted terms), ``grad_norm`` (means over the defender steps), ``lr`` (first
    defender step), ``unwanted_nll`` (CE of the unwanted completions under the frozen attack
    before the defender's update; clean for RT), ``dpo_margin`` (DPO: mean log-ratio difference
    of Eq. 7, before the first defender update), ``adv_loss_first``/``adv_loss_last`` (the
    adversary's objective at its first/last step), ``eps/<site>`` (bounds used),
    ``adv_seconds`` and ``seconds`` (the whole step). ``on_step(steps_done, record)`` runs in eval mode.
    ``checkpoint_dir`` + ``config.checkpoint_every``: checkpoints as in ``edit.trainer.train``;
    ``resume=True`` continues from the newest one (references are recomputed from the unedited
    weights first, so the trainable must be freshly made).
    """
    data.validate()
    benign_pairs = check_benign(benign)
    check_trainable(hm, trainable)
    if config.checkpoint_every is not None and checkpoint_dir is None:
        raise ConfigError("checkpoint_every is set but no checkpoint_dir was given")
    sites = resolve_sites(hm, config.adversary.layers) if config.adversary else []
    coefs = normalised_coefs(config, bool(benign_pairs))
    if "dpo" in coefs:
        kinds = KINDS
    else:
        kinds = tuple(k for k, term in zip(KINDS, ("away", "toward"), strict=True) if term in coefs)
    accelerator = accelerator or default_accelerator(hm)
    world = accelerator.num_processes
    sizes = {"LAT": (config.batch_size, len(data))}
    if "benign" in coefs:
        sizes["benign"] = (config.benign_batch_size, len(benign_pairs))
    for name, (size, n) in sizes.items():
        if min(size, n) < world:
            raise ConfigError(
                f"the {name} batch ({min(size, n)} examples) cannot be split over {world} processes"
            )

    with keep_mode(hm):
        batch = LatBatch.from_examples(hm, data.examples)  # tokenizes and checks every example
        examples = list(zip(batch.prompts, batch.desired, batch.unwanted, strict=True))
        benign_tokens = _pair_tokens(hm, benign_pairs) if "benign" in coefs else []
        reference = None
        if "benign" in coefs and config.benign == "kl":
            reference = _KLReference(hm, trainable, benign_tokens, config.benign_batch_size)
        lat_seed = config.seed * 7919 + 1
        dpo_reference = None
        if "dpo" in coefs:
            used = _drawn_indices(len(examples), config.batch_size, lat_seed, config.steps)
            dpo_reference = _DPOReference(hm, trainable, examples, used, config.batch_size)
    streams = {"lat": BatchStream(len(examples), config.batch_size, lat_seed)}
    if "benign" in coefs:
        streams["benign"] = BatchStream(
            len(benign_tokens), config.benign_batch_size, config.seed * 7919 + 4
        )
    run = _Run(
        hm, trainable, config, coefs, kinds, examples, benign_tokens, reference, dpo_reference
    )
    method = _method_label(config, sites)
    log(
        f"{method}: {trainable.mode} ({trainable.n_params:,} parameters), "
        f"coefficients {coefs}, {config.steps} steps x {config.defender_steps} defender "
        f"step(s) on {world} process(es), {hm.device}"
    )
    meta = {
        "config": config.model_dump(mode="json", exclude={"checkpoint_every"}),
        "mode": trainable.mode,
        "components": trainable.components,
    }
    loop = run_training(
        hm,
        trainable,
        config.optim,
        lambda engine, step: _lat_step(run, engine, step),
        steps=config.steps,
        seed=config.seed,
        streams=streams,
        label=method,
        updates_per_step=config.defender_steps,
        accelerator=accelerator,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=config.checkpoint_every,
        resume=resume,
        meta=meta,
        progress=progress,
        log=log,
        on_step=on_step,
    )
    history = loop.history
    log(
        f"{method}: {config.steps - loop.started_at} steps in {loop.seconds:.1f}s; "
        f"final loss {history['loss'][-1]:.4f}"
    )
    info = {
        "processes": loop.world,
        "forward_module": loop.forward_module,
        "adversary": checked_adversary_progress(history, log),
        "method": "rt" if config.adversary is None else "lat",
        "defender_loss": config.defender_loss,
        "sites": sites,
        "coefs": coefs,
        "reference_forwards": dpo_reference.n_forwards if dpo_reference is not None else 0,
    }
    return TrainResult(config.steps, history, loop.seconds, trainable.n_params, info)


class ForgetLat:
    """Targeted LAT on the forget term of ``edit.trainer.train`` (see the module docstring).

    The adversary's unwanted completions are ``data.adversary_targets`` (editing: the original
    answers) or, when those are ``None``, the forget continuations themselves (unlearning); its
    desired completions are the forget continuations. When the two coincide (unlearning) the
    adversary can only push toward the answer, so ``away_coef`` must be 0.
    """

    def __init__(self, config: LatentAdversaryConfig) -> None:
        self.config = config
        self._examples: list[tuple[list[int], list[int], list[int]]] = []

    def describe(self) -> dict[str, Any]:
        return {"latent_adversary": self.config.model_dump(mode="json")}

    def bind(self, hm: HookedModel, data: TrainData) -> None:
        resolve_sites(hm, self.config.layers)  # layers out of range fail before training
        same = data.adversary_targets is None
        if same and self.config.away_coef > 0:
            raise ConfigError(
                "unlearning under LAT: the adversary pushes toward the answer being removed and "
                "there is no other desired answer to push away from; set away_coef to 0"
            )
        unwanted = [c for _, c in data.forget] if same else data.adversary_targets
        examples = []
        for (prompt, target), bad in zip(data.forget, unwanted, strict=True):
            p = hm.tokenize(prompt)
            c = hm.tokenize(target, add_special_tokens=False)
            u = c if same else hm.tokenize(bad, add_special_tokens=False)
            if not (p and c and u):
                raise TokenizationError(
                    f"forget example {prompt!r} -> {target!r} tokenizes to nothing"
                )
            examples.append((p, c, u))
        self._examples = examples

    def perturb(
        self, hm: HookedModel, forget_index: list[int], seed: int
    ) -> tuple[TargetBatch, Any, dict[str, float]]:
        if not self._examples:
            raise ConfigError("ForgetLat.perturb before bind")
        rows = [self._examples[i] for i in forget_index]
        batch = LatBatch(
            [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], hm.pad_id
        )
        seqs = batch.sequences(("desired",), hm.device)
        tick = time.perf_counter()
        adversary = train_adversary(hm, batch, self.config, seed=seed)
        record = {"adv_seconds": time.perf_counter() - tick}
        if adversary.losses:
            record["adv_loss_first"] = adversary.losses[0]
            record["adv_loss_last"] = adversary.losses[-1]
        return seqs.batch, adversary.active(hm, seqs, exclusive=True), record
