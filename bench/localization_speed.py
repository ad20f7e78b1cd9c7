"""Localization speed on a real model, measured side by side in one run.

    .venv/bin/python bench/localization_speed.py [--model gemma3-270m] [--facts 32] [--naive-facts 4 | --full]

1. Causal tracing, full sweep (residual, MLP and attention x every layer x every traced
   position): ``causal_trace`` (every restored cell of a position as a batch row, running only
   the suffix from that position over the corrupted run's KV cache) versus the naive loop (one
   full forward per cell). The naive loop costs the same per fact, so by default it runs on
   ``--naive-facts`` of the facts and is scaled to all of them (printed as such); ``--full``
   runs it on every fact.
2. Attribution patching over every head, attention layer and MLP, as a multiple of one plain
   forward + backward of the same metric on the same batch.

Peak memory: the process's peak resident set size after each part (CPU), or CUDA's peak
allocation when on a GPU.
"""

from __future__ import annotations

import argparse
import random
import resource
import time

import torch

from mechunlearn.evals.harness import known_records
from mechunlearn.localize import LocalizeOptions, build_fact_prompts
from mechunlearn.localize.attribution import attribution_batch
from mechunlearn.localize.causal_tracing import causal_trace, causal_trace_naive
from mechunlearn.localize.prompts import answer_logit_diff, choose_pairable_facts, pair_corruptions
from mechunlearn.models import load_model
from mechunlearn.tasks import load_sports


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--facts", type=int, default=32)
    parser.add_argument("--naive-facts", type=int, default=4)
    parser.add_argument("--full", action="store_true", help="run the naive loop on every fact")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    hm = load_model(args.model)
    sample = random.Random(0).sample(load_sports(), min(len(load_sports()), 8 * args.facts))
    facts = choose_pairable_facts(hm, known_records(hm, sample), args.facts, seed=0)
    print(
        f"model {args.model} on {hm.device}, {torch.get_num_threads()} thread(s); {len(facts)} known facts"
    )
    options = LocalizeOptions(batch_size=args.batch_size, progress=False)

    batched_s, loc = timed(lambda: causal_trace(hm, facts, options))
    naive_facts = facts if args.full else facts[: args.naive_facts]
    naive_s, _ = timed(lambda: causal_trace_naive(hm, naive_facts, options))
    naive_all = naive_s * len(facts) / len(naive_facts)
    label = (
        "measured"
        if args.full
        else f"measured on {len(naive_facts)} facts, scaled x{len(facts) / len(naive_facts):g}"
    )
    print(
        f"causal tracing, full sweep on {len(facts)} facts: {loc.evidence['implementation']} "
        f"{batched_s:.1f} s ({loc.evidence['n_forwards']} forwards, "
        f"{loc.evidence['n_rows']} rows); naive {naive_all:.1f} s ({label}); "
        f"speed-up {naive_all / batched_s:.1f}x; peak memory {peak_memory_mib(hm.device):.0f} MiB"
    )

    partners = pair_corruptions(hm, facts)
    clean, corrupt = build_fact_prompts(hm, facts), build_fact_prompts(hm, partners)
    clean_inputs = {k: v.to(hm.device) for k, v in clean.batch.model_inputs().items()}

    def plain_forward_backward() -> None:
        logits = hm.model(**clean_inputs, logits_to_keep=1).logits[:, -1]
        answer_logit_diff(logits, clean).sum().backward()
        hm.model.zero_grad(set_to_none=True)

    def attribution() -> None:
        attribution_batch(hm, clean, corrupt)

    plain_forward_backward()  # warm-up
    plain_times, ap_times = [], []
    for _ in range(3):
        plain_times.append(timed(plain_forward_backward)[0])
        ap_times.append(timed(attribution)[0])
    plain, ap = min(plain_times), min(ap_times)
    print(
        f"attribution patching, all components, {len(facts)} facts: {ap:.2f} s vs plain forward+backward "
        f"{plain:.2f} s = {ap / plain:.2f}x; peak memory {peak_memory_mib(hm.device):.0f} MiB"
    )


if __name__ == "__main__":
    main()
