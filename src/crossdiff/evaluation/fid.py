"""Fréchet distance between feature distributions (FID) of real and synthetic slices, computed only
with a feature extractor the user supplies: crossdiff downloads nothing, and an Inception network
trained on photographs is a questionable judge of CT anyway, so the choice of network stays visible.

The extractor is a `.pt2` file written by `torch.export.save` (TorchScript is deprecated in torch
2.13), exported with a dynamic batch dimension: it receives float slices (N, 1, H, W) scaled to [0, 1]
and returns features (N, D). Load only files you trust.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from crossdiff.errors import CrossdiffError, InputError, error_summary

NOT_COMPUTED = "not computed: no feature extractor was supplied (crossdiff downloads no network weights)"
BATCH = 32


@dataclass(frozen=True)
class FidResult:
    """`value` None when not computed, with `note` saying why (or which extractor was used)."""

    value: float | None
    note: str


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between two Gaussians."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: shift both a little, as the reference FID code does
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    difference = mu1 - mu2
    return float(difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample covariance of (N, D) features."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise CrossdiffError(f"FID needs at least two feature vectors (N, D); got shape {features.shape}")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


def load_extractor(path: Path) -> torch.nn.Module:
    if not path.name.lower().endswith(".pt2"):
        raise InputError(path, "is not a feature extractor: give a .pt2 file written by torch.export.save")
    try:
        return torch.export.load(str(path)).module()
    except Exception as error:  # torch raises zip, runtime and deserialisation errors of many kinds
        raise InputError(path, f"could not be loaded as an exported network ({error_summary(error)})") from None


@torch.no_grad()
def extract_features(extractor: torch.nn.Module, slices: np.ndarray, path: Path) -> np.ndarray:
    """Features of (N, H, W) slices in [0, 1], in batches."""
    outputs = []
    for start in range(0, len(slices), BATCH):
        batch = torch.from_numpy(np.ascontiguousarray(slices[start : start + BATCH], dtype=np.float32))[:, None]
        try:
            features = extractor(batch)
        except Exception as error:  # e.g. an export with a fixed batch size or another slice size
            problem = f"the extractor failed on slices of shape {tuple(batch.shape)} ({error_summary(error)})"
            raise InputError(path, problem) from None
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != batch.shape[0]:
            raise InputError(path, "the extractor must return one feature vector per slice, shape (N, D)")
        outputs.append(features.double().numpy())
    return np.concatenate(outputs)


def fid(real: np.ndarray, synthetic: np.ndarray, extractor: Path | None) -> FidResult:
    """FID of (N, H, W) slices in [0, 1], or a 'not computed' result without an extractor."""
    if extractor is None:
        return FidResult(None, NOT_COMPUTED)
    if not extractor.is_file():
        raise InputError(extractor, "does not exist")
    network = load_extractor(extractor)
    real_stats = feature_statistics(extract_features(network, real, extractor))
    synthetic_stats = feature_statistics(extract_features(network, synthetic, extractor))
    return FidResult(frechet_distance(*real_stats, *synthetic_stats), f"features from {extractor.name}")
