"""Loading, component addressing and hooks over plain Hugging Face causal LMs."""

from mechunlearn.models.adapters import (
    ArchitectureAdapter,
    adapter_for,
    dimensions,
    head_contributions,
)
from mechunlearn.models.batches import Batch, left_pad
from mechunlearn.models.components import (
    GradientMask,
    ParamSlice,
    component_parameters,
    count_parameters,
)
from mechunlearn.models.embedded import EMBEDDED, ensure_cached
from mechunlearn.models.handle import HookedModel
from mechunlearn.models.hooks import (
    ActivationCache,
    Apply,
    MeanAblate,
    Patch,
    Perturb,
    ZeroAblate,
    compute_means,
    hooked,
    position_mask,
)
from mechunlearn.models.loading import load_model
from mechunlearn.models.sites import Site, all_sites, parse_site

__all__ = [
    "EMBEDDED",
    "ActivationCache",
    "Apply",
    "ArchitectureAdapter",
    "Batch",
    "GradientMask",
    "HookedModel",
    "MeanAblate",
    "ParamSlice",
    "Patch",
    "Perturb",
    "Site",
    "ZeroAblate",
    "adapter_for",
    "all_sites",
    "component_parameters",
    "compute_means",
    "count_parameters",
    "dimensions",
    "ensure_cached",
    "head_contributions",
    "hooked",
    "left_pad",
    "load_model",
    "parse_site",
    "position_mask",
]
