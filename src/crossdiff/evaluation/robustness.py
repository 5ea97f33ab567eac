"""Noise robustness: how much worse a translation gets when its source image is noisier.

Following SynDiff's robustness experiment, zero-mean Gaussian noise with a standard deviation of
3% to 21% of the source's mean intensity is added to the source; the translation of each noisy copy
is scored against the same reference. The mean is taken inside the body mask when one is given (the
patient, not the surrounding air, sets the intensity scale), else over the whole image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from crossdiff.errors import CrossdiffError
from crossdiff.evaluation.statistics import higher_is_better
from crossdiff.volumes import Volume

NOISE_LEVELS = (0.03, 0.06, 0.09, 0.12, 0.15, 0.18, 0.21)

Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, float]]  # (reference, prediction, mask) -> metrics


def add_noise(source: Volume, level: float, seed: int, mask: np.ndarray | None = None) -> Volume:
    """`source` plus N(0, (level x mean intensity)^2) noise; the same seed gives the same noise."""
    values = source.array[mask.astype(bool)] if mask is not None else source.array
    sigma = level * float(np.mean(values, dtype=np.float64))
    if sigma < 0:
        raise CrossdiffError(f"the source's mean intensity is negative ({sigma / level:g}); noise relative to it is undefined")
    noise = np.random.default_rng(seed).normal(0.0, sigma, source.shape)
    return source.with_array((source.array + noise).astype(np.float32))


@dataclass(frozen=True)
class NoiseResult:
    """Scores at one noise level; `drop` is the degradation from the clean score for each metric with a
    better side (positive = worse: lower PSNR/SSIM, higher MAE)."""

    level: float
    sigma: float
    scores: dict[str, float]
    drop: dict[str, float]


def noise_robustness(
    translate: Callable[[Volume], Volume],
    source: Volume,
    reference: np.ndarray,
    mask: np.ndarray,
    score: Scorer,
    levels: Sequence[float] = NOISE_LEVELS,
    seed: int = 0,
) -> list[NoiseResult]:
    """Score the translation of the clean source (level 0, first row) and of one noisy copy per level.

    Level i uses seed `seed + i`, so every method sees the same noisy sources when given the same seed."""
    clean = score(reference, translate(source).array, mask)
    tissue_mean = float(np.mean(source.array[mask.astype(bool)], dtype=np.float64))
    results = [NoiseResult(0.0, 0.0, clean, dict.fromkeys(_directed(clean), 0.0))]
    for index, level in enumerate(levels, start=1):
        noisy = add_noise(source, level, seed + index, mask)
        scores = score(reference, translate(noisy).array, mask)
        results.append(NoiseResult(level, level * tissue_mean, scores, _drop(clean, scores)))
    return results


def _directed(scores: dict[str, float]) -> list[str]:
    return [metric for metric in scores if higher_is_better(metric) is not None]


def _drop(clean: dict[str, float], noisy: dict[str, float]) -> dict[str, float]:
    return {m: (clean[m] - noisy[m]) if higher_is_better(m) else (noisy[m] - clean[m]) for m in _directed(clean)}
