"""Training throughput of the tree path-finding trainer (Brinkmann et al. 2024 task) versus a
straightforward reference loop on the same model config, from one run.

    .venv/bin/python bench/tree_train_speed.py [--preset cpu|paper] [--batch-size 256]
        [--steps 10] [--warmup 2] [--precision fp32|bf16] [--compile] [--device cuda]
        [--json out.json]

Toolkit: ``train_tree_model`` itself (vectorised batch generation of fresh trees, fixed-shape
masked loss, AdamW with the cosine schedule; evaluation and checkpoints pushed past the run).
Reference: what one writes first - every tree generated in plain Python (lists, ``random``,
the reference's algorithm: path, second branch, leftover nodes attached to random free
parents, breadth-first topological edge order reversed or shuffled, the text
``A>B,...|G:R>...>G``, tokenized by longest match and padded), stacked into a batch, then a
standard step: logits at the masked positions, ``CrossEntropyLoss``, AdamW. Both train the same
architecture with the same batch size; the first ``--warmup`` steps are not timed.
``--precision`` and ``--compile`` apply to the toolkit only (the reference stays plain fp32
eager), so the printed speedup then includes them. ``--device`` (default: the toolkit's
default, ``MECHUNLEARN_DEVICE`` or the best available) applies to both; on an accelerator
each timed reference step ends with a synchronisation, and the toolkit's times are read at its
per-step log points, which wait for the device.

On a CPU the model step dominates: vectorised generation takes under 1% of a step, the
per-tree Python generation a few percent, so in fp32 the two run at about the same rate; the
toolkit's gains there come from ``--precision bf16`` (AVX512-BF16 / AMX) and ``--compile``.

FLOP/s: training FLOPs per step are estimated as ``6 * N * tokens`` (Kaplan et al. 2020), N =
the weight-matrix parameters outside the embeddings (blocks + unembedding), tokens = batch x
(4n - 2) positions read. Attention's score and mixing products add ``12 * layers * T * d_model``
per token (about 8% for the paper's config at T = 62); they are reported separately, not in
the fraction. The peak is a measured large matmul (``2 m^3`` FLOPs per ``m x m`` product,
best of several) on the same device and threads, in fp32 and, for a bf16 run, in bf16 too; the
toolkit's fraction is taken against the peak of its own precision.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time

import torch

from mechunlearn.reasoning.model import build_model, count_parameters, resolve_model_config
from mechunlearn.reasoning.train import TreeTrainConfig, train_tree_model
from mechunlearn.runtime import configure_threads, resolve_device


def reference_example(n: int, rng: random.Random) -> str:
    """One tree in plain Python, as the reference generator builds it."""
    nodes = list(range(n))
    rng.shuffle(nodes)
    length = rng.randint(1, n - 1)
    children: dict[int, list[int]] = {v: [] for v in range(n)}
    path = nodes[: length + 1]
    for a, b in zip(path, path[1:], strict=False):
        children[a].append(b)
    placed = path[:-1]  # the goal stays a leaf
    rest = nodes[length + 1 :]
    if rest:
        branch = rest[: rng.randint(1, len(rest))]
        previous = path[0]
        for v in branch:
            children[previous].append(v)
            placed.append(v)
            previous = v
        rest = rest[len(branch) :]
    for v in rest:
        parent = rng.choice([p for p in placed if len(children[p]) < 2])
        children[parent].append(v)
        placed.append(v)
    order, queue = [], [path[0]]
    while queue:
        node = queue.pop(0)
        order.append(node)
        queue.extend(sorted(children[node]))
    edges = [(p, c) for p in order for c in sorted(children[p])]
    if rng.random() < 0.5:
        edges.reverse()
    else:
        rng.shuffle(edges)
    text = ",".join(f"{a}>{b}" for a, b in edges)
    return f"{text}|{path[-1]}:" + ">".join(map(str, path))


def reference_vocab(n: int) -> list[str]:
    numbers = sorted((str(i) for i in range(n)), key=len, reverse=True)
    return [",", ":", "|", *(f">{t}" for t in numbers), *numbers]


def reference_tokenize(text: str, vocab: list[str], length: int) -> tuple[list[int], list[bool]]:
    """Longest-match tokenization, padding with ',' and the mask of the path after the root."""
    ids, i = [], 0
    while i < len(text):
        for token_id, token in enumerate(vocab):
            if text.startswith(token, i):
                ids.append(token_id)
                i += len(token)
                break
    colon = ids.index(1)
    mask = [colon + 2 <= t < len(ids) for t in range(length)]
    return ids + [0] * (length - len(ids)), mask


def synchronize(device: torch.device) -> None:
    """Wait for queued work, so that a wall-clock interval covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reference_rate(
    model_cfg, batch_size: int, steps: int, warmup: int, lr: float, device: torch.device
) -> float:
    """Sequences per second of the straightforward loop."""
    n = model_cfg.n_nodes
    vocab = reference_vocab(n)
    length = 4 * n - 1
    model = build_model(model_cfg).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    rng = random.Random(0)
    timed = 0.0
    for step in range(warmup + steps):
        started = time.perf_counter()
        rows = [
            reference_tokenize(reference_example(n, rng), vocab, length) for _ in range(batch_size)
        ]
        tokens = torch.tensor([r[0] for r in rows], device=device)
        mask = torch.tensor([r[1] for r in rows], device=device)
        inputs, targets, target_mask = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
        logits = model(input_ids=inputs).logits[target_mask]
        loss = loss_fn(logits, targets[target_mask])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        synchronize(device)
        if step >= warmup:
            timed += time.perf_counter() - started
    return steps * batch_size / timed


def toolkit_rate(config: TreeTrainConfig, warmup: int) -> float:
    """Sequences per second of ``train_tree_model`` over the steps after ``warmup``."""
    with tempfile.TemporaryDirectory() as out:
        result = train_tree_model(config, out, progress=False, save_model=False)
    seconds = result.history["seconds"]
    timed = seconds[-1] - seconds[warmup - 1] if warmup else seconds[-1]
    return (config.steps - warmup) * config.batch_size / timed


def matmul_peak(
    size: int, device: torch.device, dtype: torch.dtype = torch.float32, repeats: int = 5
) -> float:
    """FLOP/s of the best of ``repeats`` ``size x size`` matmuls in ``dtype`` on ``device``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", help="model preset: cpu | paper")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--device", help="cpu, cuda, mps (default: the toolkit's default)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    threads = configure_threads()
    device = resolve_device(args.device)
    model_cfg = resolve_model_config(args.preset)
    total = args.warmup + args.steps
    config = TreeTrainConfig(
        model=model_cfg,
        task={"n_nodes": model_cfg.n_nodes},
        steps=total,
        batch_size=args.batch_size,
        warmup_steps=0,
        log_every=1,
        eval_every=total + 1,
        checkpoint_every=total + 1,
        eval_per_length=1,
        final_eval_per_length=1,
        precision=args.precision,
        compile=args.compile,
        device=str(device),
    )
    toolkit = toolkit_rate(config, args.warmup)
    reference = reference_rate(
        model_cfg, args.batch_size, args.steps, args.warmup, config.lr, device
    )
    peak_fp32 = matmul_peak(args.matmul_size, device)
    peak = (
        matmul_peak(args.matmul_size, device, torch.bfloat16)
        if args.precision == "bf16"
        else peak_fp32
    )

    n_params = count_parameters(build_model(model_cfg))
    positions = 4 * model_cfg.n_nodes - 2
    flops_per_seq = 6 * n_params["non_embedding_matmul"] * positions
    attention_per_seq = 12 * model_cfg.n_layers * positions * model_cfg.d_model * positions
    results = {
        "model": model_cfg.model_dump(),
        "device": str(device),
        "threads": threads,
        "batch_size": args.batch_size,
        "timed_steps": args.steps,
        "precision": args.precision,
        "compile": args.compile,
        "parameters": n_params,
        "toolkit_sequences_per_s": toolkit,
        "reference_sequences_per_s": reference,
        "speedup": toolkit / reference,
        "train_flops_per_sequence_6N": flops_per_seq,
        "attention_flops_per_sequence": attention_per_seq,
        "toolkit_flop_per_s": toolkit * flops_per_seq,
        "reference_flop_per_s": reference * flops_per_seq,
        "matmul_peak_fp32_flop_per_s": peak_fp32,
        "matmul_peak_flop_per_s": peak,
        "toolkit_fraction_of_peak": toolkit * flops_per_seq / peak,
        "reference_fraction_of_peak": reference * flops_per_seq / peak_fp32,
    }
    print(
        f"{args.preset} ({n_params['total']:,} params), batch {args.batch_size}, {device}, "
        f"{threads} thread(s), {args.precision}{' compiled' if args.compile else ''}:\n"
        f"  toolkit   {toolkit:8.1f} seq/s  {toolkit * flops_per_seq / 1e9:9.2f} GFLOP/s "
        f"({100 * results['toolkit_fraction_of_peak']:.1f}% of the {args.precision} matmul peak)\n"
        f"  reference {reference:8.1f} seq/s  {reference * flops_per_seq / 1e9:9.2f} GFLOP/s "
        f"({100 * results['reference_fraction_of_peak']:.1f}% of the fp32 matmul peak)\n"
        f"  speedup {results['speedup']:.2f}x; matmul peak {peak_fp32 / 1e9:.1f} GFLOP/s fp32"
        + (f", {peak / 1e9:.1f} GFLOP/s bf16" if args.precision == "bf16" else "")
        + f" ({args.matmul_size}^2)"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
