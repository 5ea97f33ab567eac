"""Fréchet distance between feature distributions (FID) of real and synthetic slices.

The feature network is one crossdiff defines: VGG16's convolutional part (torchvision's layer layout,
`crossdiff.losses.vgg16_features`) up to relu5_3, averaged over the image, 512 features per slice. Only
its weights come from the user, as a `.safetensors` file or a `torch.load(weights_only=True)` file
(e.g. torchvision's `vgg16-397923af.pth`): no file is ever unpickled into code, so a crafted weights
file cannot run anything (an exported `.pt2` program is refused outright: `torch.export.load` falls
back to a full unpickle). crossdiff downloads nothing, and an ImageNet network is a questionable judge
of CT anyway, so FID is labelled with the network and its weights, and is "not computed" without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg
from torch import nn

from crossdiff.errors import CrossdiffError, InputError
from crossdiff.losses import IMAGENET_MEAN, IMAGENET_STD, VGG16_LAYERS, load_vgg16_features

NOT_COMPUTED = "not computed: no VGG16 weights file was supplied (crossdiff downloads no network weights)"
FEATURE_LAYER = "relu5_3"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
BATCH = 32


@dataclass(frozen=True)
class FidResult:
    """`value` None when not computed, with `note` saying why (or which network and weights were used)."""

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


class SliceFeatures(nn.Module):
    """Grey [0, 1] slices (N, 1, H, W) -> (N, 512): repeated to RGB, ImageNet-normalised as VGG16 was
    trained, VGG16 features to relu5_3, mean over the image."""

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        rgb = (slices.expand(-1, 3, -1, -1) - self.mean) / self.std
        return self.features(rgb).mean(dim=(2, 3))


def load_feature_network(path: Path) -> SliceFeatures:
    """The FID network with the weights of `path` (InputError naming it when they cannot be used)."""
    if not path.name.lower().endswith(WEIGHT_SUFFIXES):
        raise InputError(path, f"is not a VGG16 weights file: give {', '.join(WEIGHT_SUFFIXES)} (an exported .pt2 "
                               "program is refused: loading one can run code)")
    return SliceFeatures(load_vgg16_features(path, VGG16_LAYERS[FEATURE_LAYER])).eval()


@torch.no_grad()
def extract_features(network: nn.Module, slices: np.ndarray) -> np.ndarray:
    """Features of (N, H, W) slices in [0, 1], in batches."""
    outputs = []
    for start in range(0, len(slices), BATCH):
        batch = torch.from_numpy(np.ascontiguousarray(slices[start : start + BATCH], dtype=np.float32))[:, None]
        outputs.append(network(batch).double().numpy())
    return np.concatenate(outputs)


def fid(real: np.ndarray, synthetic: np.ndarray, weights: Path | None) -> FidResult:
    """FID of (N, H, W) slices in [0, 1] with VGG16 weights from `weights`, or 'not computed' without them."""
    if weights is None:
        return FidResult(None, NOT_COMPUTED)
    network = load_feature_network(weights)
    real_stats = feature_statistics(extract_features(network, real))
    synthetic_stats = feature_statistics(extract_features(network, synthetic))
    note = f"VGG16 {FEATURE_LAYER} features averaged over each slice, weights {weights.name}"
    return FidResult(frechet_distance(*real_stats, *synthetic_stats), note)
