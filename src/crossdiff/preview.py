"""Pictures a person looks at: a row of labelled slices written as one PNG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from crossdiff.atomic import atomic_path  # noqa: E402


@dataclass(frozen=True)
class Panel:
    """One slice to show, with its display window (e.g. a CT soft-tissue window in HU)."""

    title: str
    image: np.ndarray
    vmin: float | None = None
    vmax: float | None = None
    cmap: str = "gray"
    overlay: np.ndarray | None = None


def save_panels(panels: list[Panel], path: str | Path, title: str | None = None, aspect: float = 1.0) -> Path:
    """Write the panels side by side; `aspect` is row spacing / column spacing so anatomy is not squashed."""
    figure, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for axis, panel in zip(axes[0], panels, strict=True):
        shown = axis.imshow(panel.image, cmap=panel.cmap, vmin=panel.vmin, vmax=panel.vmax, aspect=aspect)
        if panel.overlay is not None:
            axis.contour(panel.overlay.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
        axis.set_title(panel.title, fontsize=10)
        axis.axis("off")
        figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.02)
    if title:
        figure.suptitle(title, fontsize=11)
    return save_figure(figure, path)


def save_figure(figure: plt.Figure, path: str | Path) -> Path:
    """Lay out, write as PNG atomically (a failed write leaves no partial image), and free the figure."""
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, format="png")
    plt.close(figure)
    return path
