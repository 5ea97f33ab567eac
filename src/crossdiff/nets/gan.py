"""Building blocks of the adversarial baselines (pix2pix, CycleGAN, SAGAN, UNIT, MUNIT and SynDiff's
non-diffusive module): the CycleGAN ResNet generator (whose halves UNIT and MUNIT reuse), SAGAN's
self-attention layer, the 70x70 PatchGAN discriminator and the pool of earlier generated images that
CycleGAN's discriminators learn from."""

from __future__ import annotations

import torch
from monai.networks.nets import PatchDiscriminator
from torch import nn

from crossdiff.errors import CrossdiffError

NORMS = ("instance", "batch", "layer", None)


def _norm(kind: str | None, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels)  # no affine parameters and no running statistics, as in CycleGAN
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)  # MUNIT's layer norm: each sample over C, H, W, per-channel affine
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


def downsampling_layers(in_channels: int, filters: int, downsamplings: int, norm: str | None) -> tuple[list[nn.Module], int]:
    """The front half of CycleGAN's generator: a 7x7 reflection-padded stem and `downsamplings` stride-2
    convolutions doubling the filters; returns the layers and the width they end at."""
    bias = norm != "batch"  # batch norm's shift makes a bias redundant
    layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(in_channels, filters, 7, bias=bias),
                               _norm(norm, filters), nn.ReLU()]
    width = filters
    for _ in range(downsamplings):
        layers += [nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=bias), _norm(norm, 2 * width), nn.ReLU()]
        width *= 2
    return layers, width


def upsampling_layers(width: int, out_channels: int, downsamplings: int, norm: str | None) -> list[nn.Module]:
    """The back half: `downsamplings` transposed convolutions halving the filters, then a 7x7 convolution
    with tanh, so outputs lie in [-1, 1]."""
    bias = norm != "batch"
    layers: list[nn.Module] = []
    for _ in range(downsamplings):
        layers += [nn.ConvTranspose2d(width, width // 2, 3, stride=2, padding=1, output_padding=1, bias=bias),
                   _norm(norm, width // 2), nn.ReLU()]
        width //= 2
    return [*layers, nn.ReflectionPad2d(3), nn.Conv2d(width, out_channels, 7), nn.Tanh()]


def check_norm(norm: str | None) -> None:
    if norm not in NORMS:
        raise CrossdiffError(f"generator norm must be one of instance, batch, layer or none, not {norm!r}")


class SelfAttention2d(nn.Module):
    """SAGAN's self-attention layer (Zhang et al. 2019): every position attends to every other through
    1x1 query and key projections of C/8 channels and a value projection of C; the result is added to the
    input scaled by a learnt gamma that starts at 0, so the layer begins as the identity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        inner = max(1, channels // 8)
        self.query = nn.Conv2d(channels, inner, 1)
        self.key = nn.Conv2d(channels, inner, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key, value = (projection(x).flatten(2) for projection in (self.query, self.key, self.value))
        attention = torch.softmax(query.transpose(1, 2) @ key, dim=-1)  # (B, N, N): row i sums to 1 over positions j
        return x + self.gamma * (value @ attention.transpose(1, 2)).view_as(x)


class ResnetGenerator(nn.Module):
    """The image-to-image generator of CycleGAN (Zhu et al. 2017, after Johnson et al. 2016): a 7x7
    reflection-padded stem, `downsamplings` stride-2 convolutions doubling the filters, `blocks`
    residual blocks, as many transposed convolutions back, and a 7x7 convolution with tanh, so outputs
    lie in [-1, 1]. Slice sides must be divisible by 2**downsamplings.

    `norm` is 'instance' (CycleGAN), 'batch', 'layer' or None; convolutions carry a bias unless batch
    norm follows them. `attention_blocks` > 0 puts a SelfAttention2d after each of the last that many
    residual blocks (SAGAN's generator).
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
        attention_blocks: int = 0,
    ) -> None:
        super().__init__()
        check_norm(norm)
        if filters < 1 or blocks < 0 or downsamplings < 0 or not 0 <= attention_blocks <= blocks:
            raise CrossdiffError(f"generator needs filters >= 1, blocks >= 0, downsamplings >= 0 and 0 <= attention_blocks "
                                 f"<= blocks (got {filters}, {blocks}, {downsamplings}, {attention_blocks})")
        layers, width = downsampling_layers(in_channels, filters, downsamplings, norm)
        for index in range(blocks):
            layers.append(ResidualBlock(width, norm, dropout, norm != "batch"))
            if index >= blocks - attention_blocks:
                layers.append(SelfAttention2d(width))
        self.model = nn.Sequential(*layers, *upsampling_layers(width, out_channels, downsamplings, norm))

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
