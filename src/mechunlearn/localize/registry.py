"""Localization methods registered by name, each with its own options schema.

Register a scorer (``(hm, records, options, method_options) -> Scores``) with
``@LOCALIZERS.method("name", options=MyOptions, ...)``; the decorator returns the callable
``LocalizationMethod`` (``method(hm, records, options, method_options) -> Localization``), which
is also what ``LOCALIZERS.get("name")`` returns.
"""

from __future__ import annotations

from collections.abc import Callable

from mechunlearn.localize.options import LocalizeOptions, MethodOptions
from mechunlearn.localize.protocol import LocalizationMethod, Scorer
from mechunlearn.registry import Registry


class MethodRegistry(Registry[LocalizationMethod]):
    """The registry of localization methods."""

    def method(
        self,
        name: str,
        *,
        options: type[MethodOptions] = MethodOptions,
        needs_pairs: bool = False,
        needs_budget: bool = False,
        scope_defined: bool = False,
    ) -> Callable[[Scorer], LocalizationMethod]:
        """Decorator registering a scorer as method ``name`` (see ``LocalizationMethod``)."""

        def decorator(score: Scorer) -> LocalizationMethod:
            entry = LocalizationMethod(
                name,
                score,
                options,
                needs_pairs=needs_pairs,
                needs_budget=needs_budget,
                scope_defined=scope_defined,
                description=(score.__doc__ or "").strip().split("\n\n")[0],
            )
            self.register(name)(entry)
            return entry

        return decorator


LOCALIZERS = MethodRegistry("localization method")

__all__ = ["LOCALIZERS", "LocalizationMethod", "LocalizeOptions", "MethodOptions", "MethodRegistry"]
