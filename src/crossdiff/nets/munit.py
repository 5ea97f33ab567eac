"""MUNIT's per-domain networks (Huang, Liu, Belongie & Kautz 2018, "Multimodal unsupervised image-to-image
translation"): an image is a content code shared by the domains and a style code of its own domain.

- Content encoder: CycleGAN's stem and stride-2 convolutions, then residual blocks, all with instance
  norm (which removes each image's own statistics, i.e. much of its style): a spatial map.
- Style encoder: stem and stride-2 convolutions without normalisation, global average pooling and a
  1x1 convolution: a vector of `style_dim` numbers.
- Decoder: residual blocks whose normalisation is adaptive instance norm (AdaIN), with per-channel
  scales and shifts computed from the style code by an MLP; then the transposed convolutions with layer
  norm (instance norm there would wash the style out again) and a tanh output.

Differences from MUNIT's code, for size and reuse: 3x3 stride-2 convolutions and transposed convolutions
(CycleGAN's, `nets.gan`) instead of 4x4 convolutions and nearest upsampling with 5x5 convolutions; the
style encoder doubles its filters at every stride; AdaIN applies (1 + scale), so a fresh MLP starts near
plain instance norm. Each network is its own module, called through its forward (DDP-safe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from crossdiff.errors import CrossdiffError
from crossdiff.nets.gan import ResidualBlock, downsampling_layers, upsampling_layers


def check_munit_settings(filters: int, downsamplings: int, blocks: int, style_dim: int, style_downsamplings: int,
                         mlp_dim: int) -> None:
    if min(filters, blocks, style_dim, mlp_dim) < 1 or downsamplings < 0 or style_downsamplings < 0:
        raise CrossdiffError(f"munit needs filters, blocks, style_dim and mlp_dim >= 1 and downsamplings >= 0 (got "
                             f"{filters}, {blocks}, {style_dim}, {mlp_dim}, {downsamplings}, {style_downsamplings})")


def content_encoder(channels: int, filters: int, downsamplings: int, blocks: int) -> nn.Sequential:
    layers, width = downsampling_layers(channels, filters, downsamplings, "instance")
    return nn.Sequential(*layers, *(ResidualBlock(width, "instance", 0.0, True) for _ in range(blocks)))


class StyleEncoder(nn.Module):
    """Image (B, C, H, W) -> style code (B, style_dim)."""

    def __init__(self, channels: int, filters: int, downsamplings: int, style_dim: int) -> None:
        super().__init__()
        layers, width = downsampling_layers(channels, filters, downsamplings, None)
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, style_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten(1)


def adaptive_instance_norm(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Instance-normalise each channel, then apply the style's per-channel (1 + scale) and shift, (B, C, 1, 1)."""
    return F.instance_norm(x) * (1.0 + scale) + shift


class AdaINResidualBlock(nn.Module):
    """Two reflection-padded 3x3 convolutions, each followed by AdaIN (ReLU between), added to the input.
    It takes 4 x channels style parameters: scale and shift of both normalisations."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3))
        self.conv2 = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3))

    def forward(self, x: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        scale1, shift1, scale2, shift2 = parameters[:, :, None, None].chunk(4, dim=1)
        h = F.relu(adaptive_instance_norm(self.conv1(x), scale1, shift1))
        return x + adaptive_instance_norm(self.conv2(h), scale2, shift2)


class AdaINDecoder(nn.Module):
    """(content, style) -> image in [-1, 1]: the style MLP sets every AdaIN of the residual blocks."""

    def __init__(self, channels: int, filters: int, downsamplings: int, blocks: int, style_dim: int, mlp_dim: int) -> None:
        super().__init__()
        width = filters * 2**downsamplings
        self.mlp = nn.Sequential(nn.Linear(style_dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, mlp_dim), nn.ReLU(),
                                 nn.Linear(mlp_dim, 4 * width * blocks))
        self.blocks = nn.ModuleList(AdaINResidualBlock(width) for _ in range(blocks))
        self.out = nn.Sequential(*upsampling_layers(width, channels, downsamplings, "layer"))

    def forward(self, content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        h = content
        for block, parameters in zip(self.blocks, self.mlp(style).chunk(len(self.blocks), dim=1), strict=True):
            h = block(h, parameters)
        return self.out(h)
