"""Registered measurements (``MEASUREMENTS``), one module each, shared by the editing battery
(``experiments.battery``) and the targeted-LAT evaluation (``experiments.lat_measure``).

Importing the package registers the built-in measurements, in the order they run and their
metrics and report columns appear: the battery's (formats, CounterFact, probes, relocalize,
relearning, soft prompt), then targeted LAT's (refusal, backdoor, latent attack, prefilling,
GCG suffix, many-shot prompts, embedding attack, benign requests).
"""

# isort: off
# the import order is the registration order: the order measurements run and are reported
from mechunlearn.experiments.measurements import formats  # noqa: F401
from mechunlearn.experiments.measurements import counterfact  # noqa: F401
from mechunlearn.experiments.measurements import probes  # noqa: F401
from mechunlearn.experiments.measurements import relocalize  # noqa: F401
from mechunlearn.experiments.measurements import relearn  # noqa: F401
from mechunlearn.experiments.measurements import soft_prompt  # noqa: F401
from mechunlearn.experiments.measurements import refusal  # noqa: F401
from mechunlearn.experiments.measurements import backdoor  # noqa: F401
from mechunlearn.experiments.measurements import latent_attack  # noqa: F401
from mechunlearn.experiments.measurements import prefill  # noqa: F401
from mechunlearn.experiments.measurements import gcg  # noqa: F401
from mechunlearn.experiments.measurements import many_shot  # noqa: F401
from mechunlearn.experiments.measurements import embed_attack  # noqa: F401
from mechunlearn.experiments.measurements import benign  # noqa: F401

# isort: on
from mechunlearn.experiments.measurements.context import (
    BatteryContext,
    LatContext,
    MeasureContext,
)
from mechunlearn.experiments.measurements.registry import (
    MEASUREMENTS,
    BatteryResult,
    Measurement,
    NoOptions,
    Planned,
    check_extra,
    plan,
)

__all__ = [
    "MEASUREMENTS",
    "BatteryContext",
    "BatteryResult",
    "LatContext",
    "MeasureContext",
    "Measurement",
    "NoOptions",
    "Planned",
    "check_extra",
    "plan",
]
