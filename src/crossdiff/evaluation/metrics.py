"""Synthetic-image metrics with the definitions the field compares against, so our numbers are
comparable with the SynthRAD challenges and the papers that report against them.

SynthRAD2023 (its public `image_metrics.py`), on HU volumes with a body mask:
- MAE = sum(|ct - sct| * mask) / sum(mask), not clipped; ME (bias) = mean(sct - ct) inside the mask;
- PSNR: both clipped to [-1024, 3000], masked voxels only, data range 4024;
- SSIM: both clipped, outside-mask voxels set to -1024, shifted by +1024, 3-D SSIM map with data range
  4024, averaged inside the mask.
SynthRAD2025 clips to [-1024, 3071] (data range 4095) and replaces SSIM by a masked 3-D MS-SSIM
(`crossdiff.evaluation.msssim`).

Targets without HU (MR, PET) are compared on a normalised [0, 1] scale: both images go through the
*reference's* 0.5-99.5 percentile window inside the mask, clipped to [0, 1] (data range 1, background 0).
One window for both keeps a global brightness error visible, which normalising each image by its own
maximum (SynDiff's practice) would hide. Display-windowed images (8-bit PNG exports, a windowed CT
among them) have a fixed meaning for 0 and 255, so they are normalised by that range instead; for a
windowed CT, "bone" is what the window clipped white (>= 250), the only bone such a file can show.

Planar cases (2-D slices stacked without a known distance, or any case thinner than the 7-voxel SSIM
window) get SSIM slice by slice in 2-D, reported as `ssim_2d` so it is never mistaken for the 3-D one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from crossdiff.errors import CrossdiffError
from crossdiff.evaluation.msssim import masked_ms_ssim
from crossdiff.units import DISPLAY, DISPLAY_BONE_FROM, DISPLAY_RANGE, HU

HU_RANGE = (-1024.0, 3000.0)
SSIM_WINDOW = 7  # scikit-image's default 7x7x7 window, as SynthRAD uses it
NORMALISED_RANGE = (0.0, 1.0)
NORMALISING_PERCENTILES = (0.5, 99.5)  # the window crossdiff's MR scaling uses (crossdiff.intensity)

# Tissue classes of the reference CT for per-class MAE. No single convention exists (published sCT
# studies put the bone threshold anywhere from 150 to 300 HU); these follow the physics:
# - air below -500 HU: halfway between air (-1000) and water (0), so partial-volume voxels at gas
#   pockets, sinuses and lung go to the side they are closer to; the same threshold as our CT body mask;
# - bone from 300 HU: above every non-enhanced soft tissue (fat -100, muscle and organs 10-80, blood
#   ~50) and above most contrast-enhanced vessels, and at the low end of cancellous bone (300-700);
# - soft tissue: everything in between.
AIR_BELOW_HU = -500.0
BONE_FROM_HU = 300.0
TISSUES = ("air", "soft_tissue", "bone")


@dataclass(frozen=True)
class Standard:
    """A published metric definition: the HU clip range and the structural-similarity variant."""

    name: str
    hu_range: tuple[float, float]
    structural: str  # "ssim" or "ms_ssim"


STANDARDS = {
    "synthrad2023": Standard("synthrad2023", HU_RANGE, "ssim"),
    "synthrad2025": Standard("synthrad2025", (-1024.0, 3071.0), "ms_ssim"),
}


@dataclass(frozen=True)
class Scale:
    """How a target is scored: in HU, or on [0, 1] through a fixed `window` (display grey levels) or,
    without one, the reference's percentile window; `bone_from` (reference units) gives a non-HU CT
    its bone class; `label` names the scale in every table."""

    hounsfield: bool = True
    window: tuple[float, float] | None = None
    bone_from: float | None = None
    label: str = "HU"


HU_SCALE = Scale()
PERCENTILE_SCALE = Scale(False, label="normalised [0, 1]")


def scale_for(modality: str | None, units: str | None) -> Scale:
    """The scale a target of this modality and these units is scored on (see the module docstring)."""
    if modality == "CT" and units in (None, HU):
        return HU_SCALE
    if units == DISPLAY:
        bone = DISPLAY_BONE_FROM if modality == "CT" else None
        return Scale(False, DISPLAY_RANGE, bone, "normalised [0, 1] (display grey levels / 255)")
    return PERCENTILE_SCALE


@dataclass(frozen=True)
class ImageMetrics:
    mae: float
    psnr: float
    ssim: float

    def as_dict(self) -> dict[str, float]:
        return {"mae": self.mae, "psnr": self.psnr, "ssim": self.ssim}


@dataclass(frozen=True)
class CaseMetrics:
    """One case's metrics: `values` by name (mae, me, psnr, ssim or ms_ssim, and for CT mae_air,
    mae_soft_tissue, mae_bone: NaN where the reference has no voxel of that class); `slices` the per-slice
    MAE, ME and PSNR along the first array axis (for tests over slices); `scale` 'HU' or 'normalised [0, 1]'."""

    values: dict[str, float]
    slices: list[dict[str, float]] = field(default_factory=list)
    scale: str = "HU"


def synthrad_metrics(reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray) -> ImageMetrics:
    """MAE (HU), PSNR (dB) and SSIM of `prediction` against `reference` inside `mask`, SynthRAD2023 style."""
    inside = _checked_mask(reference, prediction, mask)
    reference, prediction = reference.astype(np.float64), prediction.astype(np.float64)
    low, high = HU_RANGE
    ref_clipped, pred_clipped = np.clip(reference, low, high), np.clip(prediction, low, high)
    return ImageMetrics(
        float(np.abs(reference - prediction)[inside].mean()),
        _psnr(ref_clipped, pred_clipped, inside, high - low),
        _masked_ssim(ref_clipped, pred_clipped, inside, low, high),
    )


def case_metrics(
    reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray, standard: str = "synthrad2023", hounsfield: bool = True,
    scale: Scale | None = None, planar: bool = False,
) -> CaseMetrics:
    """All metrics of one case under `standard`, on `scale` (default: HU, or with `hounsfield=False` the
    reference-percentile [0, 1] scale). `planar` (or a case thinner than the SSIM window) scores SSIM per
    2-D slice as `ssim_2d`."""
    if standard not in STANDARDS:
        raise CrossdiffError(f"unknown metric standard {standard!r}; choose from {', '.join(STANDARDS)}")
    chosen = STANDARDS[standard]
    scale = scale or (HU_SCALE if hounsfield else PERCENTILE_SCALE)
    planar = planar or min(reference.shape) < SSIM_WINDOW
    inside = _checked_mask(reference, prediction, mask, planar)
    reference, prediction = reference.astype(np.float64), prediction.astype(np.float64)
    if scale.hounsfield:
        (low, high), raw_ref, raw_pred = chosen.hu_range, reference, prediction
    else:
        (low, high), raw_ref, raw_pred = NORMALISED_RANGE, *normalise_pair(reference, prediction, inside, scale.window)
    ref_clipped, pred_clipped = np.clip(raw_ref, low, high), np.clip(raw_pred, low, high)
    difference = raw_pred - raw_ref
    values = {
        "mae": float(np.abs(difference)[inside].mean()),
        "me": float(difference[inside].mean()),
        "psnr": _psnr(ref_clipped, pred_clipped, inside, high - low),
    }
    if planar:
        if chosen.structural != "ssim":
            raise CrossdiffError("masked MS-SSIM (synthrad2025) needs 3-D volumes; score 2-D slices with synthrad2023")
        values["ssim_2d"] = _masked_ssim_2d(ref_clipped, pred_clipped, inside, low, high)
    elif chosen.structural == "ssim":
        values["ssim"] = _masked_ssim(ref_clipped, pred_clipped, inside, low, high)
    else:
        values["ms_ssim"] = masked_ms_ssim(ref_clipped, pred_clipped, inside, low, high)
    if scale.hounsfield:
        values |= tissue_mae(raw_ref, raw_pred, inside)
    elif scale.bone_from is not None:
        values |= _class_mae(np.abs(difference), {"bone": reference >= scale.bone_from}, inside)
    slices = _slice_metrics(difference, ref_clipped, pred_clipped, inside, high - low)
    return CaseMetrics(values, slices, scale.label)


def normalise_pair(
    reference: np.ndarray, prediction: np.ndarray, inside: np.ndarray, window: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Both images through `window` (default: the reference's percentile window inside the mask), onto [0, 1] (clipped)."""
    low, high = window if window is not None else np.percentile(reference[inside], NORMALISING_PERCENTILES)
    if not high > low:
        raise CrossdiffError(f"the reference is constant ({low:g}) inside the mask: no intensity scale to normalise by")

    def scaled(image: np.ndarray) -> np.ndarray:
        return np.clip((image - low) / (high - low), 0.0, 1.0)

    return scaled(reference), scaled(prediction)


def tissue_mae(reference: np.ndarray, prediction: np.ndarray, inside: np.ndarray) -> dict[str, float]:
    """MAE inside the mask per tissue class of the reference (HU thresholds above); NaN for an absent class."""
    classes = {
        "air": reference < AIR_BELOW_HU,
        "soft_tissue": (reference >= AIR_BELOW_HU) & (reference < BONE_FROM_HU),
        "bone": reference >= BONE_FROM_HU,
    }
    return _class_mae(np.abs(prediction - reference), classes, inside)


def _class_mae(error: np.ndarray, classes: dict[str, np.ndarray], inside: np.ndarray) -> dict[str, float]:
    result = {}
    for name, region in classes.items():
        selected = region & inside
        result[f"mae_{name}"] = float(error[selected].mean()) if selected.any() else float("nan")
    return result


def _checked_mask(reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray, planar: bool = False) -> np.ndarray:
    if reference.shape != prediction.shape or reference.shape != mask.shape:
        raise CrossdiffError(f"shapes differ: reference {reference.shape}, prediction {prediction.shape}, mask {mask.shape}")
    needed = reference.shape[1:] if planar else reference.shape
    if min(needed) < SSIM_WINDOW:
        what = "in-plane" if planar else "along every axis"
        raise CrossdiffError(f"SSIM needs at least {SSIM_WINDOW} voxels {what}; the image is {reference.shape}")
    inside = mask.astype(bool)
    if not inside.any():
        raise CrossdiffError("the mask is empty: nothing to compare")
    return inside


def _psnr(reference: np.ndarray, prediction: np.ndarray, inside: np.ndarray, data_range: float) -> float:
    return float(peak_signal_noise_ratio(reference[inside], prediction[inside], data_range=data_range))


def _masked_ssim(reference: np.ndarray, prediction: np.ndarray, inside: np.ndarray, low: float, high: float) -> float:
    """SynthRAD's SSIM: background set to the range's floor, shifted to start at 0, 3-D map averaged inside."""
    ref_ssim = np.where(inside, reference, low) - low
    pred_ssim = np.where(inside, prediction, low) - low
    _, ssim_map = structural_similarity(ref_ssim, pred_ssim, data_range=high - low, full=True)
    return float(ssim_map[inside].mean())


def _masked_ssim_2d(reference: np.ndarray, prediction: np.ndarray, inside: np.ndarray, low: float, high: float) -> float:
    """SynthRAD's SSIM recipe on each 2-D slice; the 2-D maps are averaged over every mask pixel of all slices."""
    values, weights = [], []
    for ref, pred, region in zip(reference, prediction, inside):
        if region.any():
            values.append(_masked_ssim(ref, pred, region, low, high))
            weights.append(int(region.sum()))
    return float(np.average(values, weights=weights))


def _slice_metrics(
    difference: np.ndarray, ref_clipped: np.ndarray, pred_clipped: np.ndarray, inside: np.ndarray, data_range: float
) -> list[dict[str, float]]:
    """MAE, ME and PSNR of every slice (first axis) that holds mask voxels."""
    rows = []
    for index in np.flatnonzero(inside.any(axis=(1, 2))):
        region = inside[index]
        squared = float(np.mean((ref_clipped[index][region] - pred_clipped[index][region]) ** 2))
        rows.append({
            "slice": int(index),
            "voxels": int(region.sum()),
            "mae": float(np.abs(difference[index][region]).mean()),
            "me": float(difference[index][region].mean()),
            "psnr": float(10 * np.log10(data_range**2 / squared)) if squared > 0 else float("inf"),
        })
    return rows
