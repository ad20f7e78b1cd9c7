"""Localization: which components store or move a fact.

Methods register in ``LOCALIZERS`` by name; importing this package imports every built-in
method so the registry is complete.
"""

from importlib import import_module

from mechunlearn.localize.prompts import FactPrompts, build_fact_prompts, pair_corruptions
from mechunlearn.localize.registry import LOCALIZERS, LocalizeOptions
from mechunlearn.localize.result import Localization, make_localization, select_under_budget

_METHOD_MODULES = (
    "baselines",
    "causal_tracing",
    "activation_patching",
    "attribution",
    "eap",
    "fact_lookup",
)
for _name in _METHOD_MODULES:
    try:
        import_module(f"mechunlearn.localize.{_name}")
    except ModuleNotFoundError as exc:  # a method module still being written
        if exc.name != f"mechunlearn.localize.{_name}":
            raise

__all__ = [
    "LOCALIZERS",
    "FactPrompts",
    "Localization",
    "LocalizeOptions",
    "build_fact_prompts",
    "make_localization",
    "pair_corruptions",
    "select_under_budget",
]
