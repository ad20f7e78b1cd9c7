"""Overhead of caching every hook site versus a plain forward, measured side by side.

    .venv/bin/python bench/hooks_overhead.py [--model gemma3-270m] [--batch 8] [--repeats 7]

Runs plain and hooked forwards interleaved (so machine load affects both alike), reports the
median time of each, their ratio, and the memory the cache holds. Done twice: with full logits
(the HF default) and with ``logits_to_keep=1`` (how the toolkit scores facts).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mechunlearn.models import load_model
from mechunlearn.tasks import load_general_text


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    hm = load_model(args.model)
    texts = load_general_text()[: args.batch]
    inputs = hm.batch(texts).model_inputs()
    n_tokens = int(inputs["attention_mask"].sum())
    print(
        f"model {args.model} on {hm.device}, {torch.get_num_threads()} thread(s); batch {args.batch}, {inputs['input_ids'].shape[1]} positions, {n_tokens} tokens"
    )

    for label, extra in (("full logits", {}), ("logits_to_keep=1", {"logits_to_keep": 1})):
        plain_times, hooked_times = [], []
        cache_bytes = 0
        with torch.no_grad():
            hm.model(**inputs, **extra)  # warm-up
            for _ in range(args.repeats):
                plain_times.append(timed(lambda extra=extra: hm.model(**inputs, **extra)))
                with hm.hooks(cache=True) as cache:
                    hooked_times.append(timed(lambda extra=extra: hm.model(**inputs, **extra)))
                    cache_bytes = cache.nbytes()
                    n_sites = len(cache)
                del cache
        plain, hooked = statistics.median(plain_times), statistics.median(hooked_times)
        print(
            f"[{label}] plain {plain * 1000:.1f} ms, cache-all ({n_sites} sites) {hooked * 1000:.1f} ms, "
            f"ratio {hooked / plain:.3f}x; cache holds {cache_bytes / 2**20:.1f} MiB"
        )


if __name__ == "__main__":
    main()
