"""Image losses the regression and GAN baselines share: a reconstruction loss (L1, optionally inside a
mask, plus SSIM and a perceptual term) and the adversarial losses.

The perceptual term compares VGG16 features (Johnson et al. 2016) computed by a network defined here
with torchvision's layer indices, so torchvision's own `vgg16` weights file loads as it is (its keys
are `features.N.weight`/`features.N.bias`). Nothing is downloaded: the user names the weights file
(`perceptual_weights`, `.safetensors` or a `torch.load(weights_only=True)` file such as
torchvision's `vgg16-397923af.pth`), and only training reads it, so a trained model translates without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import SSIMLoss
from safetensors.torch import load_file
from torch import nn

from crossdiff.errors import CrossdiffError, InputError, error_summary

# torchvision's vgg16 `features`: numbers are 3x3 convolutions (each followed by a ReLU), "M" max pooling
VGG16_FEATURES = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG16_LAYERS = {"relu1_2": 3, "relu2_2": 8, "relu3_3": 15, "relu4_3": 22, "relu5_3": 29}  # index in `features`
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GAN_LOSSES = ("vanilla", "lsgan")

# The method settings every baseline accepts for its reconstruction loss; the weights are relative to L1.
RECONSTRUCTION_DEFAULTS: dict[str, Any] = {
    "ssim_weight": 0.0,
    "perceptual_weights": None,  # a VGG16 weights file switches the perceptual term on
    "perceptual_weight": 0.1,
    "perceptual_layers": ["relu1_2", "relu2_2", "relu3_3"],
}


def vgg16_features(depth: int) -> nn.Sequential:
    """torchvision's `vgg16().features` up to index `depth` (inclusive), with the same indices and so the same keys."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_FEATURES:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU()]
            channels = int(item)
    return nn.Sequential(*layers[: depth + 1])


def load_vgg16_features(path: str | Path, depth: int) -> nn.Sequential:
    """The VGG16 feature layers up to `depth`, frozen, with weights from the user's file.

    Keys may carry torchvision's `features.` prefix or not; layers beyond `depth` (and a classifier) are
    ignored. A missing, unreadable or differently shaped file is an InputError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "perceptual-loss weights file does not exist (perceptual_weights: a VGG16 weights file)")
    try:
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # both loaders raise many kinds on a damaged file; neither runs code from it
        raise InputError(path, f"cannot read the perceptual-loss weights ({error_summary(error)})") from None
    if not isinstance(tensors, dict):
        raise InputError(path, f"perceptual-loss weights must be a state dict of tensors, not {type(tensors).__name__}")
    features = vgg16_features(depth)
    found = {key.removeprefix("features."): value for key, value in tensors.items() if isinstance(value, torch.Tensor)}
    wanted = features.state_dict()
    missing = [f"features.{key}" for key in wanted if key not in found]
    if missing:
        raise InputError(path, f"not VGG16 `features` weights (torchvision layout): missing {', '.join(missing[:4])}"
                               + (f" and {len(missing) - 4} more" if len(missing) > 4 else ""))
    for key, value in wanted.items():
        if found[key].shape != value.shape:
            raise InputError(path, f"not VGG16 `features` weights: features.{key} has shape {tuple(found[key].shape)}, "
                                   f"VGG16 needs {tuple(value.shape)}")
    features.load_state_dict({key: found[key].float() for key in wanted})
    return features.eval().requires_grad_(False)


class PerceptualLoss(nn.Module):
    """Mean L1 distance of VGG16 activations at the chosen layers. Grey-scale [-1, 1] slices become
    [0, 1], are repeated to three channels and ImageNet-normalised, as the network was trained; every
    channel of a multi-channel input counts as its own grey image."""

    def __init__(self, features: nn.Sequential, taps: Sequence[int]) -> None:
        super().__init__()
        self.features = features
        self.taps = set(taps)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_file(cls, path: str | Path, layers: Sequence[str]) -> PerceptualLoss:
        unknown = [name for name in layers if name not in VGG16_LAYERS]
        if unknown or not layers:
            raise CrossdiffError(f"perceptual_layers must be some of {', '.join(VGG16_LAYERS)}, not {list(layers)}")
        taps = [VGG16_LAYERS[name] for name in layers]
        return cls(load_vgg16_features(path, max(taps)), taps)

    def _rgb(self, images: torch.Tensor) -> torch.Tensor:
        grey = (images.reshape(-1, 1, *images.shape[-2:]) + 1.0) / 2.0
        return (grey.expand(-1, 3, -1, -1) - self.mean) / self.std

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self._rgb(prediction), self._rgb(target)])
        total = x.new_zeros(())
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                ours, theirs = x.chunk(2)
                total = total + (ours - theirs).abs().mean()
        return total / len(self.taps)


class ReconstructionLoss(nn.Module):
    """L1 over the slice (or weighted by a mask) plus `ssim_weight` x SSIM loss plus `perceptual_weight`
    x perceptual loss: what a paired baseline learns from, and what CycleGAN's cycle term compares."""

    def __init__(self, ssim_weight: float = 0.0, perceptual: PerceptualLoss | None = None, perceptual_weight: float = 0.0):
        super().__init__()
        self.ssim_weight, self.perceptual_weight = float(ssim_weight), float(perceptual_weight)
        self.ssim = SSIMLoss(spatial_dims=2, data_range=2.0) if self.ssim_weight > 0 else None
        self.perceptual = perceptual

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ReconstructionLoss:
        """From the RECONSTRUCTION_DEFAULTS settings; reads the perceptual weights file when one is named."""
        perceptual = None
        if config["perceptual_weights"] is not None:
            if float(config["perceptual_weight"]) <= 0:
                raise CrossdiffError("perceptual_weight must be > 0 when perceptual_weights names a file")
            perceptual = PerceptualLoss.from_file(config["perceptual_weights"], config["perceptual_layers"])
        return cls(float(config["ssim_weight"]), perceptual, float(config["perceptual_weight"]))

    def forward(
        self, prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total and its terms (for the log)."""
        error = (prediction - target).abs()
        terms = {"l1": error.mean() if weight is None else (error * weight).sum() / weight.sum().clamp_min(1.0)}
        total = terms["l1"]
        if self.ssim is not None:  # in fp32 even under autocast: in bf16 E[x^2] - E[x]^2 cancels to NaN
            with torch.autocast(prediction.device.type, enabled=False):
                terms["ssim"] = self.ssim(prediction.float(), target.float())
            total = total + self.ssim_weight * terms["ssim"]
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(prediction, target)
            total = total + self.perceptual_weight * terms["perceptual"]
        return total, terms


def adversarial_loss(logits: torch.Tensor, real: bool, kind: str) -> torch.Tensor:
    """How far discriminator outputs are from saying 'real' (or 'fake'): 'vanilla' is the cross-entropy of
    the original GAN and pix2pix, 'lsgan' the least-squares loss CycleGAN trains with."""
    logits = logits.float()
    target = torch.full_like(logits, 1.0 if real else 0.0)
    if kind == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


def critic_loss(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """Half the sum of a critic's losses on real and (detached) generated images, judged in one call
    (one forward per backward, as DDP wants): what the CycleGAN family's discriminators learn from."""
    on_real, on_fake = critic(torch.cat([real, fake.detach()])).chunk(2)
    return 0.5 * (adversarial_loss(on_real, True, kind) + adversarial_loss(on_fake, False, kind))


def check_gan_loss(kind: str) -> str:
    if kind not in GAN_LOSSES:
        raise CrossdiffError(f"gan_loss must be one of {', '.join(GAN_LOSSES)}, not {kind!r}")
    return kind
