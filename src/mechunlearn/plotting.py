"""Figure output shared by every layer that draws: the non-interactive Agg backend (no display
needed, identical on laptops, CI and GPU nodes) and an atomic PNG writer."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    """Write a PNG atomically (temporary file + rename) and close the figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path
