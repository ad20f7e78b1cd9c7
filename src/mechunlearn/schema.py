"""The settings every configuration and record schema shares (a ground module: no imports
from the package).

``extra="forbid"``: a misspelt key is an error, not a silently ignored option.
``allow_inf_nan=False``: ``lr: .inf`` or ``nan`` in a YAML file is refused when the file is
read, naming the field, rather than failing somewhere inside training.
"""

from __future__ import annotations

from pydantic import ConfigDict

STRICT_CONFIG = ConfigDict(extra="forbid", allow_inf_nan=False)
FROZEN_CONFIG = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)
