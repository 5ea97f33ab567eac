"""How much a stochastic method's samples vary, and whether that spread says where its errors are.

An uncertainty map is only useful if large predicted spread goes with large error. Three views:
the spread of each metric over N samples (how much one draw can be trusted), the Spearman rank
correlation of per-voxel std and absolute error inside the mask (does the ordering agree; rank-based
because both are heavy-tailed), and a calibration table: voxels binned by predicted std, with the
observed error per bin (a calibrated Gaussian predictor has RMS error = RMS std in every bin).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from crossdiff.errors import CrossdiffError

CALIBRATION_BINS = 10


def sample_spread(
    samples: Sequence[np.ndarray],
    reference: np.ndarray,
    mask: np.ndarray,
    score: Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, float]],
) -> dict[str, tuple[float, float]]:
    """{metric: (mean, sample SD)} of `score` over the individual samples (at least two)."""
    if len(samples) < 2:
        raise CrossdiffError("the spread of a metric needs at least two samples")
    scores = [score(reference, sample, mask) for sample in samples]
    return {m: (float(np.mean([s[m] for s in scores])), float(np.std([s[m] for s in scores], ddof=1))) for m in scores[0]}


@dataclass(frozen=True)
class Correlation:
    rho: float
    p_value: float
    voxels: int


def uncertainty_error_correlation(std: np.ndarray, error: np.ndarray, mask: np.ndarray) -> Correlation:
    """Spearman correlation of predicted std and |error| over the mask voxels."""
    inside = _inside(std, error, mask)
    result = stats.spearmanr(std[inside], np.abs(error[inside]))
    return Correlation(float(result.statistic), float(result.pvalue), int(inside.sum()))


@dataclass(frozen=True)
class CalibrationBin:
    std_low: float
    std_high: float
    rms_std: float
    rms_error: float
    mean_abs_error: float
    voxels: int


def calibration_table(std: np.ndarray, error: np.ndarray, mask: np.ndarray, bins: int = CALIBRATION_BINS) -> list[CalibrationBin]:
    """Mask voxels in `bins` equal-count bins of predicted std (ties may merge bins), with RMS predicted std,
    RMS error and mean |error| per bin; `error` is prediction minus reference."""
    inside = _inside(std, error, mask)
    spread, err = std[inside].astype(np.float64), error[inside].astype(np.float64)
    edges = np.unique(np.quantile(spread, np.linspace(0.0, 1.0, bins + 1)))
    which = np.clip(np.searchsorted(edges, spread, side="right") - 1, 0, max(len(edges) - 2, 0))
    table = []
    for index in range(max(len(edges) - 1, 1)):
        chosen = which == index
        if not chosen.any():
            continue
        table.append(CalibrationBin(
            float(spread[chosen].min()), float(spread[chosen].max()),
            float(np.sqrt(np.mean(spread[chosen] ** 2))), float(np.sqrt(np.mean(err[chosen] ** 2))),
            float(np.mean(np.abs(err[chosen]))), int(chosen.sum()),
        ))
    return table


def _inside(std: np.ndarray, error: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if std.shape != error.shape or std.shape != mask.shape:
        raise CrossdiffError(f"shapes differ: std {std.shape}, error {error.shape}, mask {mask.shape}")
    inside = mask.astype(bool)
    if inside.sum() < 3:
        raise CrossdiffError("the mask holds fewer than three voxels: nothing to correlate")
    return inside
