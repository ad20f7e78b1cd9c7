"""Does a cheaper learning-rate selection pick as well as the full sweep? Measured on a run.

    .venv/bin/python bench/sweep_selection.py RUN [--variants stop13,steps10] [--workers 2]
        [--out bench-runs/sweep-selection]

``RUN`` is a finished ``mechunlearn run`` folder whose sweep was ``selection: full`` (its
localizations, validation facts and every grid point's full-length score are read from it).
Each variant re-trains every (localization, learning rate) point on the validation facts at
less cost and picks the best as the sweep does (``experiments.sweep.rank_points``):

- ``stopN``: the full-length schedule stopped after N steps (a successive-halving rung);
- ``stepsN``: a whole N-step schedule (warm-up and cosine decay compressed into N steps);
- ``curveN``: ``stopN`` scored also after every ``--curve-every`` steps, and then, for each
  early step k, a two-rung successive halving replayed from those scores: every point to step k,
  the best ``--keep`` go on (resumed, not retrained) to step N, the best of those is chosen.
  Its pick is compared with ``stopN``'s (the same runs' scores at step N).

It prints, per localization, the full sweep's pick and each variant's, and the full-sweep
score of each variant's pick against the best (equally good when they differ by at most one
validation fact). Points run as units in worker processes (``experiments.workers``); results
land in ``OUT/<variant>/<localization>/p<i>.json`` and a rerun reuses them.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from mechunlearn.experiments.workers import Unit, run_units

VARIANT = re.compile(r"^(stop|steps|curve)(\d+)$")


class _Context:
    def __init__(self, run: Path) -> None:
        from mechunlearn.experiments import edit_job

        self.ctx = edit_job.build_context(run)
        self.run = run


def make_context(out: Path) -> _Context:
    return _Context(Path(json.loads((out / "source.json").read_text())["run"]))


def execute(context: _Context, unit: Unit) -> dict:
    from mechunlearn.experiments import edit_job
    from mechunlearn.experiments.sweep import sweep_grid, sweep_point
    from mechunlearn.localize import Localization

    ctx = context.ctx
    config = ctx.config
    kind, n = VARIANT.match(unit.params["variant"]).groups()
    n = int(n)
    stop_after = n if kind in ("stop", "curve") else None
    score_at = range(unit.params.get("every", n), n, unit.params.get("every", n))
    if kind == "steps":
        config = config.model_copy(update={"sweep": config.sweep.model_copy(update={"steps": n})})
    name = unit.params["name"]
    spec = next(s for s in config.localizations if s.name == name)
    loc = Localization.load(context.run / "localizations" / f"{name}.json")
    lr, coef = sweep_grid(config.sweep)[unit.params["point"]]
    data = edit_job.train_data(config, ctx.validation, ctx.text_train)
    numbers = sweep_point(
        ctx.hm, spec, loc, ctx.validation, data, config, ctx.base_retain, lr, coef, stop_after,
        score_at=tuple(score_at) if kind == "curve" else (),
    )  # fmt: skip
    return {**numbers, "variant": unit.params["variant"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--variants", default="stop13,steps10")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-runs/sweep-selection"))
    parser.add_argument("--curve-every", type=int, default=2, help="curveN: score every k steps")
    parser.add_argument("--keep", type=int, default=2, help="curveN: points the first rung keeps")
    args = parser.parse_args()

    import yaml

    from mechunlearn.experiments.edit_config import ExperimentConfig
    from mechunlearn.experiments.sweep import rank_points, sweep_grid

    run = args.run.resolve()
    config = ExperimentConfig.model_validate(yaml.safe_load((run / "config.yaml").read_text()))
    if config.sweep is None or config.sweep.selection != "full":
        raise SystemExit(f"{run}: needs a run whose sweep was `selection: full`")
    variants = args.variants.split(",")
    for v in variants:
        if not VARIANT.match(v):
            raise SystemExit(f"unknown variant {v!r}: use stopN, stepsN or curveN")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "source.json").write_text(json.dumps({"run": str(run)}))
    names = [s.name for s in config.localizations if s.name not in config.hyperparameters]
    n_points = len(sweep_grid(config.sweep))
    units = [
        Unit(f"{v}/{name}/p{i}", v, f"{v}/{name}/p{i}.json",
             {"variant": v, "name": name, "point": i, "every": args.curve_every})
        for v in variants for name in names for i in range(n_points)
    ]  # fmt: skip
    timing = run_units(
        args.out, units, make_context=make_context, executor=execute, workers=args.workers,
        log=lambda m: print(m, flush=True),
    )  # fmt: skip
    seconds = {
        v: sum(t["seconds"] for k, t in timing.items() if k.startswith(v + "/")) for v in variants
    }

    print(f"\n{'localization':22s} {'full':>8s} " + " ".join(f"{v:>22s}" for v in variants))
    equal = {v: 0 for v in variants}
    for name in names:
        full = json.loads((run / "sweep" / f"{name}.json").read_text())["points"]
        by_lr = {p["lr"]: p["score"] for p in full}
        best = rank_points(full)[0]
        cells = []
        for v in variants:
            points = [
                json.loads((args.out / v / name / f"p{i}.json").read_text())
                for i in range(n_points)
            ]
            pick = rank_points(points)[0]
            gap = best["score"] - by_lr[pick["lr"]]
            # one validation fact moves a score by about 1/32 (retain) to 1/16 (forget)
            equal[v] += gap <= 0.02
            cells.append(f"{pick['lr']:g} ({by_lr[pick['lr']]:.3f})")
        print(f"{name:22s} {best['lr']:8g} " + " ".join(f"{c:>22s}" for c in cells))
    print(
        "\nequally good picks (full-sweep score within 0.02 of the best): "
        + ", ".join(f"{v} {equal[v]}/{len(names)}" for v in variants)
    )
    print("unit seconds this run: " + ", ".join(f"{v} {s:.0f}" for v, s in seconds.items()))
    for v in variants:
        if v.startswith("curve"):
            replay_halving(args.out / v, run, names, n_points, args.keep)


def replay_halving(folder: Path, run: Path, names: list[str], n_points: int, keep: int) -> None:
    """Two-rung halving replayed from the curves: which first-rung step k keeps the winner."""
    from mechunlearn.experiments.sweep import rank_points

    points = {
        name: [json.loads((folder / name / f"p{i}.json").read_text()) for i in range(n_points)]
        for name in names
    }
    steps = sorted({c["step"] for ps in points.values() for p in ps for c in p["curve"]})
    print(f"\n{folder.name}: two-rung halving, keep {keep} after step k (same pick as the end?)")
    print(f"{'localization':22s} {'end':>8s} " + " ".join(f"{'k=' + str(k):>16s}" for k in steps))
    same = dict.fromkeys(steps, 0)
    for name in names:
        full = json.loads((run / "sweep" / f"{name}.json").read_text())["points"]
        by_lr = {p["lr"]: p["score"] for p in full}
        end = rank_points(points[name])[0]
        cells = []
        for k in steps:
            at_k = [
                {**c, "lr": p["lr"]} for p in points[name] for c in p["curve"] if c["step"] == k
            ]
            kept = {p["lr"] for p in rank_points(at_k)[:keep]}
            pick = rank_points([p for p in points[name] if p["lr"] in kept])[0]
            same[k] += pick["lr"] == end["lr"]
            cells.append(f"{pick['lr']:g} ({by_lr[pick['lr']]:.3f})")
        print(f"{name:22s} {end['lr']:8g} " + " ".join(f"{c:>16s}" for c in cells))
    print("same pick as the end: " + ", ".join(f"k={k} {same[k]}/{len(names)}" for k in steps))


if __name__ == "__main__":
    main()
