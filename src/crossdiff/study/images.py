"""Slices as the PNGs readers see: grey levels through a display window, square physical pixels.

Every image of one case (real and synthetic) goes through the same window, so a brightness error of a
method stays visible: CT through fixed HU windows (soft tissue, bone), MR through the 0.5-99.5
percentile window of the real image inside the body.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from crossdiff.atomic import atomic_path
from crossdiff.evaluation.figures import CT_WINDOW
from crossdiff.study.layout import Window

CT_WINDOWS = {
    "soft-tissue": ("soft tissue (W 400, L 40 HU)", CT_WINDOW),
    "bone": ("bone (W 1800, L 400 HU)", (-500.0, 1300.0)),
}
MR_WINDOW = "percentile"
MR_PERCENTILES = (0.5, 99.5)


def display_windows(hounsfield: bool) -> tuple[Window, ...]:
    if hounsfield:
        return tuple(Window(name, label) for name, (label, _) in CT_WINDOWS.items())
    low, high = MR_PERCENTILES
    return (Window(MR_WINDOW, f"{low:g}-{high:g} percentile of the real image inside the body"),)


def case_windows(hounsfield: bool, reference: np.ndarray, body: np.ndarray) -> dict[str, tuple[float, float]]:
    """{window name: (low, high)} for the images of one case, fixed by its real image for the MR window."""
    if hounsfield:
        return {name: bounds for name, (_, bounds) in CT_WINDOWS.items()}
    low, high = np.percentile(reference[body], MR_PERCENTILES)
    return {MR_WINDOW: (float(low), float(max(high, low + 1e-6)))}


def write_png(path: Path, image: np.ndarray, window: tuple[float, float], aspect: float = 1.0) -> Path:
    """An 8-bit grey PNG of a 2-D slice; `aspect` (row / column spacing) stretches the rows so the anatomy
    keeps its shape. Written atomically, without metadata (nothing in the file names its source)."""
    low, high = window
    grey = np.round(np.clip((image.astype(np.float64) - low) / (high - low), 0.0, 1.0) * 255).astype(np.uint8)
    picture = Image.fromarray(grey)  # uint8, 2-D: mode L
    if abs(aspect - 1.0) > 0.01:
        picture = picture.resize((grey.shape[1], max(1, round(grey.shape[0] * aspect))), Image.Resampling.BICUBIC)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return Path(path)
