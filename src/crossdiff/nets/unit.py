"""UNIT's coupled VAE-GAN generators (Liu, Breuel & Kautz 2017, "Unsupervised image-to-image translation
networks"): one shared latent space for both domains.

Each domain has an encoder (CycleGAN's stem and stride-2 convolutions, then residual blocks) and a
decoder (residual blocks, transposed convolutions, tanh). The last `shared_blocks` residual blocks of
both encoders are one network, and so are the first `shared_blocks` of both decoders: that weight
sharing is what ties a source image and a target image of the same anatomy to the same latent code.
The encoders output the mean of a Gaussian with unit variance (the UNIT code's simplification), so the
KL term is the mean squared latent and a sample is mean + N(0, I).

The parts are separate modules (domain encoder -> shared encoder -> latent -> shared decoder -> domain
decoder), each called through its forward, so the training loop can save, average and DDP-wrap them
like any other network; the shared ones appear once.
"""

from __future__ import annotations

from torch import nn

from crossdiff.errors import CrossdiffError
from crossdiff.nets.gan import ResidualBlock, check_norm, downsampling_layers, upsampling_layers


def check_unit_settings(filters: int, downsamplings: int, blocks: int, shared_blocks: int, norm: str | None) -> None:
    check_norm(norm)
    if filters < 1 or downsamplings < 0 or not 1 <= shared_blocks <= blocks:
        raise CrossdiffError(f"unit needs filters >= 1, downsamplings >= 0 and 1 <= shared_blocks <= blocks "
                             f"(got {filters}, {downsamplings}, {shared_blocks}, {blocks})")


def residual_blocks(width: int, count: int, norm: str | None) -> nn.Sequential:
    """`count` residual blocks at the latent width: the shared part of the encoders or of the decoders."""
    return nn.Sequential(*(ResidualBlock(width, norm, 0.0, norm != "batch") for _ in range(count)))


def domain_encoder(channels: int, filters: int, downsamplings: int, blocks: int, norm: str | None) -> nn.Sequential:
    """One domain's own encoder layers: stem, stride-2 convolutions, `blocks` residual blocks."""
    layers, width = downsampling_layers(channels, filters, downsamplings, norm)
    return nn.Sequential(*layers, *residual_blocks(width, blocks, norm))


def domain_decoder(channels: int, filters: int, downsamplings: int, blocks: int, norm: str | None) -> nn.Sequential:
    """One domain's own decoder layers: `blocks` residual blocks, transposed convolutions, tanh."""
    width = filters * 2**downsamplings
    return nn.Sequential(*residual_blocks(width, blocks, norm), *upsampling_layers(width, channels, downsamplings, norm))
