"""Synthetic-CT metrics with the SynthRAD2023 definitions (its public `image_metrics.py`), so our
numbers are comparable with the challenge's and the papers that report against it.

All three work on HU volumes with a body mask:
- MAE = sum(|ct - sct| * mask) / sum(mask), not clipped;
- PSNR: both clipped to [-1024, 3000], masked voxels only, data range 4024;
- SSIM: both clipped, outside-mask voxels set to -1024, shifted by +1024, 3-D SSIM map with data range
  4024, averaged inside the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from crossdiff.errors import CrossdiffError

HU_RANGE = (-1024.0, 3000.0)
SSIM_WINDOW = 7  # scikit-image's default 7x7x7 window, as SynthRAD uses it


@dataclass(frozen=True)
class ImageMetrics:
    mae: float
    psnr: float
    ssim: float

    def as_dict(self) -> dict[str, float]:
        return {"mae": self.mae, "psnr": self.psnr, "ssim": self.ssim}


def synthrad_metrics(reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray) -> ImageMetrics:
    """MAE (HU), PSNR (dB) and SSIM of `prediction` against `reference` inside `mask`, SynthRAD2023 style."""
    if reference.shape != prediction.shape or reference.shape != mask.shape:
        raise CrossdiffError(f"shapes differ: reference {reference.shape}, prediction {prediction.shape}, mask {mask.shape}")
    if min(reference.shape) < SSIM_WINDOW:
        raise CrossdiffError(f"SSIM needs at least {SSIM_WINDOW} voxels along every axis; the volume is {reference.shape}")
    inside = mask.astype(bool)
    if not inside.any():
        raise CrossdiffError("the mask is empty: nothing to compare")
    low, high = HU_RANGE
    data_range = high - low
    reference = reference.astype(np.float64)
    prediction = prediction.astype(np.float64)
    mae = float(np.abs(reference - prediction)[inside].mean())
    ref_clipped, pred_clipped = np.clip(reference, low, high), np.clip(prediction, low, high)
    psnr = float(peak_signal_noise_ratio(ref_clipped[inside], pred_clipped[inside], data_range=data_range))
    ref_ssim = np.where(inside, ref_clipped, low) - low
    pred_ssim = np.where(inside, pred_clipped, low) - low
    _, ssim_map = structural_similarity(ref_ssim, pred_ssim, data_range=data_range, full=True)
    return ImageMetrics(mae, psnr, float(ssim_map[inside].mean()))
