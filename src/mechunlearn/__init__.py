"""mechunlearn: robust knowledge editing and unlearning grounded in mechanistic interpretability.

Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the user set it) before torch
starts its OpenMP pool: busy-waiting OpenMP threads slow a shared 2-core machine several-fold.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

__all__ = ["__version__"]
