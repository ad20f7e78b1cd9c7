"""Linear probes for an attribute on the residual stream, layer by layer.

Nanda et al. (2023, "Fact Finding") and Guo et al. (2024, "Mechanistic Unlearning") read where
a fact's attribute (e.g. the sport) becomes *linearly decodable*: a multinomial logistic
regression ``p(c | x) = softmax(W x + b)_c`` on the residual stream at one position, fitted on
some facts and scored on held-out ones. At the last subject token the attribute appears once
the fact-lookup MLPs have written it; at the final token once the extraction heads have moved
it there. After an edit, the same probes measure latent knowledge that the output hides.

The probe is fitted full-batch with L-BFGS on standardised features, minimising
``mean CE + l2 * ||W||^2 / 2``: a strictly convex objective started at zero, so the fit is
deterministic; the train/test split is stratified and seeded.

Residual rows are indexed like TransformerLens's ``resid_pre 0, resid_post 0 ... L-1``:
row 0 is the input of the first block (``blocks.0.resid_pre``: embeddings, Gemma's scale
and GPT-2's positions included), row ``L + 1`` is ``blocks.L.resid_post``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mechunlearn.errors import DataError
from mechunlearn.localize.prompts import FactPrompts
from mechunlearn.models.batches import Batch
from mechunlearn.models.handle import HookedModel

DEFAULT_L2 = 1e-2
MIN_FACTS_PER_SPLIT = 2


def residual_sites(n_layers: int) -> list[str]:
    """Row r of the residual stream: ``blocks.0.resid_pre`` then each ``blocks.L.resid_post``."""
    return ["blocks.0.resid_pre"] + [f"blocks.{layer}.resid_post" for layer in range(n_layers)]


def residual_labels(n_layers: int) -> list[str]:
    """Human labels of ``residual_sites``: ``embed``, ``0``, ``1``, ..."""
    return ["embed"] + [str(layer) for layer in range(n_layers)]


def _site_name(layer: int | str, n_layers: int) -> str:
    """``"embed"`` or ``-1``: the first block's input; ``L``: ``blocks.L.resid_post``; names pass."""
    if layer == "embed" or layer == -1:
        return "blocks.0.resid_pre"
    if isinstance(layer, int):
        if not 0 <= layer < n_layers:
            raise DataError(f"layer {layer} out of range for a model with {n_layers} layers")
        return f"blocks.{layer}.resid_post"
    return layer


@torch.no_grad()
def collect_residuals(
    hm: HookedModel,
    prompts: FactPrompts | Batch | Sequence[str],
    positions: torch.Tensor | Sequence[int] | int,
    layers: Sequence[int | str] | None = None,
    batch_size: int = 16,
) -> torch.Tensor:
    """Residual vectors ``[len(layers), n, d_model]`` (float32, CPU) at one position per row.

    ``positions``: one index per row in the batch's (left-padded) coordinates, or a single int
    for every row (``-1``: the final token). ``layers``: ints (``L`` -> ``blocks.L.resid_post``,
    ``"embed"`` -> ``blocks.0.resid_pre``) or site names; default ``residual_sites``.
    """
    if isinstance(prompts, FactPrompts):
        batch = prompts.batch
    elif isinstance(prompts, Batch):
        batch = prompts
    else:
        batch = hm.batch(list(prompts))
    n = batch.input_ids.shape[0]
    n_layers = hm.dims.n_layers
    sites = (
        residual_sites(n_layers) if layers is None else [_site_name(x, n_layers) for x in layers]
    )
    if isinstance(positions, int):
        index = torch.full((n,), positions, dtype=torch.long)
    else:
        index = torch.as_tensor(
            list(positions) if not isinstance(positions, torch.Tensor) else positions
        )
        index = index.long().cpu()
        if index.shape != (n,):
            raise DataError(f"need one position per prompt ({n}), got shape {tuple(index.shape)}")
    out = torch.empty(len(sites), n, hm.dims.d_model)
    for start in range(0, n, batch_size):
        rows = slice(start, start + batch_size)
        chunk = _rows(batch, rows).to(hm.device)
        with hm.hooks(cache=sites) as cache:
            hm.forward_for_activations(**chunk.model_inputs())
        picked = index[rows].to(hm.device)
        arange = torch.arange(picked.shape[0], device=hm.device)
        for i, site in enumerate(sites):
            out[i, rows] = cache[site][arange, picked].float().cpu()
    return out


def _rows(batch: Batch, rows: slice) -> Batch:
    """Some rows of a padded batch (all rows keep the full width, so positions stay valid)."""
    return Batch(
        batch.input_ids[rows],
        batch.attention_mask[rows],
        batch.position_ids[rows],
        batch.lengths[rows],
    )


def encode_labels(values: Sequence[str]) -> tuple[torch.Tensor, tuple[str, ...]]:
    """Class indices and the sorted class names; a probe needs at least two classes."""
    classes = tuple(sorted(set(values)))
    if len(classes) < 2:
        raise DataError(
            f"a probe needs facts with at least two different attributes; all {len(values)} "
            f"facts have {classes[0]!r}"
            if classes
            else "a probe needs facts, got none"
        )
    lookup = {c: i for i, c in enumerate(classes)}
    return torch.tensor([lookup[v] for v in values], dtype=torch.long), classes


def split_facts(
    labels: torch.Tensor, train_fraction: float = 0.5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded stratified split into train and held-out indices.

    Each class with at least two facts puts at least one fact on each side, so held-out
    accuracy is measured on every attribute the probe was trained on where possible.
    """
    if not 0 < train_fraction < 1:
        raise DataError(f"probe train fraction must be in (0, 1), got {train_fraction}")
    labels = labels.cpu()
    n = labels.shape[0]
    if n < 2 * MIN_FACTS_PER_SPLIT:
        raise DataError(
            f"too few facts for a probe train/test split: {n} (need at least "
            f"{2 * MIN_FACTS_PER_SPLIT})"
        )
    rng = random.Random(seed)
    train: list[int] = []
    test: list[int] = []
    for cls in sorted(set(labels.tolist())):
        members = [i for i in range(n) if int(labels[i]) == cls]
        rng.shuffle(members)
        k = round(train_fraction * len(members))
        if len(members) >= 2:
            k = min(max(k, 1), len(members) - 1)
        train += members[:k]
        test += members[k:]
    if len(train) < MIN_FACTS_PER_SPLIT or len(test) < MIN_FACTS_PER_SPLIT:
        raise DataError(
            f"too few facts for a probe split: {len(train)} train / {len(test)} held out "
            f"(need at least {MIN_FACTS_PER_SPLIT} each); add facts or change probe_split"
        )
    if len(set(labels[train].tolist())) < 2:
        raise DataError("the probe training split has only one attribute; add facts")
    return torch.tensor(sorted(train)), torch.tensor(sorted(test))


@dataclass
class Probe:
    """A fitted linear probe: ``logits = ((x - mean) / scale) @ weight.T + bias``."""

    weight: torch.Tensor  # [k, d]
    bias: torch.Tensor  # [k]
    mean: torch.Tensor  # [d]
    scale: torch.Tensor  # [d]
    classes: tuple[str, ...] = ()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.device, torch.float32)
        return ((x - self.mean) / self.scale) @ self.weight.T + self.bias

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x).argmax(-1)

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        if x.shape[0] == 0:
            return float("nan")
        return float((self.predict(x).cpu() == y.cpu()).float().mean())

    def margin(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """True-class logit minus the mean of the other classes' logits (as ``answer_logit_diff``)."""
        logits = self.logits(x)
        y = y.to(logits.device)
        true = logits.gather(1, y[:, None]).squeeze(1)
        k = logits.shape[1]
        return true - (logits.sum(1) - true) / (k - 1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "bias": self.bias, "mean": self.mean, "scale": self.scale}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], classes: Sequence[str] = ()) -> Probe:
        return cls(state["weight"], state["bias"], state["mean"], state["scale"], tuple(classes))


def fit_standardised_linear(
    x: torch.Tensor,
    n_outputs: int,
    data_loss: Callable[[torch.Tensor], torch.Tensor],
    l2: float = DEFAULT_L2,
    max_iter: int = 200,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(weight [k, d], bias [k], mean [d], scale [d])`` minimising ``data_loss(z @ W.T + b)
    + l2 * ||W||^2 / 2`` on features ``z`` standardised with their mean and std.

    The shared core of every linear probe here (multinomial, multi-label): full-batch L-BFGS with
    strong-Wolfe line search from zero, so fits are deterministic.
    """
    x = x.float()
    mean = x.mean(0)
    scale = x.std(0, unbiased=False).clamp_min(1e-6)
    z = (x - mean) / scale
    weight = torch.zeros(n_outputs, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(n_outputs, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = data_loss(z @ weight.T + bias) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach(), mean, scale


def fit_probe(
    x: torch.Tensor,
    y: torch.Tensor,
    n_classes: int | None = None,
    l2: float = DEFAULT_L2,
    max_iter: int = 200,
    classes: Sequence[str] = (),
) -> Probe:
    """Fit a multinomial logistic-regression probe on ``x [n, d]``, labels ``y [n]``.

    Features are standardised with the training mean and std; ``l2`` penalises the weights
    (not the bias). L-BFGS with strong-Wolfe line search from zero: deterministic.
    """
    if x.dim() != 2 or y.shape != (x.shape[0],):
        raise DataError(
            f"probe inputs must be [n, d] and [n], got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    k = int(n_classes) if n_classes is not None else int(y.max()) + 1
    if len(set(y.tolist())) < 2:
        raise DataError("a probe needs training facts with at least two different attributes")
    y = y.to(x.device).long()
    weight, bias, mean, scale = fit_standardised_linear(
        x, k, lambda logits: torch.nn.functional.cross_entropy(logits, y), l2, max_iter
    )
    return Probe(weight.detach(), bias.detach(), mean, scale, tuple(classes))


@dataclass
class ProbeSweep:
    """Probes fitted at every row of a residual stack, with train and held-out accuracy."""

    probes: list[Probe]
    train_accuracy: list[float]
    test_accuracy: list[float]
    train: torch.Tensor
    test: torch.Tensor
    chance: float
    labels: list[str] = field(default_factory=list)

    def saturation_row(self, tolerance: float = 0.05) -> int:
        """First row whose held-out accuracy is within ``tolerance`` of the best row's."""
        best = max(self.test_accuracy)
        return next(i for i, a in enumerate(self.test_accuracy) if a >= best - tolerance)


def probe_accuracy_by_layer(
    x: torch.Tensor,
    y: torch.Tensor,
    train: torch.Tensor,
    test: torch.Tensor,
    l2: float = DEFAULT_L2,
    classes: Sequence[str] = (),
    labels: Sequence[str] = (),
) -> ProbeSweep:
    """Fit one probe per row of ``x [rows, n, d]`` on ``train`` and score it on ``test``."""
    if x.dim() != 3 or x.shape[1] != y.shape[0]:
        raise DataError(
            f"expected residuals [rows, n, d] for {y.shape[0]} facts, got {tuple(x.shape)}"
        )
    k = max(len(classes), int(y.max()) + 1)
    probes, train_acc, test_acc = [], [], []
    for row in range(x.shape[0]):
        probe = fit_probe(x[row, train], y[train], n_classes=k, l2=l2, classes=classes)
        probes.append(probe)
        train_acc.append(probe.accuracy(x[row, train], y[train]))
        test_acc.append(probe.accuracy(x[row, test], y[test]))
    return ProbeSweep(probes, train_acc, test_acc, train, test, 1.0 / k, list(labels))


def probe_facts(
    hm: HookedModel,
    prompts: FactPrompts,
    position: str = "last_subject",
    train_fraction: float = 0.5,
    seed: int = 0,
    l2: float = DEFAULT_L2,
    batch_size: int = 16,
) -> tuple[ProbeSweep, torch.Tensor, torch.Tensor]:
    """Probe each fact's answer at ``position`` (``"last_subject"`` or ``"final"``) per layer.

    Returns the sweep, the residual stack ``[n_layers + 1, n, d]`` and the labels, so callers
    can reuse the residuals (e.g. to apply the probes after an edit).
    """
    if position == "last_subject":
        index = prompts.last_subject_positions()
    elif position == "final":
        index = torch.full((len(prompts.records),), prompts.width - 1)
    else:
        raise DataError(f"unknown probe position {position!r}; use 'last_subject' or 'final'")
    y, classes = encode_labels([r.answer for r in prompts.records])
    train, test = split_facts(y, train_fraction, seed)
    x = collect_residuals(hm, prompts, index, batch_size=batch_size)
    labels = residual_labels(hm.dims.n_layers)
    return probe_accuracy_by_layer(x, y, train, test, l2, classes, labels), x, y
