"""Pictures a person looks at: rows of labelled slices written as one PNG."""

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
    return save_panel_grid([panels], path, title, aspect)


def save_panel_grid(rows: list[list[Panel | None]], path: str | Path, title: str | None = None, aspect: float = 1.0) -> Path:
    """Write rows of panels as one grid (None leaves a cell empty), so that e.g. each method's error map
    sits under its image and a figure of many methods stays readable."""
    columns = max(len(row) for row in rows)
    figure, axes = plt.subplots(len(rows), columns, figsize=(3.2 * columns, 3.6 * len(rows)), squeeze=False)
    for row_axes, row in zip(axes, rows, strict=True):
        for axis, panel in zip(row_axes, [*row, *[None] * (columns - len(row))], strict=True):
            axis.axis("off")
            if panel is None:
                continue
            shown = axis.imshow(panel.image, cmap=panel.cmap, vmin=panel.vmin, vmax=panel.vmax, aspect=aspect)
            if panel.overlay is not None:
                axis.contour(panel.overlay.astype(float), levels=[0.5], colors="lime", linewidths=0.8)
            axis.set_title(panel.title, fontsize=10)
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
