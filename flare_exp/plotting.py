"""Matplotlib without a display, and figures saved atomically (a report never holds half a PNG)."""
from __future__ import annotations

from pathlib import Path

from flare_exp.io import atomic_path


def subplots(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
