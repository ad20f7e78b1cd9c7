"""Run every tree-model analysis (Brinkmann et al. 2024, arXiv:2402.11917) and write the
results folder atomically: ``results.json`` (every analysis's numbers and the mechanism
summary), ``summary.md`` and ``figures/*.png``. ``mechunlearn tree analyze`` calls
``analyze_checkpoint``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from mechunlearn.io import atomic_directory, atomic_write_json, atomic_write_text
from mechunlearn.models.handle import HookedModel
from mechunlearn.progress import progress_bar
from mechunlearn.reasoning.analysis.accuracy import AccuracyResult, accuracy_analysis
from mechunlearn.reasoning.analysis.attention import AttentionResult, attention_analysis
from mechunlearn.reasoning.analysis.common import AnalysisOrder, AnalysisSettings, check_tree_model
from mechunlearn.reasoning.analysis.deduction import DeductionResult, deduction_analysis
from mechunlearn.reasoning.analysis.goal_reads import GoalReadResult, goal_read_analysis
from mechunlearn.reasoning.analysis.probes import DEFAULT_L2, ProbeResult, probe_analysis
from mechunlearn.reasoning.analysis.registers import (
    RegisterResult,
    RegisterSettings,
    register_analysis,
)
from mechunlearn.reasoning.analysis.roles import RoleResult, role_analysis
from mechunlearn.reasoning.analysis.sample import SampleResult, sample_analysis
from mechunlearn.reasoning.analysis.scrubbing import (
    ScrubbingResult,
    ScrubbingSettings,
    scrubbing_analysis,
)
from mechunlearn.reasoning.analysis.subtrees import SubtreeResult, subtree_analysis
from mechunlearn.reasoning.analysis.summary import (
    MechanismSummary,
    SummaryThresholds,
    summarize,
)
from mechunlearn.reasoning.trees import TreeTaskConfig
from mechunlearn.schema import STRICT_CONFIG

STEPS = (
    "sample",
    "accuracy",
    "attention",
    "roles",
    "probes",
    "subtrees",
    "deduction",
    "scrubbing",
    "registers",
    "goal_reads",
)
# analyses reported beside the verdicts rather than read by ``summarize``
DESCRIPTIVE = ("sample", "roles", "subtrees", "goal_reads")


class TreeAnalysisConfig(BaseModel):
    """Settings of ``tree analyze``; every analysis uses the same trees and seed."""

    model_config = STRICT_CONFIG

    n_trees: int = Field(default=512, ge=8, description="held-out trees per mechanism analysis")
    per_length: int = Field(default=100, ge=1, description="accuracy: held-out trees per length")
    seed: int = 0
    edge_order: AnalysisOrder = "backward"
    batch_size: int = Field(default=256, ge=1)
    donors: int = Field(default=4096, ge=16, description="scrubbing: donor pool")
    probe_l2: float = Field(default=DEFAULT_L2, ge=0)
    register_from_layer: int = Field(default=1, ge=0)
    register_min_effect: float = Field(default=0.1, ge=0)
    thresholds: SummaryThresholds = Field(default_factory=SummaryThresholds)

    def settings(self) -> AnalysisSettings:
        return AnalysisSettings(
            n_trees=self.n_trees,
            seed=self.seed,
            edge_order=self.edge_order,
            batch_size=self.batch_size,
        )


@dataclass
class TreeAnalysis:
    accuracy: AccuracyResult
    attention: AttentionResult
    roles: RoleResult
    probes: ProbeResult
    subtrees: SubtreeResult
    deduction: DeductionResult
    scrubbing: ScrubbingResult
    registers: RegisterResult
    goal_reads: GoalReadResult
    sample: SampleResult
    summary: MechanismSummary
    config: TreeAnalysisConfig
    seconds: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "config": self.config.model_dump(mode="json"),
            "seconds": self.seconds,
            "summary": self.summary.to_json(),
            **{step: getattr(self, step).to_json() for step in STEPS},
        }


def analyze_tree_model(
    hm: HookedModel,
    task: TreeTaskConfig,
    config: TreeAnalysisConfig | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> TreeAnalysis:
    """All analyses on one model, then the mechanism summary."""
    config = config or TreeAnalysisConfig()
    check_tree_model(hm, task)
    settings = config.settings()
    base = settings.model_dump()
    runs: dict[str, Callable[[], Any]] = {
        "sample": lambda: sample_analysis(task, settings),
        "accuracy": lambda: accuracy_analysis(
            hm, task, config.per_length, config.seed, max(config.batch_size, 256)
        ),
        "attention": lambda: attention_analysis(hm, task, settings),
        "roles": lambda: role_analysis(hm, task, settings),
        "probes": lambda: probe_analysis(hm, task, settings, l2=config.probe_l2),
        "subtrees": lambda: subtree_analysis(hm, task, settings, l2=config.probe_l2),
        "deduction": lambda: deduction_analysis(hm, task, settings),
        "scrubbing": lambda: scrubbing_analysis(
            hm, task, ScrubbingSettings(**base, donors=config.donors)
        ),
        "registers": lambda: register_analysis(
            hm,
            task,
            RegisterSettings(
                **base,
                from_layer=config.register_from_layer,
                min_effect=config.register_min_effect,
            ),
        ),
        "goal_reads": lambda: goal_read_analysis(hm, task, settings),
    }
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    with progress_bar(len(runs), "analysing tree model", progress) as advance:
        for step, run in runs.items():
            started = time.perf_counter()
            results[step] = run()
            seconds[step] = time.perf_counter() - started
            log(f"{step}: {seconds[step]:.1f} s")
            advance(1)
    summary = summarize(
        **{k: v for k, v in results.items() if k not in DESCRIPTIVE}, thresholds=config.thresholds
    )
    return TreeAnalysis(**results, summary=summary, config=config, seconds=seconds)


def write_analysis(analysis: TreeAnalysis, out: str | Path) -> Path:
    """``out/results.json``, ``out/summary.md`` and ``out/figures/``, replaced as a whole."""
    from mechunlearn.reasoning.analysis import figures

    out = Path(out)
    with atomic_directory(out) as tmp:
        atomic_write_json(tmp / "results.json", analysis.to_json())
        title = analysis.meta.get("checkpoint", "tree model")
        atomic_write_text(
            tmp / "summary.md",
            f"# Mechanisms of {title}\n\n"
            + analysis.sample.markdown()
            + "\n"
            + analysis.summary.markdown()
            + "\n## Where the path positions read (attention mass by key role, %)\n\n"
            + analysis.roles.markdown()
            + "\n## Subtrees held at the edge separators\n\n"
            + analysis.subtrees.markdown()
            + "\n## Where the goal is read (attention to it blocked, one layer at a time)\n\n"
            + analysis.goal_reads.markdown(),
        )
        folder = tmp / "figures"
        figures.accuracy_figure(analysis.accuracy, folder / "accuracy.png")
        figures.attention_figure(analysis.attention, folder / "attention.png")
        figures.roles_figure(analysis.roles, folder / "roles.png")
        figures.probes_figure(analysis.probes, folder / "probes.png")
        figures.subtrees_figure(analysis.subtrees, folder / "subtrees.png")
        figures.deduction_figure(analysis.deduction, folder / "deduction.png")
        figures.scrubbing_figure(analysis.scrubbing, folder / "scrubbing.png")
        figures.registers_figure(analysis.registers, folder / "registers.png")
    return out


def analyze_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    config: TreeAnalysisConfig | None = None,
    device: str | None = None,
    expect: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> TreeAnalysis:
    """Load a saved tree model (``load_tree_model``: DataError if it is not one, ConfigError if
    it is of another config than ``expect`` or its weights do not match), analyse it, write
    ``out``."""
    from mechunlearn.reasoning.model import (
        SHIPPED,
        hooked_tree_model,
        load_tree_model,
        shipped_checkpoint_name,
    )
    from mechunlearn.runtime import configure_threads, resolve_device

    configure_threads()
    loaded = load_tree_model(checkpoint, expect=expect, device=str(resolve_device(device)))
    hm = hooked_tree_model(loaded.model, name=str(loaded.path))
    analysis = analyze_tree_model(hm, loaded.task, config, progress=progress, log=log)
    # a shipped checkpoint by name, not by this machine's install path (results get committed)
    name = shipped_checkpoint_name(loaded.path)
    if name == SHIPPED:
        described = "the shipped checkpoint (mechunlearn/reasoning/checkpoint)"
    elif name is not None:
        described = f"the shipped checkpoint {name!r} (mechunlearn/reasoning/checkpoints/{name})"
    else:
        described = str(loaded.path)
    analysis.meta = {
        "checkpoint": described,
        "model": loaded.config.model_dump(),
        "task": loaded.task.model_dump(),
    }
    write_analysis(analysis, out)
    return analysis
