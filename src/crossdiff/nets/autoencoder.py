"""The image autoencoder of latent diffusion: MONAI's KL-regularised `AutoencoderKL` (Rombach et al. 2022;
Pinaya et al. 2022) and, for an optional adversarial term, MONAI's `PatchDiscriminator`.

Each level after the first halves the image, so `channels` of length L compresses by 2^(L-1) per side;
the default [32, 64, 64] is latent diffusion's f = 4 with 3 latent channels. No attention by default:
on the CPU it is the dominant cost at image resolution, and at f = 4 the latent grid is still large.

Group normalisation removes each group's mean and scale, and with them the absolute intensity that CT
(HU) and PET (SUV) carry, which the network then has to re-infer from texture: on a new patient it
guesses wrong. MONAI's AutoencoderKL normalises right before the latent and right before the output;
`build_autoencoder` drops those two norms (the residual blocks keep theirs), so the level can pass
along the unnormalised residual stream. Measured on sarcoma CT + PET slices at 32 px ([16, 32, 32],
1000 steps on STS_001-002, PSNR inside the body of held-out STS_003, where bilinear x4 gives 31.2 dB):
with the two norms, CT 26.0 and 31.1 dB for two seeds, the first 134 HU too dark on average; without
them 33.5 and 33.5 dB, bias at most 1 HU. Few channels per group hurt too: 8 groups (2-4 channels each)
gave CT 29.8 dB, 4 groups (4-8 channels) 33.5 dB; hence 8 groups for the default widths [32, 64, 64].
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.nets import AutoencoderKL, PatchDiscriminator
from torch import nn

from crossdiff.errors import CrossdiffError

AUTOENCODER_DEFAULTS: dict[str, Any] = {
    "channels": [32, 64, 64],
    "latent_channels": 3,
    "num_res_blocks": 1,
    "norm_num_groups": 8,
    "attention": False,  # non-local attention in the encoder's and decoder's middle blocks
}
DISCRIMINATOR_DEFAULTS: dict[str, Any] = {"channels": 32, "layers": 3}


def autoencoder_settings(given: dict[str, Any]) -> dict[str, Any]:
    """AUTOENCODER_DEFAULTS updated by `given`; unknown keys are an error (they would be silently unused)."""
    unknown = sorted(set(given) - set(AUTOENCODER_DEFAULTS))
    if unknown:
        raise CrossdiffError(f"unknown autoencoder settings: {', '.join(unknown)} (known: {', '.join(AUTOENCODER_DEFAULTS)})")
    return {**AUTOENCODER_DEFAULTS, **given}


def compression(settings: dict[str, Any]) -> int:
    """How many pixels per side one latent pixel stands for."""
    return 2 ** (len(settings["channels"]) - 1)


def build_autoencoder(settings: dict[str, Any], channels: int = 1) -> AutoencoderKL:
    """A 2-D AutoencoderKL for images of `channels` channels, from complete `autoencoder_settings`,
    without the group norms before its latent and its output (see the module note)."""
    widths = [int(c) for c in settings["channels"]]
    groups = int(settings["norm_num_groups"])
    if len(widths) < 1 or any(w % groups for w in widths):
        raise CrossdiffError(f"autoencoder channels {widths} must be non-empty multiples of norm_num_groups={groups}")
    if int(settings["num_res_blocks"]) < 1:
        raise CrossdiffError("the autoencoder needs num_res_blocks >= 1 (its levels change width inside those blocks)")
    attention = bool(settings["attention"])
    autoencoder = AutoencoderKL(
        spatial_dims=2,
        in_channels=channels,
        out_channels=channels,
        channels=widths,
        latent_channels=int(settings["latent_channels"]),
        num_res_blocks=[int(settings["num_res_blocks"])] * len(widths),
        attention_levels=[False] * len(widths),
        norm_num_groups=groups,
        with_encoder_nonlocal_attn=attention,
        with_decoder_nonlocal_attn=attention,
    )
    for half in (autoencoder.encoder, autoencoder.decoder):  # the norms before the latent and the output
        if not isinstance(half.blocks[-2], nn.GroupNorm):
            raise RuntimeError(f"unexpected MONAI AutoencoderKL layout: {type(half.blocks[-2]).__name__} before the last conv")
        half.blocks[-2] = nn.Identity()
    return autoencoder


def build_discriminator(settings: dict[str, Any], channels: int = 1) -> PatchDiscriminator:
    """A PatchGAN discriminator (pix2pix's 70 x 70 with 3 layers) with instance norm, which, unlike MONAI's
    default batch norm, does not tie a sample's score to the rest of its batch."""
    return PatchDiscriminator(
        spatial_dims=2,
        channels=int(settings["channels"]),
        in_channels=channels,
        num_layers_d=int(settings["layers"]),
        norm="INSTANCE",
    )


def kl_divergence(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over a latent and averaged over the batch (MONAI's tutorials'
    form, with which the usual weight 1e-6 was chosen)."""
    per_element = mu.square() + sigma.square() - torch.log(sigma.square().clamp(min=1e-12)) - 1.0
    return 0.5 * per_element.flatten(1).sum(dim=1).mean()
