"""nnU-Net's intensity augmentations of the network input, batch-wise on the training device.

nnU-Net v2 (`nnUNetTrainer.get_training_transforms`, batchgenerators) perturbs the image, never the
label, with: Gaussian noise (p 0.1, variance U(0, 0.1) of the unit-variance image), Gaussian blur
(p 0.2, sigma U(0.5, 1) pixels), multiplicative brightness (p 0.15, x U(0.75, 1.25)), contrast (p 0.15,
x U(0.75, 1.25) about the mean, range kept), simulated low resolution (p 0.25, nearest down to
U(0.5, 1) of the size, cubic back up) and gamma (p 0.1 on the inverted image, p 0.3 on the image,
gamma U(0.7, 1.5), mean and spread kept). The same are here, with these probabilities and ranges.

Written here rather than taken from MONAI's Rand* transforms because every random number must come from
the training loop's per-step generator (so a resumed run repeats exactly) and a whole batch is
perturbed at once on the device; MONAI's transforms draw from their own NumPy state, one image at a
time. Images are on crossdiff's [-1, 1] scale, where -1 is no signal: brightness scales the signal
above that floor and the noise is relative to each image's own spread, as nnU-Net's is on z-scores.
All channels of an item (a 2.5-D stack of one modality) get the same perturbation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NOISE = (0.1, (0.0, 0.1))  # probability, variance range (relative to the image's variance)
BLUR = (0.2, (0.5, 1.0))  # sigma in pixels
BRIGHTNESS = (0.15, (0.75, 1.25))
CONTRAST = (0.15, (0.75, 1.25))
LOW_RESOLUTION = (0.25, (0.5, 1.0))  # fraction of the size
GAMMA_INVERTED = (0.1, (0.7, 1.5))
GAMMA = (0.3, (0.7, 1.5))
BLUR_RADIUS = 3  # taps either side: 3 sigma for the largest sigma


def _draw(batch: int, setting: tuple[float, tuple[float, float]], generator: torch.Generator,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Which items an augmentation applies to, and a parameter per item (always both, so the random stream
    does not depend on which were chosen)."""
    probability, (low, high) = setting
    u = torch.rand(2, batch, generator=generator, device=generator.device).to(device)
    return u[0] < probability, low + (high - low) * u[1]


def _where(chosen: torch.Tensor, changed: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    return torch.where(chosen[:, None, None, None], changed, images)


def _blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per item (a grouped convolution over items x channels)."""
    b, c, h, w = images.shape
    taps = torch.arange(-BLUR_RADIUS, BLUR_RADIUS + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (b c, taps)
    planes = F.pad(images.reshape(1, b * c, h, w), [BLUR_RADIUS] * 4, mode="replicate")
    planes = F.conv2d(planes, kernel[:, None, None, :], groups=b * c)
    planes = F.conv2d(planes, kernel[:, None, :, None], groups=b * c)
    return planes.reshape(b, c, h, w)


def _low_resolution(images: torch.Tensor, zoom: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Nearest down to `zoom` of the size and bicubic back up, item by item (each has its own size)."""
    result = images.clone()
    height, width = images.shape[-2:]
    for i in torch.nonzero(chosen).flatten().tolist():
        size = (max(1, round(height * float(zoom[i]))), max(1, round(width * float(zoom[i]))))
        small = F.interpolate(images[i : i + 1], size=size, mode="nearest")
        result[i] = F.interpolate(small, size=(height, width), mode="bicubic", align_corners=False)[0]
    return result


def _gamma(images: torch.Tensor, gamma: torch.Tensor, invert: bool) -> torch.Tensor:
    """x -> x^gamma on each item's [min, max] scaled to [0, 1], then its mean and spread restored."""
    x = -images if invert else images
    flat = x.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    mean, spread = flat.mean(dim=1), flat.std(dim=1)
    scale = (high - low).clamp(min=1e-6)
    unit = (x - low[:, None, None, None]) / scale[:, None, None, None]
    y = unit.clamp(min=0.0) ** gamma[:, None, None, None]
    y_flat = y.flatten(1)
    y = (y - y_flat.mean(dim=1)[:, None, None, None]) / y_flat.std(dim=1).clamp(min=1e-6)[:, None, None, None]
    y = y * spread[:, None, None, None] + mean[:, None, None, None]
    return -y if invert else y


def augment_intensity(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """nnU-Net's intensity augmentations of a (B, C, H, W) batch in [-1, 1], each item drawn independently."""
    batch, device = images.shape[0], images.device
    x = images.float()
    spread = x.flatten(1).std(dim=1)[:, None, None, None]

    chosen, variance = _draw(batch, NOISE, generator, device)
    noise = torch.randn(x.shape, generator=generator, device=generator.device).to(device)
    x = _where(chosen, x + noise * variance.sqrt()[:, None, None, None] * spread, x)

    chosen, sigma = _draw(batch, BLUR, generator, device)
    x = _where(chosen, _blur(x, sigma), x)

    chosen, factor = _draw(batch, BRIGHTNESS, generator, device)
    x = _where(chosen, (x + 1.0) * factor[:, None, None, None] - 1.0, x)

    chosen, factor = _draw(batch, CONTRAST, generator, device)
    flat = x.flatten(1)
    mean, low, high = (v[:, None, None, None] for v in (flat.mean(1), flat.min(1).values, flat.max(1).values))
    x = _where(chosen, torch.maximum(torch.minimum((x - mean) * factor[:, None, None, None] + mean, high), low), x)

    chosen, zoom = _draw(batch, LOW_RESOLUTION, generator, device)
    x = _low_resolution(x, zoom, chosen)

    for setting, invert in ((GAMMA_INVERTED, True), (GAMMA, False)):
        chosen, gamma = _draw(batch, setting, generator, device)
        x = _where(chosen, _gamma(x, gamma, invert), x)
    return x.to(images.dtype)
