"""The report of an experiment, rendered from its saved per-(localization or method, seed)
results.

``write_report(run_folder, columns)`` reads ``results/<localization>/seed<k>.json`` and writes:

- ``summary.json``: every metric per localization as mean, std (over seeds, n - 1) and n;
- ``results.md``: the headline table (method x metric, mean ± std) and the full table;
- ``figures/``: bar charts of the headline metrics, relearning curves, probe accuracy by layer;
- ``report.html``: all of it in one static page, figures embedded, with config and provenance.

Targeted-LAT runs (``kind: lat`` in ``run.json``, or in ``config.yaml`` while partial) get their
own columns (per application: refusal or backdoor), a compute table (training time and
forward/backward passes of every method, and their ratio to the method's baseline), the
backdoor installation measured before removal, a bar figure and attack-success curves.

This module only dispatches: aggregation lives in ``results``, rendering in ``edit_report``
and ``lat_report``.

The ``report`` command calls it again on a finished run, so tables and plots can be
regenerated (or restyled) without retraining anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mechunlearn.io import atomic_write_json
from mechunlearn.report.columns import Column
from mechunlearn.report.edit_report import write_edit_report
from mechunlearn.report.html import write_html_report
from mechunlearn.report.lat_report import write_lat_report
from mechunlearn.report.results import load_results, result_order, run_kind, summarise


def write_report(folder: str | Path, columns: Sequence[Column]) -> dict[str, Any]:
    """Render summary.json, results.md and figures/ for the run in ``folder``; ``columns``:
    the headline columns the measurements register (``MEASUREMENTS.columns()`` in
    ``experiments.measurements``, a layer above the report)."""
    folder = Path(folder)
    results = load_results(folder)
    order = result_order(folder, results)
    summary = summarise(results)
    atomic_write_json(folder / "summary.json", {"order": order, "summary": summary})
    write = write_lat_report if run_kind(folder) == "lat" else write_edit_report
    write(folder, summary, order, results, columns)
    write_html_report(folder)
    return summary
