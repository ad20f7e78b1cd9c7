"""Targeted latent adversary: per-token residual-stream perturbations that push a model toward an
unwanted completion (Sheshadri et al. 2024, "Targeted Latent Adversarial Training Improves
Robustness to Persistent Harmful Behaviors in LLMs", arXiv:2407.15549, Sec. 3, Eq. 2).

For a batch of examples (prompt ``x``, desired completion ``y+``, unwanted completion ``y-``) the
adversary finds perturbations ``delta_l[b, t]`` of the residual stream at chosen layers ``l``,

    min_delta  toward_coef * CE(y- | x, delta) + away_coef * (-log(1 - p(y+ | x, delta)))
    s.t.       ||delta_l[b, t]||_2 <= eps_l   for every example b, position t, layer l,

with a few steps of Adam (or sign-gradient PGD) and a projection onto the balls after every
step. The model's weights are frozen (and it runs in eval mode) while the adversary trains.

Where the perturbation goes. The anchor implementation (aengusl/latent-adversarial-training)
adds the attack to the output of layer ``l``'s MLP; the residual stream after block ``l`` is
``resid_mid + mlp_out``, so that equals adding it to the output of block ``l``. Here a layer
``l`` therefore means the site ``blocks.l.resid_post`` (exactly the residual stream, also for
Gemma's post-MLP norm and parallel-residual models), and ``"embed"`` the embedding-site output
(embedding-space adversarial training, EAT; Gemma's sqrt(d) scale included).

Which tokens. Perturbations live on the prompt tokens (``positions="prompt"``, as in the anchor's
``prompt_mask``), optionally also on completion positions (``"prompt_and_completion"``; the
``j``-th completion token of ``y+`` and of ``y-`` share one perturbation, as the anchor's
position-indexed attack does). Both completions of an example see the same prompt
perturbation. Every other position (padding, unchosen tokens) is left exactly as computed.

Epsilon. ``absolute``: ``eps_l = epsilon``. ``relative``: ``eps_l = epsilon * median_t
||h_l[b, t]||_2`` over the batch's real prompt tokens, measured without perturbation, since
residual norms differ by 10x across layers. The step size ``lr`` is scale-free as well: the
per-coordinate step is ``lr * eps_l / sqrt(d)`` (Adam's first steps and sign-PGD move each
coordinate by about that much), so ``lr = 0.1`` moves a token's perturbation by ~``0.1 eps_l``
per step on any model.

The standalone attack built on it (``latent_attack``, with its success measure) is
``attacks.latent``; the examples are ``tasks.preference.LatData`` and their batches
``models.batches.LatBatch``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Literal

import torch
from pydantic import BaseModel, Field, field_validator, model_validator

from mechunlearn.edit.objectives import DEFAULT_FLOOR, unlearn_loss_from_logprobs
from mechunlearn.errors import SiteError
from mechunlearn.models.batches import LatBatch, LatSequences, TargetBatch
from mechunlearn.models.handle import HookedModel
from mechunlearn.models.hooks import Apply
from mechunlearn.schema import STRICT_CONFIG
from mechunlearn.tasks.preference import KINDS, LatExample

Layer = int | Literal["embed"]


# ---- configuration ---------------------------------------------------------------------------
class LatentAdversaryConfig(BaseModel):
    """Settings of the latent adversary (see the module docstring)."""

    model_config = STRICT_CONFIG

    layers: list[Layer] = Field(min_length=1, description='block indices (resid_post) or "embed"')
    epsilon: float = Field(1.0, ge=0, description="per-token L2 bound (see epsilon_mode)")
    epsilon_mode: Literal["relative", "absolute"] = "relative"
    positions: Literal["prompt", "prompt_and_completion"] = "prompt"
    steps: int = Field(16, ge=0)
    lr: float = Field(0.1, gt=0, description="step per coordinate, in units of eps / sqrt(d)")
    optimizer: Literal["adam", "sgd_sign"] = "adam"
    toward_coef: float = Field(1.0, ge=0, description="CE toward the unwanted completion")
    away_coef: float = Field(0.0, ge=0, description="-log(1-p) away from the desired one")
    away_floor: float = Field(DEFAULT_FLOOR, lt=0)
    init: Literal["zeros", "random"] = "zeros"

    @field_validator("layers")
    @classmethod
    def _distinct_layers(cls, layers: list[Layer]) -> list[Layer]:
        for layer in layers:
            if isinstance(layer, int) and layer < 0:
                raise ValueError(f"layer {layer} is negative")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers repeat: {layers}")
        return layers

    @model_validator(mode="after")
    def _some_objective(self) -> LatentAdversaryConfig:
        if self.toward_coef == 0 and self.away_coef == 0:
            raise ValueError("toward_coef and away_coef are both 0: the adversary has no objective")
        return self

    @property
    def kinds(self) -> tuple[str, ...]:
        """The completions the adversary's loss reads."""
        return tuple(
            k for k, c in zip(KINDS, (self.toward_coef, self.away_coef), strict=True) if c > 0
        )


def site_name(layer: Layer) -> str:
    """``"embed"`` or ``blocks.L.resid_post`` (the residual stream after block ``L``)."""
    return "embed" if layer == "embed" else f"blocks.{layer}.resid_post"


def resolve_sites(hm: HookedModel, layers: Sequence[Layer]) -> list[str]:
    """Hook sites of ``layers``; ``SiteError`` naming the model's depth when one is out of range."""
    n = hm.dims.n_layers
    for layer in layers:
        if layer != "embed" and not (isinstance(layer, int) and 0 <= layer < n):
            raise SiteError(f"adversary layer {layer!r} out of range: the model has {n} layers")
    return [site_name(layer) for layer in layers]


# ---- the adversary ---------------------------------------------------------------------------
class LatentAdversary:
    """Per-token perturbations ``deltas[site]`` (``[B, S, d]`` over a ``LatBatch``'s grid).

    ``project()`` keeps every cell within its site's ``epsilons[site]`` and zero outside
    ``mask``; ``active(hm)`` adds the (frozen) perturbation during forwards of the batch.
    """

    def __init__(
        self,
        config: LatentAdversaryConfig,
        batch: LatBatch,
        sites: Sequence[str],
        epsilons: Mapping[str, float],
        d_model: int,
        device: torch.device | str,
        seed: int = 0,
    ) -> None:
        self.config = config
        self.batch = batch
        self.sites = list(sites)
        self.epsilons = {s: float(epsilons[s]) for s in self.sites}
        self.mask = batch.slot_mask(config.positions).to(device)
        self.losses: list[float] = []
        shape = (*batch.grid, d_model)
        generator = torch.Generator().manual_seed(seed)
        self.deltas: dict[str, torch.nn.Parameter] = {}
        for site in self.sites:
            if config.init == "random":
                init = torch.randn(shape, generator=generator) * (
                    self.epsilons[site] / math.sqrt(d_model)
                )
            else:
                init = torch.zeros(shape)
            self.deltas[site] = torch.nn.Parameter(init.to(device))
        self.project()

    @torch.no_grad()
    def project(self) -> None:
        """Scale each token's perturbation onto its L2 ball; zero the unchosen cells."""
        keep = self.mask.unsqueeze(-1).to(torch.float32)
        for site, delta in self.deltas.items():
            norms = delta.norm(dim=-1, keepdim=True)
            delta.mul_((self.epsilons[site] / norms.clamp_min(1e-12)).clamp(max=1.0) * keep)

    def norms(self) -> dict[str, torch.Tensor]:
        """``[B, S]`` L2 norm of every cell, per site."""
        return {s: d.detach().norm(dim=-1) for s, d in self.deltas.items()}

    def interventions(
        self, seqs: LatSequences, trainable: bool = False, gate: InputGate | None = None
    ) -> list[Apply]:
        """One ``Apply`` per site adding the perturbation to ``seqs``' rows (frozen unless
        ``trainable``); positions without a chosen slot keep their activation exactly. With a
        ``gate``, forwards it does not let through are left untouched."""
        if seqs.grid != self.batch.grid:
            raise SiteError(
                f"these sequences come from a batch with a {seqs.grid} perturbation grid; the "
                f"adversary was trained on one with {self.batch.grid}"
            )
        flat_mask = self.mask.reshape(-1)
        slots = seqs.slots
        valid = (slots >= 0) & flat_mask[slots.clamp(min=0)]
        index = slots.clamp(min=0)
        out = []
        for site, delta in self.deltas.items():
            out.append(Apply(site, _adder(delta, index, valid, trainable, gate)))
        return out

    @contextmanager
    def active(
        self,
        hm: HookedModel,
        seqs: LatSequences | None = None,
        trainable: bool = False,
        exclusive: bool = False,
    ) -> Iterator[LatSequences]:
        """Apply the perturbation to forwards of ``seqs`` (default: both completions).

        ``exclusive``: only forwards of exactly ``seqs``' tokens are perturbed; other forwards
        inside the block (e.g. an objective's retain batch) run clean. Without it every forward
        in the block must have ``seqs``' shape."""
        seqs = seqs or self.batch.sequences(KINDS, hm.device)
        with ExitStack() as stack:
            gate = None
            if exclusive:
                gate = InputGate(hm.model, seqs.batch.input_ids)
                stack.callback(gate.remove)
            stack.enter_context(hm.hooks(interventions=self.interventions(seqs, trainable, gate)))
            yield seqs


class InputGate:
    """Open during forwards of ``model`` whose ``input_ids`` equal the given ones (a forward
    pre-hook compares them), closed during any other forward."""

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor) -> None:
        self.input_ids = input_ids
        self.open = False
        self._handle = model.register_forward_pre_hook(self._check, with_kwargs=True)

    def _check(self, module, args, kwargs) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.open = (
            isinstance(ids, torch.Tensor)
            and ids.shape == self.input_ids.shape
            and bool(torch.equal(ids.to(self.input_ids.device), self.input_ids))
        )

    def remove(self) -> None:
        self._handle.remove()
        self.open = False


def _adder(
    delta: torch.nn.Parameter,
    index: torch.Tensor,
    valid: torch.Tensor,
    trainable: bool,
    gate: InputGate | None = None,
):
    def add(activation: torch.Tensor) -> torch.Tensor:
        if gate is not None and not gate.open:
            return activation
        if activation.shape[:2] != index.shape:
            raise SiteError(
                f"the perturbation was built for a batch of shape {tuple(index.shape)}, "
                f"got activations of shape {tuple(activation.shape[:2])}"
            )
        values = delta if trainable else delta.detach()
        flat = values.reshape(-1, values.shape[-1]).to(activation.device, activation.dtype)
        return torch.where(valid.unsqueeze(-1), activation + flat[index], activation)

    return add


# ---- losses ----------------------------------------------------------------------------------
def mean_nll(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-weighted mean negative log-likelihood of the masked ``[rows, t]`` log-probs."""
    mask = mask.to(logprobs.dtype)
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1)


def completion_terms(
    logprobs: torch.Tensor, seqs: LatSequences, floor: float = DEFAULT_FLOOR
) -> dict[str, torch.Tensor]:
    """For each kind present: ``<kind>_nll`` (CE toward it) and ``<kind>_away`` (-log(1-p))."""
    terms = {}
    for kind in seqs.kinds:
        rows = seqs.rows(kind)
        lp, mask = logprobs[rows], seqs.batch.target_mask[rows]
        terms[f"{kind}_nll"] = mean_nll(lp, mask)
        terms[f"{kind}_away"] = unlearn_loss_from_logprobs(lp, mask, floor)
    return terms


def adversary_objective(terms: Mapping[str, torch.Tensor], config: LatentAdversaryConfig):
    """``toward_coef * CE(unwanted) + away_coef * (-log(1 - p(desired)))``."""
    loss = 0.0
    if config.toward_coef > 0:
        loss = loss + config.toward_coef * terms["unwanted_nll"]
    if config.away_coef > 0:
        loss = loss + config.away_coef * terms["desired_away"]
    return loss


def target_logits(hm: HookedModel, batch: TargetBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, t]`` target-token log-probs (0 off target, as ``token_logprobs``) and ``[b, t]``
    whether the target is the argmax prediction (False off target)."""
    keep = max(batch.n_targets)
    width = batch.input_ids.shape[1]
    logits = hm.forward_predicting_last(keep, **batch.model_inputs())
    log_probs = logits.float().log_softmax(-1)
    targets = batch.input_ids[:, width - keep :]
    mask = batch.target_mask[:, width - keep :].bool()
    picked = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    hit = log_probs.argmax(-1) == targets
    lp = torch.zeros(batch.input_ids.shape, dtype=picked.dtype, device=picked.device)
    ok = torch.zeros(batch.input_ids.shape, dtype=torch.bool, device=picked.device)
    lp[:, width - keep :] = torch.where(mask, picked, torch.zeros_like(picked))
    ok[:, width - keep :] = hit & mask
    return lp, ok


# ---- how well the adversary did over a training run -----------------------------------------
FAILING_ADVERSARY_SHARE = 0.5
"""Below this share of training steps on which the adversary lowered its own objective, it is
reported as failing: LAT then trains against large, nearly random perturbations of the
residual stream, not against the behaviour it targets."""


def adversary_progress(history: Mapping[str, Sequence[float]]) -> dict[str, float] | None:
    """The training adversary's record over a run, from a trainer's per-step history
    (``adv_loss_first``/``adv_loss_last``: its objective before its first and after its last
    step): mean first and last loss, and the share of training steps on which it lowered its
    objective. ``None`` when the history has no adversary.

    Why: a step size too large for the model's latent geometry makes every attack step *raise*
    the objective (the perturbation overshoots), and nothing else in a LAT run shows it: the
    defender still trains, under perturbations that elicit nothing.
    """
    first, last = history.get("adv_loss_first") or [], history.get("adv_loss_last") or []
    pairs = list(zip(first, last, strict=False))
    if not pairs:
        return None
    return {
        "loss_first_mean": sum(f for f, _ in pairs) / len(pairs),
        "loss_last_mean": sum(lo for _, lo in pairs) / len(pairs),
        "improved_share": sum(lo < f for f, lo in pairs) / len(pairs),
    }


def checked_adversary_progress(
    history: Mapping[str, Sequence[float]], log: Callable[[str], None]
) -> dict[str, float] | None:
    """``adversary_progress(history)``, with the failing-adversary warning passed to ``log``:
    what a trainer stores as ``info["adversary"]`` at the end of a run."""
    progress = adversary_progress(history)
    if (warning := failing_adversary_message(progress)) is not None:
        log(warning)
    return progress


def failing_adversary_message(progress: Mapping[str, float] | None) -> str | None:
    """A warning when the adversary lowered its objective on too few steps, else ``None``."""
    if progress is None or progress["improved_share"] >= FAILING_ADVERSARY_SHARE:
        return None
    return (
        f"warning: the latent adversary lowered its own objective on only "
        f"{progress['improved_share']:.0%} of training steps (mean {progress['loss_first_mean']:.3f}"
        f" before its first step, {progress['loss_last_mean']:.3f} after its last): it is not "
        "attacking; lower its lr or give it more steps"
    )


# ---- training the adversary -----------------------------------------------------------------
@contextmanager
def frozen_model(hm: HookedModel) -> Iterator[None]:
    """Eval mode, no parameter gradients, forwards on ``hm.model`` itself (not a DDP wrapper:
    perturbations are per example, so each process attacks its own rows); all restored after."""
    model = hm.model
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    with ExitStack() as stack:
        stack.enter_context(hm.forward_via(None))
        try:
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            yield
        finally:
            for p, flag in zip(model.parameters(), flags, strict=True):
                p.requires_grad_(flag)
            model.train(was_training)


@torch.no_grad()
def measure_epsilons(
    hm: HookedModel, batch: LatBatch, sites: Sequence[str], config: LatentAdversaryConfig
) -> dict[str, float]:
    """Per-site bound: ``epsilon`` (absolute) or ``epsilon * median`` of the unperturbed
    per-token L2 norms at the site over the batch's real prompt tokens (relative)."""
    if config.epsilon_mode == "absolute":
        return {s: config.epsilon for s in sites}
    seqs = batch.sequences(KINDS[:1], hm.device)
    with hm.hooks(cache=list(sites)) as cache:
        hm.forward(**seqs.batch.model_inputs(), logits_to_keep=1)
    p_width, width = batch.prompt_width, batch.grid[1]
    is_prompt = (seqs.slots >= 0) & (seqs.slots % width < p_width)
    out = {}
    for site in sites:
        norms = cache[site].float()[is_prompt].norm(dim=-1)
        out[site] = config.epsilon * float(norms.median())
    return out


def train_adversary(
    hm: HookedModel,
    batch: LatBatch | Sequence[LatExample],
    config: LatentAdversaryConfig,
    seed: int = 0,
) -> LatentAdversary:
    """Optimise a ``LatentAdversary`` on ``batch`` against the current (frozen) model.

    ``adversary.losses[i]`` is the objective at step ``i`` (before that step's update). The
    model's weights, ``requires_grad`` flags and train/eval mode are left as they were, and no
    parameter ``.grad`` is touched (gradients are taken with respect to the perturbations only).
    """
    if not isinstance(batch, LatBatch):
        batch = LatBatch.from_examples(hm, batch)
    sites = resolve_sites(hm, config.layers)
    d_model = hm.dims.d_model
    with frozen_model(hm):
        epsilons = measure_epsilons(hm, batch, sites, config)
        adversary = LatentAdversary(config, batch, sites, epsilons, d_model, hm.device, seed)
        seqs = batch.sequences(config.kinds, hm.device)
        params = [adversary.deltas[s] for s in sites]
        steps = [config.lr * epsilons[s] / math.sqrt(d_model) for s in sites]
        optimizer = None
        if config.optimizer == "adam":
            optimizer = torch.optim.AdamW(
                [{"params": [p], "lr": lr} for p, lr in zip(params, steps, strict=True)],
                weight_decay=0.0,
            )
        for _ in range(config.steps):
            with adversary.active(hm, seqs, trainable=True):
                logprobs, _ = target_logits(hm, seqs.batch)
            loss = adversary_objective(completion_terms(logprobs, seqs, config.away_floor), config)
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                if optimizer is not None:
                    for p, g in zip(params, grads, strict=True):
                        p.grad = g
                    optimizer.step()
                    for p in params:
                        p.grad = None
                else:
                    for p, g, lr in zip(params, grads, steps, strict=True):
                        p.sub_(lr * g.sign())
            adversary.project()
            adversary.losses.append(float(loss.detach()))
    return adversary
