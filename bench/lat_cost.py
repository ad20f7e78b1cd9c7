"""Time per training step: targeted LAT versus RT (the same trainer without an adversary), from
one run.

    .venv/bin/python bench/lat_cost.py [--model smollm2-135m] [--steps 3] [--warmup 1]
        [--adv-steps 8] [--defender-steps 1] [--batch-size 8] [--layers 4,8,12]
        [--mode lora|full]

Both methods train the same batches with the same loss (``train_lat``): ``--batch-size`` sports
prompts with the true sport as the desired completion and another sport as the unwanted one,
plus SFT on as many other sports facts. LAT first trains a latent adversary for
``--adv-steps`` PGD steps (at ``--layers``, relative epsilon 1) and then takes the defender
step(s) with the perturbation on; RT takes the same defender step(s) without it. ``--mode
lora`` (default) trains rank-8 LoRA adapters on every MLP, ``full`` every weight. Both runs are
in this process on the same model (the LoRA adapters / weights are reset in between); the first
``--warmup`` steps of each are not timed. The ratio LAT / RT is printed, and LAT's time is split
into the adversary and the defender.
"""

from __future__ import annotations

import argparse
import statistics

import torch


def build(model: str, batch_size: int):
    from mechunlearn.models import load_model
    from mechunlearn.tasks import load_sports
    from mechunlearn.tasks.preference import LatData, LatExample
    from mechunlearn.tasks.sports import SPORTS

    hm = load_model(model)
    records = load_sports()
    data = LatData(
        [
            LatExample(r.prompt(), " " + r.answer, " " + SPORTS[(SPORTS.index(r.answer) + 1) % 3])
            for r in records[:batch_size]
        ]
    )
    benign = [(r.prompt(), " " + r.answer) for r in records[batch_size : 2 * batch_size]]
    return hm, data, benign


def time_run(hm, data, benign, args, adversary) -> dict:
    from mechunlearn.edit import LatConfig, WeightSnapshot, make_trainable, train_lat

    n_layers = hm.dims.n_layers
    components = [f"blocks.{layer}.mlp" for layer in range(n_layers)]
    trainable = make_trainable(hm, args.mode, components if args.mode == "lora" else [])
    snapshot = WeightSnapshot(trainable.params) if args.mode == "full" else None
    config = LatConfig(
        adversary=adversary,
        steps=args.warmup + args.steps,
        defender_steps=args.defender_steps,
        lr=1e-5,
        batch_size=args.batch_size,
        benign_batch_size=args.batch_size,
        benign="sft",
    )
    try:
        result = train_lat(hm, trainable, data, benign, config, progress=False)
    finally:
        if snapshot is not None:
            snapshot.restore()
        trainable.restore()
    timed = slice(args.warmup, None)
    out = {
        "n_trainable": trainable.n_params,
        "step_seconds": result.history["seconds"][timed],
        "mean_seconds": statistics.fmean(result.history["seconds"][timed]),
    }
    if adversary is not None:
        out["adv_seconds"] = statistics.fmean(result.history["adv_seconds"][timed])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--adv-steps", type=int, default=8, help="adversary (PGD) steps")
    parser.add_argument("--defender-steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", help="adversary layers, comma-separated (default: 1/4, 1/2)")
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.adv_steps < 0 or args.defender_steps < 1:
        parser.error("need --steps >= 1, --warmup >= 0, --adv-steps >= 0, --defender-steps >= 1")

    from mechunlearn.edit.latent_adversary import LatentAdversaryConfig
    from mechunlearn.runtime import configure_threads

    configure_threads()
    hm, data, benign = build(args.model, args.batch_size)
    n_layers = hm.dims.n_layers
    layers = (
        [int(x) for x in args.layers.split(",")]
        if args.layers
        else sorted({n_layers // 4, n_layers // 2})
    )
    adversary = LatentAdversaryConfig(layers=layers, epsilon=1.0, steps=args.adv_steps, lr=0.1)
    rt = time_run(hm, data, benign, args, None)
    lat = time_run(hm, data, benign, args, adversary)

    print(
        f"model {args.model} on {hm.device} ({torch.get_num_threads()} threads); {args.mode} "
        f"({rt['n_trainable']:,} trainable); batch {args.batch_size} LAT examples + "
        f"{args.batch_size} benign pairs; {args.defender_steps} defender step(s) per step; "
        f"{args.steps} timed steps after {args.warmup} warmup"
    )
    print(f"adversary: {args.adv_steps} steps at layers {layers} (relative epsilon 1)")
    print(f"{'method':<7} {'s/step':>9}")
    print(f"{'RT':<7} {rt['mean_seconds']:>9.3f}")
    print(
        f"{'LAT':<7} {lat['mean_seconds']:>9.3f}  (adversary {lat['adv_seconds']:.3f}, "
        f"defender {lat['mean_seconds'] - lat['adv_seconds']:.3f})"
    )
    print(f"LAT / RT time per step: {lat['mean_seconds'] / rt['mean_seconds']:.2f}x")


if __name__ == "__main__":
    main()
