"""Mechanistic analyses of the path-finding tree model (Brinkmann et al. 2024, "A Mechanistic
Analysis of a Transformer Trained on a Symbolic Multi-Step Reasoning Task", arXiv:2402.11917):
accuracy by path length and edge order, attention patterns (edge merging, goal copying), the
attention mass by key role and by group of edge separators, linear probes, the subtree each
edge's separator holds, where the goal is read, deduction heads, causal scrubbing (the depth bound), register tokens, and a summary of
which mechanisms the model shows. ``analyze_checkpoint`` runs them all (``tree analyze``)."""

from mechunlearn.reasoning.analysis.accuracy import AccuracyResult, accuracy_analysis
from mechunlearn.reasoning.analysis.attention import AttentionResult, attention_analysis
from mechunlearn.reasoning.analysis.common import AnalysisSettings, TreeData, analysis_trees
from mechunlearn.reasoning.analysis.deduction import DeductionResult, deduction_analysis
from mechunlearn.reasoning.analysis.goal_reads import GoalReadResult, goal_read_analysis
from mechunlearn.reasoning.analysis.patterns import attention_control, run_patterns
from mechunlearn.reasoning.analysis.probes import ProbeResult, probe_analysis
from mechunlearn.reasoning.analysis.registers import (
    RegisterResult,
    RegisterSettings,
    register_analysis,
)
from mechunlearn.reasoning.analysis.roles import RoleResult, role_analysis
from mechunlearn.reasoning.analysis.run import (
    TreeAnalysis,
    TreeAnalysisConfig,
    analyze_checkpoint,
    analyze_tree_model,
    write_analysis,
)
from mechunlearn.reasoning.analysis.scrubbing import (
    ScrubbingResult,
    ScrubbingSettings,
    scrubbing_analysis,
)
from mechunlearn.reasoning.analysis.subtrees import SubtreeResult, subtree_analysis
from mechunlearn.reasoning.analysis.summary import (
    Finding,
    MechanismSummary,
    SummaryThresholds,
    summarize,
)

__all__ = [
    "AccuracyResult",
    "AnalysisSettings",
    "AttentionResult",
    "DeductionResult",
    "Finding",
    "GoalReadResult",
    "MechanismSummary",
    "ProbeResult",
    "RegisterResult",
    "RegisterSettings",
    "RoleResult",
    "ScrubbingResult",
    "ScrubbingSettings",
    "SubtreeResult",
    "SummaryThresholds",
    "TreeAnalysis",
    "TreeAnalysisConfig",
    "TreeData",
    "accuracy_analysis",
    "analysis_trees",
    "analyze_checkpoint",
    "analyze_tree_model",
    "attention_analysis",
    "attention_control",
    "deduction_analysis",
    "goal_read_analysis",
    "probe_analysis",
    "register_analysis",
    "role_analysis",
    "run_patterns",
    "scrubbing_analysis",
    "subtree_analysis",
    "summarize",
    "write_analysis",
]
