"""Pictures, with the optional `plot` extra (matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import MoEERefError
from ..io.outputs import atomic_path, check_output_path


class MissingPlotExtra(MoEERefError):
    """matplotlib is not installed."""


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no screen needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingPlotExtra("--png needs matplotlib, the optional plot extra: pip install matplotlib (in a clone of moee-ref: pip install -e '.[plot]')") from None
    return plt


def check_picture_path(path: str | os.PathLike) -> None:
    """Before the work: matplotlib is there and the picture can be written (its directory is made if missing)."""
    pyplot()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    check_output_path(path)


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write the picture atomically (outputs.atomic_path): no half-written file is left under the name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def routing_heatmap(probs: np.ndarray, layers: list[int], path, title: str) -> None:
    """Layer x expert heatmap of router probabilities at one token."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, probs.shape[1] * 0.18), max(3, len(layers) * 0.3)))
    image = ax.imshow(probs, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="router probability")
    save_figure(fig, path)
    plt.close(fig)
