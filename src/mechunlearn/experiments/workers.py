"""Independent units of an experiment, run in parallel worker processes.

An experiment is a graph of ``Unit``s (a localization method, one sweep point, one
(localization, seed) edit with its battery, ...): each has a result file in the run folder and
the units it depends on. ``run_units`` executes every unit whose file is missing:

- ``workers == 1``: in this process, one after another (the reference path);
- ``workers > 1``: in that many spawned processes, each with one torch thread
  (``OMP_NUM_THREADS=1``, ``OMP_WAIT_POLICY=PASSIVE``: two torch threads on a loaded 2-core
  machine are 5-15x slower than one), each loading the model once and keeping it for all its
  units. A unit is dispatched when its dependencies' files exist; the worker writes the
  unit's file atomically before reporting it done, so a run killed at any moment (the parent
  SIGKILLed included: workers die with it) resumes with every finished unit kept.

Which process runs a unit never changes its result: a unit reads its inputs from the run folder,
the global RNGs are seeded from its key before it runs (``seed_unit``), and it restores the model
before the next unit.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechunlearn.errors import ConfigError, MechUnlearnError


@dataclass(frozen=True)
class Unit:
    """One piece of work: ``kind`` (``localize``, ``sweep``, ``edit``, ...) names its phase;
    ``path`` is its result file relative to the run folder; ``params`` (JSON-able) is all the
    executor needs besides the run folder."""

    key: str
    kind: str
    path: str
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    deps: tuple[str, ...] = ()


class UnitFailed(MechUnlearnError):
    """A unit raised in a worker; the message carries the worker's traceback."""


Executor = Callable[[Any, Unit], dict[str, Any] | None]
"""``executor(context, unit)`` computes a unit and returns its result (written by the pool);
``None`` when the executor wrote the file itself."""


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from ``/proc/stat`` (Linux), else None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def busy_cores(sample_seconds: float = 0.5) -> float:
    """How many cores other work keeps busy right now: CPU time sampled over ``sample_seconds``
    (Linux), else the 1-minute load average. The load average trails by about a minute, so
    right after an install it still counts the finished ``pip`` as a busy core."""
    before = _cpu_times()
    if before is not None:
        time.sleep(sample_seconds)
        after = _cpu_times()
        if after is not None and after[1] > before[1]:
            share = (after[0] - before[0]) / (after[1] - before[1])
            return share * (os.cpu_count() or 1)
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def idle_cores() -> int:
    """Cores not busy now (other work subtracted, see ``busy_cores``), at least 1."""
    total = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    total = total or 1
    return max(1, min(total, round(total - busy_cores())))


class Progress:
    """Units done, running and left, and an ETA from the mean time of each kind so far."""

    def __init__(self, units: Sequence[Unit], workers: int, log: Callable[[str], None]) -> None:
        self.left = {u.key: u for u in units}
        self.running: dict[str, float] = {}
        self.done = 0
        self.total = len(units)
        self.workers = workers
        self.log = log
        self.seconds: dict[str, list[float]] = {}

    def start(self, unit: Unit) -> None:
        self.running[unit.key] = time.monotonic()

    def finish(self, unit: Unit, seconds: float) -> None:
        self.running.pop(unit.key, None)
        self.left.pop(unit.key, None)
        self.done += 1
        self.seconds.setdefault(unit.kind, []).append(seconds)
        self.log(f"{unit.key} done in {seconds:.0f}s; {self.describe()}")

    def eta_seconds(self) -> float | None:
        known = {k: sum(v) / len(v) for k, v in self.seconds.items()}
        if not known:
            return None
        fallback = sum(known.values()) / len(known)
        work = sum(known.get(u.kind, fallback) for u in self.left.values())
        now = time.monotonic()
        for key, began in self.running.items():  # time already spent on running units
            work -= min(now - began, known.get(self.left[key].kind, fallback))
        return max(0.0, work) / self.workers

    def describe(self) -> str:
        text = (
            f"units: {self.done} done, {len(self.running)} running, "
            f"{len(self.left) - len(self.running)} left"
        )
        eta = self.eta_seconds()
        if eta is not None and self.left:
            text += f"; ETA {eta / 60:.0f} min"
        return text


def seed_unit(unit: Unit) -> None:
    """Seed the global RNGs from the unit's key before it runs: a unit's result must not depend
    on which process runs it or on what that process ran before (e.g. an unseeded LoRA
    initialisation drawing from the global generator)."""
    import hashlib
    import random

    import torch

    seed = int(hashlib.sha256(unit.key.encode()).hexdigest()[:8], 16)
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return
    numpy.random.seed(seed)


def _ready(unit: Unit, finished: set[str]) -> bool:
    return all(dep in finished for dep in unit.deps)


def _order(units: Sequence[Unit], priority: Sequence[str]) -> list[Unit]:
    rank = {kind: i for i, kind in enumerate(priority)}
    return sorted(units, key=lambda u: rank.get(u.kind, len(rank)))


def run_units(
    folder: Path,
    units: Sequence[Unit],
    *,
    make_context: Callable[[Path], Any],
    executor: Executor,
    workers: int = 1,
    priority: Sequence[str] = (),
    context: Any = None,
    log: Callable[[str], None] = lambda _: None,
    on_done: Callable[[Unit, dict[str, Any]], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Run every unit of ``units`` whose result file is missing (see the module docstring).

    ``make_context(folder)`` builds a process's context (model, config, data) once;
    ``context``: an already built one for the in-process path. ``priority``: unit kinds in the
    order ready units are taken. ``on_done(unit, timing)`` runs in this process after each
    unit. Returns per-unit timing ``{key: {"seconds", "started", "ended", "worker"}}``
    (``started``/``ended`` as ``time.time()``).
    """
    from mechunlearn.io import atomic_write_json

    keys = {u.key for u in units}
    for unit in units:
        missing = [d for d in unit.deps if d not in keys]
        if missing:
            raise ConfigError(f"unit {unit.key} depends on unknown units {missing}")
    finished = {u.key for u in units if (folder / u.path).is_file()}
    todo = _order([u for u in units if u.key not in finished], priority)
    progress = Progress(todo, max(1, workers), log)
    timing: dict[str, dict[str, float]] = {}
    if not todo:
        return timing
    log(f"{len(todo)} of {len(units)} units to run on {workers} worker(s)")
    if workers <= 1:
        context = context if context is not None else make_context(folder)
        while todo:
            unit = next((u for u in todo if _ready(u, finished)), None)
            if unit is None:
                raise ConfigError(f"units {[u.key for u in todo]} wait on each other")
            todo.remove(unit)
            progress.start(unit)
            began = time.time()
            seed_unit(unit)
            result = executor(context, unit)
            if result is not None:
                atomic_write_json(folder / unit.path, result)
            ended = time.time()
            timing[unit.key] = {"seconds": ended - began, "started": began, "ended": ended}
            timing[unit.key]["worker"] = 0
            finished.add(unit.key)
            progress.finish(unit, ended - began)
            if on_done is not None:
                on_done(unit, timing[unit.key])
        return timing
    return _run_in_processes(
        folder, todo, finished, make_context, executor, workers, progress, timing, on_done
    )


def _run_in_processes(
    folder, todo, finished, make_context, executor, workers, progress, timing, on_done
):
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # spawned children inherit them before torch is imported
    try:
        procs = [
            ctx.Process(
                target=_worker_main,
                args=(i, folder, make_context, executor, tasks, results, os.getpid()),
                daemon=True,
            )
            for i in range(min(workers, len(todo)))
        ]
        for proc in procs:
            proc.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    idle = list(range(len(procs)))
    by_key = {u.key: u for u in todo}
    busy: dict[int, str] = {}
    try:
        while todo or busy:
            while idle:
                unit = next((u for u in todo if _ready(u, finished)), None)
                if unit is None:
                    break
                todo.remove(unit)
                worker = idle.pop(0)
                busy[worker] = unit.key
                tasks.put((worker, unit))
                progress.start(unit)
            if not busy:
                raise ConfigError(f"units {[u.key for u in todo]} wait on each other")
            message = _next_message(results, procs)
            kind, worker, key = message[:3]
            if kind == "failed":
                raise UnitFailed(f"unit {key} failed in worker {worker}:\n{message[3]}")
            began, ended = message[3], message[4]
            unit = by_key[key]
            timing[key] = {"seconds": ended - began, "started": began, "ended": ended}
            timing[key]["worker"] = worker
            busy.pop(worker)
            idle.append(worker)
            finished.add(key)
            progress.finish(unit, ended - began)
            if on_done is not None:
                on_done(unit, timing[key])
    finally:
        for _ in procs:
            tasks.put(None)
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return timing


def _next_message(results, procs) -> tuple:
    """The next worker message; a worker that died without one (killed, out of memory) is an
    error naming its exit code, not a hang."""
    import queue

    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            dead = [p for p in procs if not p.is_alive()]
            if dead:
                codes = ", ".join(f"worker {procs.index(p)}: exit {p.exitcode}" for p in dead)
                raise UnitFailed(f"a worker process died ({codes})") from None


def _die_with_parent(parent: int) -> None:
    """SIGKILL this worker when the parent dies (Linux), so a killed run leaves no orphans
    writing into its folder."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _worker_main(index, folder, make_context, executor, tasks, results, parent) -> None:
    _die_with_parent(parent)
    import torch

    from mechunlearn.io import atomic_write_json

    torch.set_num_threads(1)
    context = None
    while True:
        item = tasks.get()
        if item is None or os.getppid() != parent:
            return
        worker, unit = item
        began = time.time()
        try:
            if context is None:
                context = make_context(folder)
            seed_unit(unit)
            result = executor(context, unit)
            if result is not None:
                atomic_write_json(folder / unit.path, result)
        except BaseException:  # reported, then this worker stops
            results.put(("failed", worker, unit.key, traceback.format_exc()))
            return
        results.put(("done", worker, unit.key, began, time.time()))


def phase_seconds(timing: dict[str, dict[str, float]], units: Sequence[Unit]) -> dict[str, Any]:
    """Per unit kind: units run, summed unit seconds and wall seconds (first start to last end)."""
    kinds: dict[str, dict[str, Any]] = {}
    for unit in units:
        t = timing.get(unit.key)
        if t is None:
            continue
        k = kinds.setdefault(unit.kind, {"units": 0, "unit_seconds": 0.0, "first": t["started"]})
        k["units"] += 1
        k["unit_seconds"] += t["seconds"]
        k["first"] = min(k["first"], t["started"])
        k["last"] = max(k.get("last", t["ended"]), t["ended"])
    return {
        kind: {
            "units": k["units"],
            "unit_seconds": round(k["unit_seconds"], 1),
            "wall_seconds": round(k["last"] - k["first"], 1),
        }
        for kind, k in kinds.items()
    }


def unit_timeline(timing: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per unit: its worker, start (seconds after the first unit started) and duration, to see
    where a run spent its time and where a worker sat idle."""
    if not timing:
        return {}
    origin = min(t["started"] for t in timing.values())
    return {
        key: {
            "worker": int(t.get("worker", 0)),
            "start": round(t["started"] - origin, 1),
            "seconds": round(t["seconds"], 1),
        }
        for key, t in sorted(timing.items(), key=lambda kv: kv[1]["started"])
    }


def record_part(
    folder: Path, workers: int, timing: dict[str, dict[str, float]], units: Sequence[Unit]
) -> list[dict[str, Any]]:
    """Append this part of a run (one invocation; a resumed run adds another) to
    ``parts.json``: workers, units run, seconds per phase and the unit timeline. Returns every
    part so far."""
    from mechunlearn.io import atomic_write_json, read_json

    path = folder / "parts.json"
    parts = read_json(path) if path.is_file() else []
    parts.append(
        {
            "workers": workers,
            "units_run": len(timing),
            "phases": phase_seconds(timing, units),
            "timeline": unit_timeline(timing),
        }
    )
    atomic_write_json(path, parts)
    return parts


__all__ = [
    "Progress",
    "Unit",
    "UnitFailed",
    "idle_cores",
    "phase_seconds",
    "record_part",
    "run_units",
    "unit_timeline",
]
