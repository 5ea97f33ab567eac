"""Modality-aware intensity scaling to [-1, 1] that can be undone exactly.

Every scaling is a clipped linear map: physical value `low` -> -1 and `high` -> +1. What differs
between modalities is how `low`/`high` are chosen (a fixed HU window for CT, robust percentiles or
the mean for MR, an SUV window for PET). The fitted numbers travel with the data and with every model
(`to_dict`/`from_dict`) so that network outputs return to HU or SUV.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from crossdiff.errors import CrossdiffError
from crossdiff.units import DISPLAY, DISPLAY_RANGE, HU, SUV
from crossdiff.volumes import Volume

METHODS = ("ct-window", "percentile", "mean", "suv", "fixed")


def default_method(volume: Volume) -> str:
    """The scaling that fits the image's units: the HU window for CT in HU, the SUV window for PET in
    SUV, the full grey range for display-windowed images (0-255 is their meaning), and robust
    percentiles for everything without a physical scale (MR, arbitrary units)."""
    if volume.units == DISPLAY:
        return "fixed"
    if volume.modality == "CT" and volume.units in (None, HU):
        return "ct-window"
    if volume.modality == "PET" and volume.units in (None, SUV):
        return "suv"
    return "percentile"


@dataclass(frozen=True)
class IntensityScaling:
    """x -> 2 * (clip(x, low, high) - low) / (high - low) - 1, and back."""

    method: str
    low: float
    high: float
    units: str | None = None

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise CrossdiffError(f"intensity window is empty: low {self.low:g} >= high {self.high:g}")

    def apply(self, array: np.ndarray) -> np.ndarray:
        clipped = np.clip(array.astype(np.float64), self.low, self.high)
        return (2.0 * (clipped - self.low) / (self.high - self.low) - 1.0).astype(np.float32)

    def invert(self, array: np.ndarray) -> np.ndarray:
        """Back to physical units; values outside [-1, 1] are clipped first (the window's limits)."""
        unit = np.clip(array.astype(np.float64), -1.0, 1.0)
        return ((unit + 1.0) / 2.0 * (self.high - self.low) + self.low).astype(np.float32)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> IntensityScaling:
        return cls(str(data["method"]), float(data["low"]), float(data["high"]), data.get("units"))  # type: ignore[arg-type]


def fit_scaling(
    volume: Volume,
    mask: np.ndarray | None = None,
    method: str | None = None,
    window: tuple[float, float] | None = None,
    percentiles: tuple[float, float] = (0.5, 99.5),
    mean_multiple: float = 3.0,
) -> IntensityScaling:
    """Choose the scaling of `volume` (inside `mask` where the statistic needs one).

    - 'ct-window': fixed HU window, default [-1024, 3000] (SynthRAD's clip range).
    - 'percentile': robust MR scaling, the given percentiles inside the mask map to [-1, 1].
    - 'mean': SynDiff-style scaling by the mean inside the mask: 0 -> -1, `mean_multiple`*mean -> +1.
    - 'suv': fixed SUV window for PET, default [0, 20].
    - 'fixed': the given `window`, for any modality (default for display grey levels: 0-255).
    Without `method`, the one that fits the image's modality and units (`default_method`).
    """
    method = method or default_method(volume)
    if method == "fixed" and window is None and volume.units == DISPLAY:
        window = DISPLAY_RANGE
    if method not in METHODS:
        raise CrossdiffError(f"unknown intensity scaling {method!r}; choose from {', '.join(METHODS)}")
    if method == "ct-window":
        low, high = window or (-1024.0, 3000.0)
    elif method == "suv":
        low, high = window or (0.0, 20.0)
    elif method == "fixed":
        if window is None:
            raise CrossdiffError("intensity scaling 'fixed' needs a window (low, high)")
        low, high = window
    else:
        values = volume.array[mask.astype(bool)] if mask is not None and mask.any() else volume.array.ravel()
        if method == "percentile":
            low, high = (float(v) for v in np.percentile(values, percentiles))
        else:
            low, high = 0.0, float(mean_multiple * values.mean())
    if not high > low:
        raise CrossdiffError(
            f"{volume.path or 'image'}: cannot scale intensities with {method!r}: window [{low:g}, {high:g}] is empty"
        )
    return IntensityScaling(method, float(low), float(high), volume.units)
