"""Time of one GCG step's candidate evaluation: every candidate row as its own padded forward
(the plain path) versus each request's prompt head run once into a KV cache that its candidates
continue from (``attacks.gcg._losses``), side by side in one process on the same model.

    .venv/bin/python bench/gcg_candidates.py [--model smollm2-135m] [--requests 8]
        [--candidates 32] [--suffix-tokens 10] [--repeats 3]

The requests are the shipped harmful test requests, the candidates random single-token swaps
of a random suffix, as one step of ``gcg_attack`` with the refusal experiment's settings. Both
paths' losses are compared (largest absolute difference) so the speed-up is not bought with a
different answer. Run with one thread per process (``OMP_NUM_THREADS=1``) for CPU numbers.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--candidates", type=int, default=32)
    parser.add_argument("--suffix-tokens", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from mechunlearn.attacks.gcg import _losses, _mean_logprobs, _request
    from mechunlearn.models import load_model
    from mechunlearn.tasks.refusal import load_refusal_task

    hm = load_model(args.model)
    items = load_refusal_task().harmful["test"][: args.requests]
    requests = [_request(hm, it, target_words=6) for it in items]
    rng = random.Random(0)
    base = [rng.randrange(1000, 20000) for _ in range(args.suffix_tokens)]
    suffixes = []
    for _ in range(args.candidates):
        swapped = list(base)
        swapped[rng.randrange(len(base))] = rng.randrange(1000, 20000)
        suffixes.append(swapped)

    def plain() -> torch.Tensor:
        prompts = [r.head + s + r.tail for s in suffixes for r in requests]
        targets = [r.target for _ in suffixes for r in requests]
        scores = _mean_logprobs(hm, prompts, targets, args.candidates)
        return -scores.view(len(suffixes), len(requests)).mean(1)

    def cached() -> torch.Tensor:
        return _losses(hm, requests, suffixes, args.candidates)

    timings: dict[str, list[float]] = {"plain": [], "cached": []}
    results = {}
    for _ in range(args.repeats):  # interleaved, so drifting load hits both alike
        for name, run in (("plain", plain), ("cached", cached)):
            tick = time.perf_counter()
            results[name] = run()
            timings[name].append(time.perf_counter() - tick)
    rows = len(suffixes) * len(requests)
    width = len(requests[0].head) + args.suffix_tokens + len(requests[0].tail)
    print(f"{args.model}: {len(requests)} requests x {len(suffixes)} candidates = {rows} rows")
    print(f"  prompt head {len(requests[0].head)} tokens of ~{width} before the target")
    for name, values in timings.items():
        print(f"  {name:>6}: median {statistics.median(values):.2f} s per step")
    ratio = statistics.median(timings["plain"]) / statistics.median(timings["cached"])
    gap = float((results["plain"] - results["cached"]).abs().max())
    print(f"  speed-up plain / cached: {ratio:.2f}x; largest loss difference {gap:.2e} nats")


if __name__ == "__main__":
    main()
