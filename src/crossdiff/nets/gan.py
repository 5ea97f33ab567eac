"""Building blocks of the adversarial baselines (pix2pix, CycleGAN, and later SynDiff's adversarial
non-diffusive module): the CycleGAN ResNet generator, the 70x70 PatchGAN discriminator and the pool
of earlier generated images that CycleGAN's discriminators learn from."""

from __future__ import annotations

import torch
from monai.networks.nets import PatchDiscriminator
from torch import nn

from crossdiff.errors import CrossdiffError

NORMS = ("instance", "batch", None)


def _norm(kind: str | None, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels)  # no affine parameters and no running statistics, as in CycleGAN
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.Identity()


class ResidualBlock(nn.Module):
    """Two reflection-padded 3x3 convolutions with normalisation, added to the input."""

    def __init__(self, channels: int, norm: str | None, dropout: float, bias: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias),
                                   _norm(norm, channels), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.ReflectionPad2d(1), nn.Conv2d(channels, channels, 3, bias=bias), _norm(norm, channels)]
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """The image-to-image generator of CycleGAN (Zhu et al. 2017, after Johnson et al. 2016): a 7x7
    reflection-padded stem, `downsamplings` stride-2 convolutions doubling the filters, `blocks`
    residual blocks, as many transposed convolutions back, and a 7x7 convolution with tanh, so outputs
    lie in [-1, 1]. Slice sides must be divisible by 2**downsamplings.

    `norm` is 'instance' (CycleGAN), 'batch' or None; convolutions carry a bias unless batch norm
    follows them (its shift makes a bias redundant).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        filters: int = 64,
        blocks: int = 9,
        downsamplings: int = 2,
        norm: str | None = "instance",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise CrossdiffError(f"generator norm must be one of instance, batch or none, not {norm!r}")
        if filters < 1 or blocks < 0 or downsamplings < 0:
            raise CrossdiffError(f"generator needs filters >= 1, blocks >= 0, downsamplings >= 0 "
                                 f"(got {filters}, {blocks}, {downsamplings})")
        bias = norm != "batch"
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, filters, 7, bias=bias),
                                   _norm(norm, filters), nn.ReLU()]
        width = filters
        for _ in range(downsamplings):
            layers += [nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=bias), _norm(norm, 2 * width), nn.ReLU()]
            width *= 2
        layers += [ResidualBlock(width, norm, dropout, bias) for _ in range(blocks)]
        for _ in range(downsamplings):
            layers += [nn.ConvTranspose2d(width, width // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                       _norm(norm, width // 2), nn.ReLU()]
            width //= 2
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(width, out_channels, 7), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class PatchGAN(PatchDiscriminator):
    """MONAI's PatchDiscriminator returning only its last map: one logit per overlapping patch. Three
    layers make the 70x70 PatchGAN of pix2pix and CycleGAN. Instance norm, so that real and generated
    images judged in one batch do not share statistics."""

    def __init__(self, in_channels: int, filters: int = 64, layers: int = 3) -> None:
        super().__init__(spatial_dims=2, channels=filters, in_channels=in_channels, num_layers_d=layers, norm="INSTANCE")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[-1]


class ImagePool(nn.Module):
    """CycleGAN's history of generated images (Shrivastava et al. 2017): once full, each new image is,
    with probability 1/2, swapped for a stored one that the discriminator sees instead.

    The stored images and the fill count are buffers, so checkpoints hold them and a resumed run
    continues bit for bit; every random choice comes from the generator the caller passes (the
    training loop's per-step generator). A pool of size 0 hands the images back unchanged.
    """

    def __init__(self, size: int, shape: tuple[int, ...]) -> None:
        super().__init__()
        if size < 0:
            raise CrossdiffError(f"pool_size must be >= 0, not {size}")
        self.size = size
        self.register_buffer("images", torch.zeros(size, *shape))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.size == 0:
            return images
        chosen = []
        for image in images.to(self.images.dtype):
            filled = int(self.count)
            if filled < self.size:
                self.images[filled] = image
                self.count += 1
                chosen.append(image)
                continue
            swap, where = torch.rand(2, generator=generator, device=generator.device).tolist()
            if swap < 0.5:
                index = int(where * self.size)
                chosen.append(self.images[index].clone())
                self.images[index] = image
            else:
                chosen.append(image)
        return torch.stack(chosen).to(images.dtype)
