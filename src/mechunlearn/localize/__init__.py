"""Localization: which components store or move a fact.

Methods register in ``LOCALIZERS`` by name with their own options schema (``localize.registry``);
the framework (``localize.protocol``) restricts, budgets and packages every method's scores the
same way. Importing this package imports every built-in method so the registry is complete; a
method module that fails to import is an error, not a silently missing method.
"""

from mechunlearn.localize import (  # noqa: F401  (registration side effects)
    activation_patching,
    attribution,
    baselines,
    causal_tracing,
    eap,
    fact_lookup,
)
from mechunlearn.localize.options import LocalizeOptions, MethodOptions, ReadoutOptions
from mechunlearn.localize.prompts import FactPrompts, build_fact_prompts, pair_corruptions
from mechunlearn.localize.protocol import LocalizationMethod, Scores
from mechunlearn.localize.readouts import READOUTS
from mechunlearn.localize.registry import LOCALIZERS
from mechunlearn.localize.result import Localization, make_localization, select_under_budget

__all__ = [
    "LOCALIZERS",
    "READOUTS",
    "FactPrompts",
    "Localization",
    "LocalizationMethod",
    "LocalizeOptions",
    "MethodOptions",
    "ReadoutOptions",
    "Scores",
    "build_fact_prompts",
    "make_localization",
    "pair_corruptions",
    "select_under_budget",
]
