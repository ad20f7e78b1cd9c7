"""RMU: Representation Misdirection for Unlearning (Li et al. 2024, "The WMDP Benchmark",
arXiv:2403.03218, Section 5, Eq. 1-3).

RMU scrambles the model's internal representation of forget data at one layer ``l`` and keeps
it unchanged on retain data. With ``h_l(x)_t`` the residual stream after block ``l``
(``blocks.l.resid_post``) at token ``t``, ``u`` a fixed random unit vector and ``c`` the
steering coefficient::

    L_forget = 1/|T_f| sum_{t in T_f} 1/d || h_l(x_f)_t - c u ||^2
    L_retain = 1/|T_r| sum_{t in T_r} 1/d || h_l(x_r)_t - h_l^frozen(x_r)_t ||^2
    L        = L_forget + alpha * L_retain

``T_f``/``T_r`` are all real (attention-mask) tokens of the prompt+continuation rows; the ``1/d``
is the paper code's ``mse_loss`` mean over features. ``h^frozen`` comes from the model before
training: computed once by the objective's setup and kept per retain example (no second model
copy). ``u`` has i.i.d. U[0, 1) entries, normalised (as in the WMDP code), seeded.

Defaults: ``layer = n_layers // 3`` (the paper uses layer 7 of 32 in Zephyr-7B). The paper tunes
``c`` by hand per model (6.5 for Zephyr-7B, 300 for Yi-34B and Mixtral), because what matters
is ``c`` relative to the scale of the layer's activations, which differs by orders of magnitude
between models. Unless ``steering_coef`` is given we therefore set
``c = steering_scale * median_t ||h_l^frozen(x_f)_t||`` (default ``steering_scale = 4``): a
target well outside the activations the model normally produces, whatever the model's scale.
``alpha = 100`` is the WMDP code's default retain weight.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mechunlearn.edit.objectives import OBJECTIVES, ObjectiveStep, StepArgs, with_setup
from mechunlearn.errors import ConfigError
from mechunlearn.models.batches import TargetBatch
from mechunlearn.models.handle import HookedModel

DEFAULT_STEERING_SCALE = 4.0
DEFAULT_ALPHA = 100.0


def layer_activations(hm: HookedModel, batch: TargetBatch, layer: int) -> torch.Tensor:
    """``[b, t, d]`` residual stream after block ``layer`` (differentiable).

    The forward goes through ``hm.forward`` (a DDP wrapper when training in several processes);
    the hook sits on ``hm.model``'s module. Only one logit row is computed.
    """
    captured: dict[str, torch.Tensor] = {}

    def grab(activation: torch.Tensor) -> None:
        captured["h"] = activation

    with hm.hooks(handlers=[(f"blocks.{layer}.resid_post", grab)]):
        hm.forward(**batch.model_inputs(), logits_to_keep=1)
    return captured["h"]


def masked_mse(x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of the per-token mean squared error over features."""
    per_token = (x.float() - target.float()).pow(2).mean(-1)
    weights = mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1)


@torch.no_grad()
def frozen_activations(
    hm: HookedModel, pairs: Sequence[tuple[str, str]], layer: int, batch_size: int = 16
) -> list[torch.Tensor]:
    """Per pair, ``[n_tokens, d]`` layer-``layer`` activations of its real tokens (CPU, fp32)."""
    out: list[torch.Tensor] = []
    for start in range(0, len(pairs), batch_size):
        batch = TargetBatch.from_pairs(hm, pairs[start : start + batch_size])
        acts = layer_activations(hm, batch, layer).float().cpu()
        width = acts.shape[1]
        for row, n in enumerate(batch.attention_mask.sum(-1).tolist()):
            out.append(acts[row, width - int(n) :].clone())
    return out


def stack_reference(batch: TargetBatch, references: Sequence[torch.Tensor]) -> torch.Tensor:
    """Left-pad per-example references into ``[b, t, d]`` matching ``batch``'s layout."""
    b, width = batch.input_ids.shape
    d = references[0].shape[-1]
    out = torch.zeros(b, width, d, dtype=references[0].dtype)
    for row, (ref, n) in enumerate(
        zip(references, batch.attention_mask.sum(-1).tolist(), strict=True)
    ):
        if ref.shape[0] != n:
            raise ValueError(f"reference has {ref.shape[0]} tokens, the batch row {int(n)}")
        out[row, width - ref.shape[0] :] = ref
    return out.to(batch.input_ids.device)


def control_vector(d_model: int, coef: float, seed: int) -> torch.Tensor:
    """``c * u``: ``u`` with U[0, 1) entries, normalised to unit length (WMDP code)."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.rand(d_model, generator=generator)
    return coef * u / u.norm()


def _rmu_setup(
    hm: HookedModel,
    forget: Sequence[tuple[str, str]],
    retain: Sequence[tuple[str, str]],
    batch_size: int,
    layer: int | None = None,
    steering_coef: float | None = None,
    steering_scale: float = DEFAULT_STEERING_SCALE,
    alpha: float = DEFAULT_ALPHA,
    seed: int = 0,
) -> StepArgs:
    n_layers = hm.dims.n_layers
    layer = n_layers // 3 if layer is None else layer
    if not 0 <= layer < n_layers:
        raise ConfigError(f"rmu layer {layer} out of range: the model has {n_layers} layers")
    if alpha < 0:
        raise ConfigError(f"rmu alpha must be non-negative, got {alpha}")
    if steering_coef is None:
        if steering_scale <= 0:
            raise ConfigError(f"rmu steering_scale must be positive, got {steering_scale}")
        norms = torch.cat(
            [a.norm(dim=-1) for a in frozen_activations(hm, forget, layer, batch_size)]
        )
        steering_coef = steering_scale * float(norms.median())
    elif steering_coef <= 0:
        raise ConfigError(f"rmu steering_coef must be positive, got {steering_coef}")
    control = control_vector(hm.dims.d_model, steering_coef, seed)
    references = frozen_activations(hm, retain, layer, batch_size) if retain and alpha > 0 else []

    def step_args(step: ObjectiveStep) -> dict[str, Any]:
        args: dict[str, Any] = {"control": control, "layer": layer, "alpha": alpha}
        if references and step.retain is not None and step.retain_index is not None:
            args["retain"] = step.retain
            args["retain_reference"] = stack_reference(
                step.retain, [references[i] for i in step.retain_index]
            )
        return args

    step_args.info = {"layer": layer, "steering_coef": steering_coef, "alpha": alpha}  # type: ignore[attr-defined]
    return step_args


@OBJECTIVES.register("rmu")
@with_setup(_rmu_setup)
def rmu_loss(
    hm: HookedModel,
    batch: TargetBatch,
    control: torch.Tensor,
    layer: int,
    retain: TargetBatch | None = None,
    retain_reference: torch.Tensor | None = None,
    alpha: float = DEFAULT_ALPHA,
) -> torch.Tensor:
    """``L_forget + alpha * L_retain`` (module docstring); the retain term needs both
    ``retain`` and its frozen ``retain_reference`` (``[b, t, d]``, same layout)."""
    acts = layer_activations(hm, batch, layer)
    target = control.to(device=acts.device).expand_as(acts)
    loss = masked_mse(acts, target, batch.attention_mask)
    if retain is not None and retain_reference is not None and alpha > 0:
        kept = layer_activations(hm, retain, layer)
        loss = loss + alpha * masked_mse(
            kept, retain_reference.to(kept.device), retain.attention_mask
        )
    return loss
