"""Wall time of one targeted-LAT run in one process and on worker processes, side by side.

    .venv/bin/python bench/lat_workers.py [--config lat-refusal] [--seeds 2] [--workers 2]
        [--max-test 16] [--set train.steps=8 ...] [--out bench-runs/lat-workers]

Both runs use the same reduced configuration (the shipped config with its first ``--seeds``
seeds, ``--max-test`` held-out requests and any ``--set KEY=VALUE`` as ``mechunlearn run``
reads it), each in its own subprocess: ``--workers 1`` (this
process, torch's default threads) and ``--workers N`` (N spawned processes, one torch thread
each; refusal: one unit per method and seed). It prints each run's wall time, the ratio, the
per-unit seconds of the worker run, and whether the two runs' per-request outcomes agree.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def reduced_config(args: argparse.Namespace, path: Path) -> None:
    import yaml

    from mechunlearn.experiments.config import apply_overrides
    from mechunlearn.experiments.edit_config import resolve_config

    data = yaml.safe_load(Path(resolve_config(args.config)).read_text())
    data = apply_overrides(data, args.set)
    data["seeds"] = data.get("seeds", [0])[: args.seeds]
    data["evaluation"] = {**data.get("evaluation", {}), "max_test": args.max_test}
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def run(config: Path, out: Path, workers: int) -> float:
    command = [
        sys.executable, "-c", "from mechunlearn.cli import app; app()",
        "run", str(config), "--out", str(out),
        "--workers", str(workers), "--quiet",
    ]  # fmt: skip
    tick = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - tick


def per_request(out: Path) -> dict[str, dict]:
    return {
        str(p.relative_to(out)): json.loads(p.read_text()).get("per_request")
        for p in sorted((out / "results").glob("*/seed*.json"))
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="lat-refusal")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-test", type=int, default=16)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("bench-runs/lat-workers"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = args.out / "config.yaml"
    reduced_config(args, config)
    one = run(config, args.out / "one", 1)
    many = run(config, args.out / f"workers{args.workers}", args.workers)
    print(f"{args.config}: {args.seeds} seed(s), {args.max_test} held-out requests")
    print(f"  1 process:        {one:8.1f} s")
    print(f"  {args.workers} workers:        {many:8.1f} s")
    print(f"  speed-up:         {one / many:8.2f}x")
    parts = json.loads((args.out / f"workers{args.workers}" / "parts.json").read_text())
    for key, unit in parts[-1]["timeline"].items():
        print(f"    {key:24s} worker {unit['worker']}  start {unit['start']:7.1f}  "
              f"{unit['seconds']:7.1f} s")  # fmt: skip
    same = per_request(args.out / "one") == per_request(args.out / f"workers{args.workers}")
    print(f"  per-request outcomes identical: {same}")


if __name__ == "__main__":
    main()
