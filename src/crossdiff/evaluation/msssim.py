"""Masked 3-D multi-scale SSIM as the SynthRAD2025 evaluation computes it (its `image_metrics.py`).

Why our own code: scikit-image has no MS-SSIM, and MONAI's `MultiScaleSSIMMetric` averages over the
whole image (no mask) and needs every axis longer than (kernel - 1) x 2^(scales - 1) = 160 voxels with
its default 11-voxel kernel, while a pelvis or sarcoma CT has 40-60 slices.

How the masking is done (following SynthRAD2025, so values are comparable with the challenge):
1. both images are clipped to the HU range, voxels outside the mask set to its floor, shifted to start at 0;
2. every axis shorter than 97 voxels is padded to 97 by repeating the edge (images and mask), so that
   five scales fit;
3. at each of the five scales the SSIM components are computed with a 7-voxel uniform window
   (sample covariance, K1 = 0.01, K2 = 0.03), each clipped at 0: luminance l, contrast c and
   structure s = (cov + C3) / (sigma_x sigma_y + C3); the map l^w c^w s^w (w the scale's weight
   0.0448, 0.2856, 0.3001, 0.2363, 0.1333) is averaged over the mask voxels at least 3 voxels from
   the border, and that mean clipped to [0, 1];
4. between scales the images are averaged over 2x2x2 blocks (the first block of each axis sees one
   zero beyond the edge, as SynthRAD's 'same'-mode convolution does) and the mask is subsampled;
5. the result is the product of the five masked means.
Step 3 applies the luminance term at every scale: that is what the challenge code computes (its
luminance-only-at-the-coarsest-scale weights of Wang et al. 2003, Eq. 7, are overridden in it).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter

from crossdiff.errors import CrossdiffError

SCALE_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MIN_SIZE = 97  # SynthRAD2025 pads every axis to this many voxels
WINDOW = 7
BORDER = (WINDOW - 1) // 2
K1, K2 = 0.01, 0.03


def masked_ms_ssim(reference: np.ndarray, prediction: np.ndarray, inside: np.ndarray, low: float, high: float) -> float:
    """MS-SSIM of two images already clipped to [low, high], inside the boolean mask `inside`."""
    images = [np.where(inside, image, low).astype(np.float64) - low for image in (reference, prediction)]
    mask = inside.astype(np.float64)
    padding = [((MIN_SIZE - n) // 2, MIN_SIZE - n - (MIN_SIZE - n) // 2) if n < MIN_SIZE else (0, 0) for n in mask.shape]
    ref, pred, mask = (np.pad(array, padding, mode="edge") for array in (*images, mask))
    result = 1.0
    for level, weight in enumerate(SCALE_WEIGHTS):
        weighted = _weighted_ssim_map(ref, pred, high - low, weight)
        region = _crop(mask) > 0
        if not region.any():
            raise CrossdiffError(f"the mask is too small for MS-SSIM: nothing of it is left at scale {level + 1}")
        result *= float(np.clip(_crop(weighted)[region].mean(), 0.0, 1.0))
        ref, pred, mask = _halve(ref), _halve(pred), mask[::2, ::2, ::2]
    return result


def _weighted_ssim_map(x: np.ndarray, y: np.ndarray, data_range: float, weight: float) -> np.ndarray:
    """l^w c^w s^w per voxel, each component clipped at 0."""
    def mean(image: np.ndarray) -> np.ndarray:
        return uniform_filter(image, size=WINDOW)

    covariance_norm = WINDOW**3 / (WINDOW**3 - 1)
    mx, my = mean(x), mean(y)
    vx = covariance_norm * (mean(x * x) - mx * mx)
    vy = covariance_norm * (mean(y * y) - my * my)
    vxy = covariance_norm * (mean(x * y) - mx * my)
    sx, sy = np.sqrt(np.clip(vx, 0.0, None)), np.sqrt(np.clip(vy, 0.0, None))
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    c3 = c2 / 2
    luminance = np.clip((2 * mx * my + c1) / (mx * mx + my * my + c1), 0.0, None)
    contrast = np.clip((2 * sx * sy + c2) / (vx + vy + c2), 0.0, None)
    structure = np.clip((vxy + c3) / (sx * sy + c3), 0.0, None)
    return luminance**weight * contrast**weight * structure**weight


def _crop(array: np.ndarray) -> np.ndarray:
    return array[BORDER:-BORDER, BORDER:-BORDER, BORDER:-BORDER]


def _halve(image: np.ndarray) -> np.ndarray:
    """Mean of 2x2x2 blocks starting one voxel before the array (that voxel counts as 0), every second block."""
    padded = np.pad(image, [(1, 0)] * 3)
    size = [(n + 1) // 2 for n in image.shape]
    total = np.zeros(size)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                total += padded[dz::2, dy::2, dx::2][: size[0], : size[1], : size[2]]
    return total / 8.0
