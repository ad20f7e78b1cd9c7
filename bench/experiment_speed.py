"""Wall time of one experiment through the old path and the new engine, side by side in one run.

    .venv/bin/python bench/experiment_speed.py [--config sports-athlete-edit-16]
        [--localizations all_mlps] [--workers 2] [--out bench-runs/experiment-speed]
        [--selection full|halving] [--precision fp32|bf16] [--fidelity] [--skip-old]

Both paths run the same reduced configuration (the shipped config with only the given
localization rows and its first seed; same steps, same learning-rate grid, same battery), from
a cold localization cache, each in its own subprocess:

- old: one process with torch's default threads, fp32, every sweep point trained for every step,
  and the forwards and optimiser as before the engine (``bench/old_path.py``): what
  ``mechunlearn run`` did then;
- new: ``--workers`` worker processes with one torch thread each (every battery part its own
  unit), ``--selection`` (default: the config's own sweep selection), ``--precision`` forwards.

It prints per-phase unit seconds and wall seconds from each run's ``run.json``, the total wall
time and the ratio, and which learning rate each sweep chose. ``--fidelity`` trains one edit
(the first localization row, seed 0, the old run's chosen learning rate) in fp32 and in bf16 and
prints the battery's metric differences and both training times.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def reduced_config(
    args: argparse.Namespace, path: str, selection: str, precision: str, old: bool = False
) -> dict:
    import yaml

    from mechunlearn.experiments.edit_config import resolve_config

    data = yaml.safe_load(Path(resolve_config(args.config)).read_text())
    names = args.localizations.split(",")
    from mechunlearn.experiments.edit_config import default_localizations

    rows = data.get("localizations") or [s.model_dump() for s in default_localizations()]
    data["localizations"] = [row for row in rows if row["name"] in names]
    missing = set(names) - {row["name"] for row in data["localizations"]}
    if missing:
        raise SystemExit(f"unknown localization rows {sorted(missing)} in {args.config}")
    data["seeds"] = data.get("seeds", [0])[:1]
    data["sweep"] = {**(data.get("sweep") or {}), "selection": selection}
    data["train"] = {**data["train"], "precision": precision}
    if old:  # every causal-tracing cell, and forget and maintain terms in separate forwards
        method_options = data.get("method_options") or {}
        tracing = {**method_options.get("causal_tracing", {}), "trace_cells": "all"}
        data["method_options"] = {**method_options, "causal_tracing": tracing}
        data["train"]["joint_forward"] = False
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
    return data


def run_path(config_path: str, out: Path, workers: int, old: bool) -> float:
    """One ``run_experiment`` in a fresh subprocess (localizations recomputed). ``old``: the
    forwards and optimiser as they ran before the engine (``bench/old_path.py``)."""
    unpatched = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import old_path; old_path.install();"
        if old
        else ""
    )
    code = (
        unpatched + "from mechunlearn.experiments.config import load_yaml_config;"
        "from mechunlearn.experiments.edit_config import ExperimentConfig;"
        "from mechunlearn.experiments.edit_job import run_experiment;"
        f"cfg = load_yaml_config(ExperimentConfig, {config_path!r});"
        f"run_experiment(cfg, {str(out)!r}, use_cache=False, progress=False, workers={workers},"
        " log=lambda m: print(m, flush=True))"
    )
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - began


def fidelity(args: argparse.Namespace, folder: Path, lr: float) -> None:
    """The same edit in fp32 and bf16: battery metric differences and training seconds."""
    import torch

    from mechunlearn.edit.engine import with_changes
    from mechunlearn.edit.parametrization import editing
    from mechunlearn.edit.trainer import train
    from mechunlearn.experiments import edit_job
    from mechunlearn.experiments.battery import run_battery
    from mechunlearn.localize import Localization

    torch.set_num_threads(1)
    ctx = edit_job.build_context(folder)
    spec = ctx.config.localizations[0]
    loc = Localization.load(folder / "localizations" / f"{spec.name}.json")
    sets = ctx.seed_sets[ctx.config.seeds[0]]
    data = edit_job.train_data(ctx.config, sets, ctx.text_train)
    out = {}
    for precision in ("fp32", "bf16"):
        config = with_changes(
            spec.train_config(ctx.config.train), lr=lr, seed=0, precision=precision
        )
        with editing(ctx.hm, spec.trainer, loc.selected) as trainable:
            trained = train(ctx.hm, trainable, data, config, progress=False)
            battery = run_battery(
                ctx.hm, sets, ctx.config, 0, general_text_eval=ctx.text_eval,
                general_text_train=ctx.text_train, probe_reserve=list(ctx.facts.validation.forget),
            )  # fmt: skip
        out[precision] = (trained.seconds, battery.metrics)
    (t32, m32), (t16, m16) = out["fp32"], out["bf16"]
    print(f"\nfidelity: {spec.name}, lr {lr:g}; train seconds fp32 {t32:.1f}, bf16 {t16:.1f}")
    print(f"{'metric':45s} {'fp32':>9s} {'bf16':>9s} {'diff':>9s}")
    for key in sorted(set(m32) & set(m16)):
        print(f"{key:45s} {m32[key]:9.4f} {m16[key]:9.4f} {m16[key] - m32[key]:+9.4f}")


def _config_selection(config: str) -> str:
    import yaml

    from mechunlearn.experiments.edit_config import resolve_config

    data = yaml.safe_load(Path(resolve_config(config)).read_text())
    return (data.get("sweep") or {}).get("selection", "full")


def _phases(run: dict) -> dict:
    return run.get("phases", {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="sports-athlete-edit-16")
    parser.add_argument("--localizations", default="all_mlps")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--selection", choices=("full", "halving"), help="the new path's sweep (default: config's)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-runs/experiment-speed"))
    parser.add_argument("--fidelity", action="store_true")
    parser.add_argument("--skip-old", action="store_true", help="reuse OUT/old from a past run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    paths = {
        "old": ("full", "fp32", 1),
        "new": (args.selection or _config_selection(args.config), args.precision, args.workers),
    }
    for name, (selection, precision, workers) in paths.items():
        out = args.out / name
        if name == "old" and args.skip_old and (out / "run.json").is_file():
            results[name] = (json.loads((out / "run.json").read_text()), None)
            continue
        config_path = str(args.out / f"{name}.yaml")
        reduced_config(args, config_path, selection, precision, old=name == "old")
        print(f"--- {name}: {workers} process(es), {selection} sweep, {precision}", flush=True)
        wall = run_path(config_path, out, workers, old=name == "old")
        results[name] = (json.loads((out / "run.json").read_text()), wall)

    print("\nphase        |  old unit s   old wall s |  new unit s   new wall s")
    kinds = sorted(set(_phases(results["old"][0])) | set(_phases(results["new"][0])))
    for kind in kinds:
        o = _phases(results["old"][0]).get(kind, {})
        n = _phases(results["new"][0]).get(kind, {})
        print(
            f"{kind:12s} | {o.get('unit_seconds', 0):11.0f} {o.get('wall_seconds', 0):12.0f} |"
            f" {n.get('unit_seconds', 0):11.0f} {n.get('wall_seconds', 0):12.0f}"
        )
    old_s, new_s = results["old"][0]["seconds"], results["new"][0]["seconds"]
    print(f"{'run total':12s} | {old_s:24.0f} | {new_s:24.0f}")
    print(f"\nratio old / new wall time: {old_s / new_s:.2f}x")
    print("\nchosen learning rates (old full sweep -> new):")
    for name, hp in results["old"][0]["hyperparameters"].items():
        print(f"  {name}: {hp['lr']:g} -> {results['new'][0]['hyperparameters'][name]['lr']:g}")
    if args.fidelity:
        first = next(iter(results["old"][0]["hyperparameters"].values()))
        fidelity(args, args.out / "old", first["lr"])


if __name__ == "__main__":
    main()
