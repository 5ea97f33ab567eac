"""SynDiff's networks (Ozbey et al., IEEE TMI 2023), small and size-agnostic for the CPU.

The generator G(x_t, y, t, z) predicts the clean target x0 from the noisy target x_t and the source
y (concatenated as channels). The step t enters every block as a per-channel bias (sinusoidal
embedding -> MLP -> linear per block, as in DDPM); the latent z enters every block as a simpler
stand-in for SynDiff's adaptive group norm: a mapping MLP turns z into a style vector, and each
block's linear layer turns that into a per-channel scale and shift of its features (without the
normalisation, see ModulatedBlock). No NCSN++ blocks, attention or JIT-compiled CUDA ops; skips are
resized to match, so any slice size works.

The discriminator D(x_{t-k}, x_t, t) judges a whole (earlier, later) pair of noisy images with the
same per-channel time bias and returns one logit per pair, as SynDiff's time-conditioned critic does;
with `patch=True` it is deeper (residual down blocks, as SynDiff's large discriminator) and returns a
map of patch logits, so it judges local texture rather than one global average.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets.diffusion_model_unet import get_timestep_embedding
from torch import nn

from crossdiff.errors import CrossdiffError


class TimeEmbedding(nn.Module):
    """Step index t (B,) -> (B, width): sinusoidal features through a two-layer MLP."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(get_timestep_embedding(t.float(), self.width))


class ModulatedBlock(nn.Module):
    """Residual block: conv, + time bias, per-channel scale and shift from the style, conv. No
    normalisation: like instance norm, GroupNorm divides out each slice's own intensity level, which a
    regression to absolute HU needs (held-out sarcoma MAE 133 HU with it, 106 without)."""

    def __init__(self, in_channels: int, out_channels: int, embedding: int, style: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time = nn.Linear(embedding, out_channels)
        self.style = nn.Linear(style, 2 * out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(x)) + self.time(time)[:, :, None, None]
        scale, shift = self.style(style)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(h * (1.0 + scale) + shift))
        return self.skip(x) + h


def _check_widths(name: str, widths: Sequence[int]) -> list[int]:
    widths = [int(w) for w in widths]
    if not widths or min(widths) < 1:
        raise CrossdiffError(f"syndiff {name} must be a non-empty list of positive widths, not {list(widths)}")
    return widths


class SynDiffGenerator(nn.Module):
    """A small UNet: one modulated block per level (stride-2 convolutions down, nearest upsampling
    back with skip concatenation), a tanh output so x0 estimates lie in [-1, 1]."""

    def __init__(self, target_channels: int, source_channels: int, channels: Sequence[int] = (32, 64, 128),
                 latent: int = 32, embedding: int = 64) -> None:
        super().__init__()
        widths = _check_widths("channels", channels)
        self.latent = int(latent)
        self.time = TimeEmbedding(embedding)
        self.mapping = nn.Sequential(nn.Linear(latent, latent), nn.SiLU(), nn.Linear(latent, latent))
        self.stem = nn.Conv2d(target_channels + source_channels, widths[0], 3, padding=1)
        self.encoder = nn.ModuleList(
            ModulatedBlock(a, b, embedding, latent) for a, b in zip([widths[0], *widths[:-1]], widths, strict=True))
        self.down = nn.ModuleList(nn.Conv2d(w, w, 3, stride=2, padding=1) for w in widths[:-1])
        self.middle = ModulatedBlock(widths[-1], widths[-1], embedding, latent)
        self.decoder = nn.ModuleList(
            ModulatedBlock(widths[i + 1] + widths[i], widths[i], embedding, latent) for i in reversed(range(len(widths) - 1)))
        self.out = nn.Conv2d(widths[0], target_channels, 3, padding=1)

    def forward(self, x_t: torch.Tensor, source: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        time, style = self.time(t), self.mapping(z)
        h = self.stem(torch.cat([x_t, source], dim=1))
        skips = []
        for level, block in enumerate(self.encoder):
            h = block(h, time, style)
            if level < len(self.down):
                skips.append(h)
                h = self.down[level](h)
        h = self.middle(h, time, style)
        for block, skip in zip(self.decoder, reversed(skips), strict=True):
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")
            h = block(torch.cat([h, skip], dim=1), time, style)
        return torch.tanh(self.out(F.silu(h)))


class TimeDiscriminator(nn.Module):
    """Stride-2 convolutions with a per-channel time bias and leaky ReLUs, averaged over the image
    into one logit per (x_{t-k}, x_t) pair; or (`patch`) residual down blocks, two convolutions each
    with the time bias between them, ending in a 1x1 convolution: one logit per patch."""

    def __init__(self, channels: int, filters: Sequence[int] = (32, 64, 128), embedding: int = 64,
                 patch: bool = False) -> None:
        super().__init__()
        widths = _check_widths("discriminator_channels", filters)
        self.patch = patch
        self.time = TimeEmbedding(embedding)
        self.stem = nn.Conv2d(2 * channels, widths[0], 3, padding=1)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(widths, widths[1:]))
        self.biases = nn.ModuleList(nn.Linear(embedding, b) for b in widths[1:])
        if patch:
            self.refine = nn.ModuleList(nn.Conv2d(b, b, 3, padding=1) for b in widths[1:])
            self.skips = nn.ModuleList(nn.Conv2d(a, b, 1) for a, b in zip(widths, widths[1:]))
            self.head: nn.Module = nn.Conv2d(widths[-1], 1, 1)
        else:
            self.head = nn.Linear(widths[-1], 1)

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        time = self.time(t)
        h = F.leaky_relu(self.stem(torch.cat([x_prev, x_t], dim=1)), 0.2)
        for level, (conv, bias) in enumerate(zip(self.convs, self.biases, strict=True)):
            down = F.leaky_relu(conv(h) + bias(time)[:, :, None, None], 0.2)
            if self.patch:
                shortcut = self.skips[level](F.avg_pool2d(h, 2, ceil_mode=True))[..., : down.shape[-2], : down.shape[-1]]
                down = (shortcut + F.leaky_relu(self.refine[level](down), 0.2)) / 2**0.5
            h = down
        return self.head(h) if self.patch else self.head(h.mean(dim=(2, 3)))
