"""What an image's numbers mean (Hounsfield units, SUV, display grey levels, arbitrary units), decided
from the file's own evidence and said out loud.

A CT exported as an 8-bit display-windowed PNG is not in Hounsfield units: read as HU, its 0-255 grey
levels fill 3% of the network's range, the body mask "CT > -500 HU" becomes the whole slice, and
PSNR over a 4024-HU data range gains 24 dB for nothing. So the units are decided here, once, from
what the file says (DICOM rescale, file type, pixel type, value range), with the reason kept beside
them (`Volume.evidence['units']`): `info` and `prepare` print it, models and reports carry it, and a
manifest or `--units` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from crossdiff.errors import CrossdiffError

HU = "HU"
DISPLAY = "display"  # grey levels of a display-windowed export (0-255): an intensity image, no physics
ARBITRARY = "a.u."
SUV = "SUVbw"
KNOWN_UNITS = (HU, SUV, "Bq/ml", "counts", DISPLAY, ARBITRARY)
DISPLAY_RANGE = (0.0, 255.0)
# Air is -1000 HU: a CT in HU has its lowest percentile near it (air around and inside the body).
HU_AIR_BELOW = -500.0
# Display-windowed CT clips everything denser than the window's top to the brightest grey: bone in
# every window in use (brain W80 L40, soft tissue W400 L40). Used as the bone class of such a CT.
DISPLAY_BONE_FROM = 250.0
SLICE_FORMATS = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class UnitsDecision:
    """The units of an image and why; `warning` marks a decision the user should look at."""

    units: str
    reason: str
    warning: bool = False


def check_units(units: str, where: str = "units") -> str:
    """A units name crossdiff knows (case of 'hu', 'display' ... forgiven), else a clear error."""
    for known in KNOWN_UNITS:
        if units.lower() == known.lower():
            return known
    raise CrossdiffError(f"{where}: unknown units {units!r}; use one of {', '.join(KNOWN_UNITS)}")


def is_physical(units: str | None) -> bool:
    """True for units with a physical meaning shared across scanners (HU, SUV): fixed windows apply."""
    return units in (HU, SUV)


def decide_units(array: np.ndarray, family: str | None, file_kind: str, declared: str | None = None) -> UnitsDecision:
    """Units of `array` read from a file of `file_kind` ('dicom', 'slices' for PNG/JPEG, 'volume' for
    NIfTI/MHA/NRRD, 'array' for NumPy/MATLAB), for the modality `family`; `declared` is what a DICOM
    header says, and wins."""
    if declared is not None:
        return UnitsDecision(declared, f"declared by the DICOM header ({family} {declared})")
    low, high = float(np.min(array)), float(np.max(array))
    eight_bit = low >= DISPLAY_RANGE[0] and high <= DISPLAY_RANGE[1] and _integer_valued(array)
    if file_kind == "slices":  # 8-bit files; grey read as the mean of near-equal channels is still 8-bit grey
        if low >= DISPLAY_RANGE[0] and high <= DISPLAY_RANGE[1]:
            return UnitsDecision(DISPLAY, f"{_range(low, high)} in an image file: display grey levels, not physical units",
                                 warning=family in ("CT", "PET"))
        return UnitsDecision(ARBITRARY, f"{_range(low, high)} in an image file: arbitrary units", warning=family in ("CT", "PET"))
    if family == "CT":
        return _ct_units(array, low, high, eight_bit)
    if family == "PET":
        if low >= 0 and high <= 100:
            return UnitsDecision(SUV, f"{_range(low, high)}: read as SUV (body weight); the file does not say its units")
        return UnitsDecision(ARBITRARY, f"{_range(low, high)}: too high for SUV and the file names no units", warning=True)
    if eight_bit:
        return UnitsDecision(DISPLAY, f"{_range(low, high)}, integers: 8-bit grey levels (arbitrary units)")
    return UnitsDecision(ARBITRARY, f"{_range(low, high)}: MR intensities have no physical scale")


def _ct_units(array: np.ndarray, low: float, high: float, eight_bit: bool) -> UnitsDecision:
    air = float(np.percentile(array, 1))
    if air <= HU_AIR_BELOW:
        return UnitsDecision(HU, f"{_range(low, high)}, 1st percentile {air:.0f}: air near -1000, Hounsfield units")
    if eight_bit:
        return UnitsDecision(DISPLAY, f"{_range(low, high)}, integers: a display-windowed 8-bit CT, not HU", warning=True)
    problem = f"{_range(low, high)} with no air near -1000 HU (1st percentile {air:.0f}): not read as HU"
    hint = "; if these are HU shifted by +1024, shift them back, or set its units in the manifest"
    return UnitsDecision(ARBITRARY, problem + hint, warning=True)


def _integer_valued(array: np.ndarray) -> bool:
    if array.dtype.kind in "iub":
        return True
    sample = array.ravel()[:: max(1, array.size // 200_000)]
    return bool(np.all(sample == np.round(sample)))


def _range(low: float, high: float) -> str:
    return f"values {low:.6g} to {high:.6g}"
