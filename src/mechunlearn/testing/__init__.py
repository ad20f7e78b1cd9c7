"""Test scaffolding, not library code: tiny randomly initialised models of the supported
families (``tiny_models``) and a tiny Llama with a planted fact-lookup MLP (``planted``), for
the test suite.

It may import any layer below ``experiments``; no library module imports it
(``tests/test_layers.py`` checks both).
"""
