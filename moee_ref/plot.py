"""Pictures, with the optional `plot` extra (matplotlib)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import MoEERefError
from .outputs import default_file_mode


class MissingPlotExtra(MoEERefError):
    """matplotlib is not installed."""


def pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no screen needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingPlotExtra("--png needs matplotlib, the optional plot extra: pip install 'moee-ref[plot]'") from None
    return plt


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write to a temporary file beside path and rename, so no half-written picture is left under the name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.chmod(tmp, default_file_mode())  # not mkstemp's private 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


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
