"""Training and evaluating the path-finding model (Brinkmann et al. 2024, arXiv:2402.11917,
Sec. 2: next-token cross-entropy on the path after the root, AdamW, cosine schedule).

Unlike the reference (a fixed file of 150k trees, batch 64, many epochs) every step draws a
fresh batch from the generator (``trees.training_trees``; held-out tree identities never
appear), so there is no overfitting and no data loading: the batch for step ``s`` is a pure
function of ``(seed, s)``, which makes resuming exact without saving generator state.

Accuracy is the share of examples whose whole path is right, by path length. It is computed
teacher-forced (one forward pass, argmax at every path position); with the fixed layout and a
causal model this equals greedy decoding that stops at the goal: if every teacher-forced
argmax is right, greedy decoding sees exactly those prefixes and emits the same tokens, ending
with the goal; at the first wrong argmax greedy decoding sees the same prefix and goes wrong
there too (``greedy_paths`` implements the decoding; a test checks the two agree).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from safetensors.torch import load_file, save_file

from mechunlearn.errors import ConfigError, DataError
from mechunlearn.io import atomic_directory, atomic_write_json
from mechunlearn.progress import progress_bar
from mechunlearn.reasoning.model import (
    TreeModelConfig,
    build_model,
    count_parameters,
    load_state_checked,
    resolve_model_config,
    save_tree_model,
)
from mechunlearn.reasoning.tokens import PAD, TreeLayout, TreeVocab, encode_batch, loss_mask
from mechunlearn.reasoning.trees import (
    ORDER_CODES,
    TreeBatch,
    TreeTaskConfig,
    heldout_trees,
    training_trees,
)
from mechunlearn.runtime import configure_threads, resolve_device
from mechunlearn.schema import STRICT_CONFIG

# Fields that may change when a run is resumed (they do not change what is trained).
RESUMABLE_FIELDS = frozenset(
    {
        "eval_every",
        "eval_per_length",
        "final_eval_per_length",
        "checkpoint_every",
        "log_every",
        "device",
        "compile",
        "eval_batch_size",
    }
)


class CurriculumStage(BaseModel):
    """Until step ``until`` (exclusive), train on paths of at most ``max_path_length`` edges."""

    model_config = STRICT_CONFIG

    until: int = Field(ge=1)
    max_path_length: int = Field(ge=1)


class TreeTrainConfig(BaseModel):
    """The training recipe; ``model`` is a preset name (``paper``, ``cpu``) or the fields."""

    model_config = STRICT_CONFIG

    model: TreeModelConfig = Field(default_factory=lambda: resolve_model_config("cpu"))
    task: TreeTaskConfig = Field(default_factory=TreeTaskConfig)
    steps: int = Field(default=20_000, ge=1)
    batch_size: int = Field(default=512, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    min_lr_ratio: float = Field(default=0.05, ge=0, le=1, description="final lr / peak lr")
    warmup_steps: int = Field(default=200, ge=0)
    weight_decay: float = Field(default=0.01, ge=0)
    betas: tuple[float, float] = (0.9, 0.99)
    max_grad_norm: float | None = Field(default=1.0, gt=0)
    seed: int = 0
    compile: bool = Field(default=False, description="torch.compile the model (needs a C compiler)")
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32",
        description="bf16: autocast the forward pass (CPUs with AVX512-BF16/AMX, GPUs)",
    )
    device: str | None = None
    log_every: int = Field(default=100, ge=1)
    eval_every: int = Field(default=1000, ge=1)
    eval_per_length: int = Field(
        default=64, ge=1, description="held-out trees per path length, periodic evals"
    )
    final_eval_per_length: int = Field(default=500, ge=1)
    eval_batch_size: int = Field(default=1024, ge=1)
    checkpoint_every: int = Field(default=1000, ge=1)
    curriculum: list[CurriculumStage] = Field(
        default_factory=list,
        description="short paths first: stages of increasing `until`; afterwards all lengths",
    )
    schedule_restarts: list[tuple[int, int]] = Field(
        default_factory=list,
        description="[at_step, decayed_towards] pairs: before at_step the cosine decays towards "
        "step decayed_towards, then it is re-stretched (finally to `steps`); what resuming with "
        "--extend does, written as one recipe",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _preset(cls, value: Any) -> Any:
        return resolve_model_config(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> TreeTrainConfig:
        if self.model.n_nodes != self.task.n_nodes:
            raise ConfigError(
                f"model.n_nodes={self.model.n_nodes} differs from task.n_nodes={self.task.n_nodes}"
            )
        at = [pair[0] for pair in self.schedule_restarts]
        if (
            at != sorted(set(at))
            or any(not 0 < a < self.steps for a in at)
            or any(towards < a for a, towards in self.schedule_restarts)
        ):
            raise ConfigError(
                "schedule_restarts must be [at_step, decayed_towards] pairs with at_step "
                f"increasing strictly within (0, steps={self.steps}) and decayed_towards >= "
                f"at_step, got {self.schedule_restarts}"
            )
        untils = [stage.until for stage in self.curriculum]
        if untils != sorted(set(untils)):
            raise ConfigError(f"curriculum stages must have increasing `until`, got {untils}")
        for stage in self.curriculum:
            if stage.max_path_length > self.task.max_path_length:
                raise ConfigError(
                    f"curriculum max_path_length {stage.max_path_length} exceeds the task's "
                    f"longest path ({self.task.max_path_length})"
                )
        return self

    def max_path_length_at(self, step: int) -> int | None:
        """The curriculum's cap on path length at ``step`` (None: every length)."""
        return next((s.max_path_length for s in self.curriculum if step < s.until), None)


# ---- evaluation ------------------------------------------------------------------------------


@dataclass
class TreeAccuracy:
    """Whole-path accuracy on an evaluation set, overall and by path length / edge order."""

    overall: float
    by_length: dict[int, float]
    counts: dict[int, int]
    by_order: dict[str, float]
    token_accuracy: float
    loss: float

    def to_json(self) -> dict[str, Any]:
        return {
            "overall": self.overall,
            "by_length": {str(k): v for k, v in self.by_length.items()},
            "counts": {str(k): v for k, v in self.counts.items()},
            "by_order": self.by_order,
            "token_accuracy": self.token_accuracy,
            "loss": self.loss,
        }


def _forward_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens[:, :-1]).logits


@torch.no_grad()
def path_correct(
    model: torch.nn.Module, trees: TreeBatch, batch_size: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per tree: whole path right (teacher-forced argmax), tokens right, and summed loss."""
    device = next(model.parameters()).device
    correct, tokens_right, losses = [], [], []
    for start in range(0, len(trees), batch_size):
        part = trees.select(torch.arange(start, min(start + batch_size, len(trees))))
        tokens = encode_batch(part).to(device)
        mask = loss_mask(part.path_length, trees.n).to(device)[:, 1:]
        targets = tokens[:, 1:]
        logits = _forward_logits(model, tokens).float()
        right = (logits.argmax(-1) == targets) | ~mask
        ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none") * mask
        correct.append(right.all(dim=1).cpu())
        tokens_right.append(((logits.argmax(-1) == targets) & mask).sum(1).cpu())
        losses.append(ce.sum(1).cpu())
    return torch.cat(correct), torch.cat(tokens_right), torch.cat(losses)


def evaluate_accuracy(
    model: torch.nn.Module, trees: TreeBatch, batch_size: int = 1024
) -> TreeAccuracy:
    """Whole-path accuracy (teacher-forced == greedy, see module docstring) by path length."""
    was_training = model.training
    model.eval()
    try:
        correct, tokens_right, losses = path_correct(model, trees, batch_size)
    finally:
        model.train(was_training)
    lengths = trees.path_length
    by_length, counts = {}, {}
    for length in sorted(set(lengths.tolist())):
        rows = lengths == length
        by_length[int(length)] = float(correct[rows].float().mean())
        counts[int(length)] = int(rows.sum())
    by_order = {
        name: float(correct[trees.order == code].float().mean())
        for name, code in ORDER_CODES.items()
        if bool((trees.order == code).any())
    }
    n_tokens = int(lengths.sum())
    return TreeAccuracy(
        overall=float(correct.float().mean()),
        by_length=by_length,
        counts=counts,
        by_order=by_order,
        token_accuracy=float(tokens_right.sum()) / n_tokens,
        loss=float(losses.sum()) / n_tokens,
    )


@torch.no_grad()
def greedy_paths(model: torch.nn.Module, trees: TreeBatch) -> list[list[int]]:
    """Greedy decoding from the prompt (edges, goal, root), one step per forward pass, each on
    the full-length padded layout; a row stops at the goal's token or at a non-node token.
    Returns each predicted path (root first)."""
    n = trees.n
    layout, vocab = TreeLayout(n), TreeVocab(n)
    device = next(model.parameters()).device
    tokens = encode_batch(trees).to(device)
    tokens[:, layout.path_start :] = PAD
    goal_token = (vocab.target(0) + trees.goal).to(device)
    done = torch.zeros(len(trees), dtype=torch.bool, device=device)
    paths = [[int(r)] for r in trees.root.tolist()]
    for step in range(n - 1):
        position = layout.path_start + step
        predicted = _forward_logits(model, tokens)[:, position - 1].argmax(-1)
        for row in torch.nonzero(~done).flatten().tolist():
            node = vocab.node_of(int(predicted[row]))
            is_target = int(predicted[row]) >= vocab.target(0)
            if node is None or not is_target:
                done[row] = True
                continue
            paths[row].append(node)
        tokens[:, position] = torch.where(done, PAD, predicted)
        done |= predicted == goal_token
        if bool(done.all()):
            break
    return paths


# ---- training --------------------------------------------------------------------------------


def lr_at(step: int, config: TreeTrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last step; with
    ``schedule_restarts``, the decay targets the first restart after ``step`` instead (an
    extended run's schedule: its earlier parts decayed towards their own last step)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    end = next((towards for at, towards in config.schedule_restarts if step < at), config.steps)
    span = max(1, end - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, config: TreeTrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not biases, norms, embeddings)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        is_matrix = param.dim() >= 2 and not name.endswith(("wte.weight", "wpe.weight"))
        (decay if is_matrix else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def training_batch(config: TreeTrainConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``[B, 4n-1]`` and the loss mask of the targets ``[B, 4n-2]`` for ``step``."""
    trees = training_trees(
        config.task, config.batch_size, config.seed, step, config.max_path_length_at(step)
    )
    tokens = encode_batch(trees)
    return tokens, loss_mask(trees.path_length, config.task.n_nodes)[:, 1:]


def tree_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the path tokens (a fixed-shape masked sum, compile-friendly)."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return (ce * mask).sum() / mask.sum().clamp(min=1)


@dataclass
class TreeTrainResult:
    steps: int
    seconds: float
    sequences_per_s: float
    history: dict[str, list[float]]
    evals: list[dict[str, Any]]
    accuracy: TreeAccuracy | None
    model_dir: Path | None
    n_params: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "train_seconds": self.seconds,
            "sequences_per_s": self.sequences_per_s,
            "n_params": self.n_params,
            "accuracy": self.accuracy.to_json() if self.accuracy else None,
            "evals": self.evals,
        }


STATE_DIR = "state"
MODEL_DIR = "model"


def _save_state(
    out: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TreeTrainConfig,
    step: int,
    history: dict[str, list[float]],
    evals: list[dict[str, Any]],
    seconds: float,
    extensions: list[dict[str, int]] | None = None,
) -> None:
    with atomic_directory(out / STATE_DIR) as tmp:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
            str(tmp / "model.safetensors"),
        )
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        atomic_write_json(
            tmp / "state.json",
            {
                "step": step,
                "config": config.model_dump(mode="json"),
                "history": history,
                "evals": evals,
                "seconds": seconds,
                "extensions": extensions or [],
            },
        )


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config with the fields added since it was saved at their defaults; an invalid
    one as it is (its differences from the current config are then reported field by field)."""
    try:
        return TreeTrainConfig.model_validate(saved).model_dump(mode="json")
    except (ValidationError, ConfigError):
        return saved


def _check_resumable(
    saved: dict[str, Any], config: TreeTrainConfig, where: Path, extend: bool = False
) -> None:
    current = config.model_dump(mode="json")
    saved = _with_defaults(saved)
    diffs = [
        key
        for key in sorted(set(saved) | set(current))
        if key not in RESUMABLE_FIELDS
        and saved.get(key) != current.get(key)
        and not (extend and key == "steps")
        and key != "schedule_restarts"  # checked by _resumed_restarts
    ]
    if diffs:
        detail = "; ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in diffs)
        hint = " (a longer `steps` needs extend / --extend)" if diffs == ["steps"] else ""
        raise ConfigError(f"cannot resume {where} with another config ({detail}){hint}")


def _resumed_restarts(
    saved: dict[str, Any],
    extensions: list[dict[str, int]],
    config: TreeTrainConfig,
    step: int,
    extended: bool,
    where: Path,
) -> list[tuple[int, int]]:
    """The ``schedule_restarts`` of a resumed run: the saved ones (or, for states saved before
    the field existed, the recorded extensions), plus ``(step, old steps)`` when this resume
    extends the run. A config that names restarts must agree; one that names none adopts them."""
    saved_restarts = saved.get("schedule_restarts")
    if saved_restarts is None:
        saved_restarts = [(e["at_step"], e["from_steps"]) for e in extensions]
    restarts = [(int(at), int(towards)) for at, towards in saved_restarts]
    if extended:
        restarts.append((step, int(saved["steps"])))
    if config.schedule_restarts and list(config.schedule_restarts) != restarts:
        raise ConfigError(
            f"cannot resume {where}: its schedule_restarts are {restarts}, the config names "
            f"{config.schedule_restarts}"
        )
    return restarts


def _load_state(
    out: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TreeTrainConfig,
    extend: bool = False,
) -> tuple[
    TreeTrainConfig, int, dict[str, list[float]], list[dict[str, Any]], float, list[dict[str, int]]
]:
    """The saved state, and ``config`` with the run's ``schedule_restarts``."""
    folder = out / STATE_DIR
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"training state {folder} is unreadable: {exc}") from None
    saved = state.get("config", {})
    _check_resumable(saved, config, folder, extend)
    step = int(state["step"])
    extensions = list(state.get("extensions", []))
    extended = extend and saved.get("steps") != config.steps
    if extended and config.steps <= step:
        raise ConfigError(
            f"cannot extend {folder} to {config.steps} steps: it is already at step {step}"
        )
    restarts = _resumed_restarts(saved, extensions, config, step, extended, folder)
    if extended:
        # the cosine schedule is stretched from here on: recorded, since it changes the recipe
        extensions.append({"at_step": step, "from_steps": saved["steps"], "to_steps": config.steps})
    load_state_checked(
        model, load_file(str(folder / "model.safetensors")), f"training state {folder}"
    )
    # read onto the CPU: a state saved on a GPU then resumes anywhere (load_state_dict moves the
    # moments to each parameter's device)
    optimizer.load_state_dict(
        torch.load(folder / "optimizer.pt", weights_only=True, map_location="cpu")
    )
    config = TreeTrainConfig.model_validate(
        {**config.model_dump(mode="json"), "schedule_restarts": restarts}
    )
    history, evals = state["history"], state.get("evals", [])
    return config, step, history, evals, float(state["seconds"]), extensions


def train_tree_model(
    config: TreeTrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
    save_model: bool = True,
    until: int | None = None,
    extend: bool = False,
) -> TreeTrainResult:
    """Train from scratch (or resume ``out/state``), evaluate on the held-out split, and write
    ``out/model`` (``save_tree_model``) and ``out/metrics.json``.

    ``until`` stops after that step with the state saved (no final evaluation or model), so a
    long run can be done in slices with ``resume=True``; the schedule still spans ``steps``.
    ``extend=True`` resumes with a larger ``steps`` than the run had (the cosine schedule is
    stretched from the resume point on: recorded as ``extensions`` in the state and metrics,
    and as ``schedule_restarts`` in the saved config, which then trains the same run in one go)."""
    if until is not None and until < 1:
        raise ConfigError(f"until must be a positive step, got {until}")
    if extend and not resume:
        raise ConfigError("extend continues a saved run: it needs resume")
    stop = config.steps if until is None else min(until, config.steps)
    out = Path(out)
    configure_threads()
    device = resolve_device(config.device)
    model = build_model(config.model, seed=config.seed).to(device)
    model.train()
    optimizer = make_optimizer(model, config)
    step, history, evals, seconds, extensions = 0, _empty_history(), [], 0.0, []
    if resume and (out / STATE_DIR / "state.json").is_file():
        config, step, history, evals, seconds, extensions = _load_state(
            out, model, optimizer, config, extend
        )
        log(f"resumed {out / STATE_DIR} at step {step}")
        if extensions and extensions[-1]["at_step"] == step:
            log(f"schedule extended to {config.steps} steps from step {step}")
    elif resume:
        log(f"no training state in {out}; starting from scratch")
    forward = torch.compile(model) if config.compile else model
    eval_trees = heldout_trees(config.task, config.eval_per_length, seed=config.seed)
    sequences = 0
    run_seconds = 0.0
    window_loss, window_acc, window_n = 0.0, 0.0, 0

    with progress_bar(stop, "training tree model", progress) as advance:
        advance(min(step, stop))
        while step < stop:
            started = time.perf_counter()
            tokens, mask = training_batch(config, step)
            tokens, mask = tokens.to(device), mask.to(device)
            lr = lr_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with _autocast(device, config.precision):
                logits = _forward_logits(forward, tokens)
            targets = tokens[:, 1:]
            loss = tree_loss(logits, targets, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                if config.max_grad_norm is not None
                else torch.zeros(())
            )
            optimizer.step()
            with torch.no_grad():
                token_acc = ((logits.argmax(-1) == targets) & mask).sum() / mask.sum()
            # Summed on the device and read at log time: a per-step float() would make
            # every step wait for the accelerator.
            window_loss = window_loss + loss.detach().float()
            window_acc = window_acc + token_acc.float()
            window_n += 1
            elapsed = time.perf_counter() - started
            run_seconds += elapsed
            seconds += elapsed
            sequences += config.batch_size
            step += 1
            advance(1)
            if step % config.log_every == 0 or step == config.steps:
                mean_loss, mean_acc = float(window_loss) / window_n, float(window_acc) / window_n
                rate = sequences / max(run_seconds, 1e-9)
                for key, value in (
                    ("step", step),
                    ("loss", mean_loss),
                    ("token_accuracy", mean_acc),
                    ("lr", lr),
                    ("grad_norm", float(grad_norm)),
                    ("seconds", seconds),
                    ("sequences_per_s", rate),
                ):
                    history[key].append(value)
                log(
                    f"step {step}: loss {mean_loss:.4f}, token acc {mean_acc:.4f}, {rate:.0f} seq/s"
                )
                window_loss, window_acc, window_n = 0.0, 0.0, 0
            if step % config.eval_every == 0 and step < config.steps:
                acc = evaluate_accuracy(model, eval_trees, config.eval_batch_size)
                evals.append({"step": step, "seconds": seconds, **acc.to_json()})
                log(f"step {step}: held-out path accuracy {acc.overall:.4f}")
            if step % config.checkpoint_every == 0 or step == stop:
                _save_state(
                    out, model, optimizer, config, step, history, evals, seconds, extensions
                )

    n_params = count_parameters(model)
    # this invocation's throughput; a resume that trained no step reports the whole run's
    if run_seconds:
        rate = sequences / run_seconds
    else:
        rate = step * config.batch_size / seconds if seconds else 0.0
    if step < config.steps:
        log(f"stopped at step {step} of {config.steps}; continue with resume")
        return TreeTrainResult(
            steps=step,
            seconds=seconds,
            sequences_per_s=rate,
            history=history,
            evals=evals,
            accuracy=None,
            model_dir=None,
            n_params=n_params,
        )
    model.eval()
    final_trees = heldout_trees(config.task, config.final_eval_per_length, seed=config.seed)
    accuracy = evaluate_accuracy(model, final_trees, config.eval_batch_size)
    log(f"final held-out path accuracy {accuracy.overall:.4f}")
    result = TreeTrainResult(
        steps=step,
        seconds=seconds,
        sequences_per_s=rate,
        history=history,
        evals=evals,
        accuracy=accuracy,
        model_dir=out / MODEL_DIR if save_model else None,
        n_params=n_params,
    )
    meta = {
        "recipe": config.model_dump(mode="json"),
        "schedule_extensions": extensions,
        "train_seconds": seconds,
        "sequences_per_s": result.sequences_per_s,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "accuracy": accuracy.to_json(),
    }
    if save_model:
        save_tree_model(model.cpu(), config.model, config.task, out / MODEL_DIR, meta)
    atomic_write_json(out / "metrics.json", result.to_json())
    return result


def export_state(run: str | Path, folder: str | Path, per_length: int = 500) -> Path:
    """Save the newest training state of ``run`` (a ``tree train --out`` folder, possibly
    unfinished) as a tree model checkpoint in ``folder``, evaluated on the held-out split, so a
    long run can be used (evaluated, analysed, shipped) before its last step."""
    state_dir = Path(run) / STATE_DIR
    try:
        state = json.loads((state_dir / "state.json").read_text(encoding="utf-8"))
        config = TreeTrainConfig.model_validate(state["config"])
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"{state_dir} holds no readable training state: {exc}") from None
    model = build_model(config.model, seed=config.seed)
    load_state_checked(
        model, load_file(str(state_dir / "model.safetensors")), f"training state {state_dir}"
    )
    model.eval()
    trees = heldout_trees(config.task, per_length, seed=config.seed)
    accuracy = evaluate_accuracy(model, trees, config.eval_batch_size)
    meta = {
        "recipe": config.model_dump(mode="json"),
        "schedule_extensions": state.get("extensions", []),
        "step": int(state["step"]),
        "train_seconds": float(state["seconds"]),
        "exported_from": str(state_dir),
        "accuracy": accuracy.to_json(),
    }
    return save_tree_model(model, config.model, config.task, folder, meta)


def _autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _empty_history() -> dict[str, list[float]]:
    keys = ("step", "loss", "token_accuracy", "lr", "grad_norm", "seconds", "sequences_per_s")
    return {key: [] for key in keys}
