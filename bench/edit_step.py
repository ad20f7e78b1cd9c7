"""Time per training step: localized fine-tuning versus full fine-tuning, from one run.

    .venv/bin/python bench/edit_step.py [--model gemma3-270m] [--steps 5] [--batch-size 16]
        [--components blocks.0.mlp,blocks.1.mlp,blocks.2.mlp,blocks.3.mlp | --localization loc.json]

Both modes train the same batch with the same loss: ``--batch-size`` one-shot sports prompts
edited toward another sport (``edit`` objective) + the maintain term on as many other sports
facts + the LM term on 4 general texts. Localized FT trains the given components (default:
the MLPs of blocks 0-3, what fact-lookup localization selects on Gemma 3 270M; or the
``selected`` list of a saved Localization); full FT trains every parameter. Each mode runs in
its own subprocess, so peak memory (the process's peak resident set size on CPU, CUDA's peak
allocation on a GPU) is measured separately. The first ``--warmup`` steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

import torch


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> dict:
    """Train ``args.worker`` mode for warmup + steps steps; return timings and peak memory."""
    from mechunlearn.edit import TrainConfig, TrainData, fact_pairs, make_trainable, train
    from mechunlearn.models import load_model
    from mechunlearn.tasks import load_sports
    from mechunlearn.tasks.general_text import load_general_text
    from mechunlearn.tasks.sports import SPORTS

    hm = load_model(args.model)
    records = load_sports()
    n = args.batch_size
    forget = [
        r.model_copy(update={"new_answer": SPORTS[(SPORTS.index(r.answer) + 1) % len(SPORTS)]})
        for r in records[:n]
    ]
    data = TrainData(
        forget=fact_pairs(forget, target="new_answer", prompt="completion"),
        retain=fact_pairs(records[n : 2 * n], prompt="completion"),
        general_text=load_general_text()[:4],
    )
    components = args.components.split(",") if args.worker == "localized" else []
    trainable = make_trainable(hm, args.worker, components)
    config = TrainConfig(
        objective="edit",
        steps=args.warmup + args.steps,
        lr=1e-5,
        batch_size=n,
        retain_batch_size=n,
        lm_batch_size=4,
    )
    if hm.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(hm.device)
    result = train(hm, trainable, data, config, progress=False)
    times = result.history["seconds"][args.warmup :]
    return {
        "mode": args.worker,
        "n_trainable": trainable.n_params,
        "step_seconds": times,
        "mean_seconds": statistics.fmean(times),
        "peak_memory_mib": peak_memory_mib(hm.device),
        "device": str(hm.device),
        "threads": torch.get_num_threads(),
    }


def components_from(args: argparse.Namespace) -> str:
    if args.localization:
        from mechunlearn.localize import Localization

        return ",".join(Localization.load(args.localization).selected)
    return args.components


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--components", default=",".join(f"blocks.{layer}.mlp" for layer in range(4))
    )
    parser.add_argument("--localization", help="take the components from a saved Localization")
    parser.add_argument("--worker", choices=["localized", "full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    if args.worker:
        print(json.dumps(worker(args)))
        return

    components = components_from(args)
    results = {}
    for mode in ("localized", "full"):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            mode,
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--batch-size",
            str(args.batch_size),
            "--components",
            components,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{mode} run failed:\n{proc.stderr[-4000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])

    loc, full = results["localized"], results["full"]
    print(
        f"model {args.model} on {loc['device']} ({loc['threads']} threads); batch "
        f"{args.batch_size} edit + {args.batch_size} maintain + 4 LM texts; "
        f"{args.steps} timed steps after {args.warmup} warmup"
    )
    print(f"localized components: {components}")
    print(f"{'mode':<10} {'trainable':>13} {'s/step':>9} {'peak MiB':>10}")
    for r in (loc, full):
        print(
            f"{r['mode']:<10} {r['n_trainable']:>13,} {r['mean_seconds']:>9.3f} "
            f"{r['peak_memory_mib']:>10.0f}"
        )
    print(
        f"full / localized time per step: {full['mean_seconds'] / loc['mean_seconds']:.2f}x; "
        f"peak memory: {full['peak_memory_mib'] / loc['peak_memory_mib']:.2f}x"
    )


if __name__ == "__main__":
    main()
