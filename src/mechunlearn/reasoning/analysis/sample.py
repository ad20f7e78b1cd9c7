"""What the analyses stand on: how many of the held-out trees they share are distinct, and how
many of the probes' test trees repeat one of their training trees.

Tree identities (structure and goal, ``trees.tree_hash``) are plentiful at the paper's n = 16
and at n = 8, but small trees repeat: n = 5 has 660 identities in all, of which 9 fall in the
2% held-out split. A 512-tree analysis sample then holds 9 distinct trees, in reversed order the
very same token sequences over and over, and a probe trained on one half of the sample is tested
on trees it was trained on. The probes' numbers then measure memory, not a linear read-out, and
the summary says so instead of letting them stand as evidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mechunlearn.reasoning.analysis.common import AnalysisSettings, analysis_trees
from mechunlearn.reasoning.analysis.probes import split_trees
from mechunlearn.reasoning.trees import TreeTaskConfig

# Above this share of repeated test trees the probes' verdicts are flagged as not evidence.
MAX_PROBE_REPEATS = 0.1


@dataclass
class SampleResult:
    trees: int
    distinct: int
    probe_test_trees: int
    probe_test_repeats: float  # share of the probes' test trees whose identity is in training

    @property
    def probes_trustworthy(self) -> bool:
        return self.probe_test_repeats <= MAX_PROBE_REPEATS

    def to_json(self) -> dict[str, Any]:
        return {
            "trees": self.trees,
            "distinct": self.distinct,
            "probe_test_trees": self.probe_test_trees,
            "probe_test_repeats": self.probe_test_repeats,
            "probes_trustworthy": self.probes_trustworthy,
        }

    def markdown(self) -> str:
        text = (
            f"Analysed sample: {self.trees} held-out trees, {self.distinct} distinct (structure "
            f"and goal); {100 * self.probe_test_repeats:.1f}% of the probes' "
            f"{self.probe_test_trees} test trees repeat one of their training trees.\n"
        )
        if not self.probes_trustworthy:
            text += (
                f"\n**The probe results below are not evidence**: more than "
                f"{100 * MAX_PROBE_REPEATS:.0f}% of the probes' test trees were also training "
                "trees, so the probes can recall rather than read out. This happens when trees "
                "are too small to have many distinct identities.\n"
            )
        return text


def sample_analysis(task: TreeTaskConfig, settings: AnalysisSettings) -> SampleResult:
    """Count the distinct trees of the analyses' shared sample and the probes' repeats; the
    model is not needed, only the trees every analysis draws."""
    trees = analysis_trees(task, settings).trees
    hashes = trees.tree_hash()
    train = split_trees(len(trees), settings.seed)
    seen = set(hashes[train].tolist())
    test = hashes[~train].tolist()
    repeats = sum(h in seen for h in test) / max(1, len(test))
    return SampleResult(
        trees=len(trees),
        distinct=len(set(hashes.tolist())),
        probe_test_trees=len(test),
        probe_test_repeats=repeats,
    )
