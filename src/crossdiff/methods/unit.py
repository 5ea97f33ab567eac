"""`unit` (Liu, Breuel & Kautz, NeurIPS 2017): unpaired translation through a latent space shared by both
domains (crossdiff.nets.unit: two VAE-style encoders whose last residual blocks are shared, two
generators whose first residual blocks are shared, and crossdiff.methods.two_domain's PatchGAN critics).

Per step, with a the source and b the target slices, z = E(x) + N(0, I):
- VAE: each image reconstructed from its own latent, `reconstruction_weight` x L1, plus `kl_weight` x
  the KL to N(0, I) (with unit variance, the mean squared latent);
- GAN: G_b(z_a) and G_a(z_b) must fool the target and source critics (least squares, `gan_weight`);
- cycle: the translations encoded again and decoded back, `cycle_weight` x L1 to the originals, plus
  `cycle_kl_weight` x the KL of their latents.
The weights are the UNIT code's (1, 10, 0.01, 10, 0.01) and so are the widths by default (64 filters,
2 downsamplings, 4 residual blocks per encoder and decoder, 1 shared); on this project's CPU budgets they
are scaled down (benchmarks/configs/brain-unpaired.yaml), keeping the architecture and the losses.
Translation decodes the source's latent mean with the target generator: one deterministic pass. 2-D
slices only (`slices: {context: 0}`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from crossdiff.diffusion.processes import standard_normal
from crossdiff.methods import register_method
from crossdiff.methods.base import DataSpec, StepContext, Translation
from crossdiff.methods.two_domain import CRITIC_DEFAULTS, TwoDomainGAN
from crossdiff.methods.unet import refuse_sampling
from crossdiff.nets.unit import check_unit_settings, domain_decoder, domain_encoder, residual_blocks

UNIT_DEFAULTS: dict[str, Any] = {
    "filters": 64,
    "downsamplings": 2,
    "blocks": 4,  # residual blocks per encoder and per decoder ...
    "shared_blocks": 1,  # ... of which this many are shared between the domains
    "norm": "instance",
    "gan_weight": 1.0,
    "reconstruction_weight": 10.0,
    "kl_weight": 0.01,
    "cycle_weight": 10.0,
    "cycle_kl_weight": 0.01,
    **CRITIC_DEFAULTS,
}


@register_method("unit", "UNIT: VAE-GANs with a shared latent space (shared deep encoder / first generator layers), "
                         "VAE + adversarial + cycle losses; unpaired, 2-D")
class UNITMethod(TwoDomainGAN):
    name: ClassVar[str] = "unit"
    defaults: ClassVar[dict[str, Any]] = UNIT_DEFAULTS
    generator_modules: ClassVar[tuple[str, ...]] = (
        "source_encoder", "target_encoder", "shared_encoder", "shared_decoder", "source_decoder", "target_decoder")

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        super().__init__(config, data)
        c, channels = self.config, data.source_channels
        filters, downsamplings, norm = int(c["filters"]), int(c["downsamplings"]), c["norm"]
        blocks, shared = int(c["blocks"]), int(c["shared_blocks"])
        check_unit_settings(filters, downsamplings, blocks, shared, norm)
        own = blocks - shared
        self.source_encoder = domain_encoder(channels, filters, downsamplings, own, norm)
        self.target_encoder = domain_encoder(channels, filters, downsamplings, own, norm)
        self.shared_encoder = residual_blocks(filters * 2**downsamplings, shared, norm)
        self.shared_decoder = residual_blocks(filters * 2**downsamplings, shared, norm)
        self.source_decoder = domain_decoder(channels, filters, downsamplings, own, norm)
        self.target_decoder = domain_decoder(channels, filters, downsamplings, own, norm)

    def _encode(self, x: torch.Tensor, domain: str) -> torch.Tensor:
        """The latent mean of a `domain` ('source' or 'target') image."""
        return self.shared_encoder(getattr(self, f"{domain}_encoder")(x))

    def _decode(self, z: torch.Tensor, domain: str) -> torch.Tensor:
        return getattr(self, f"{domain}_decoder")(self.shared_decoder(z))

    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        a, b, g, c = batch["source"], batch["target"], context.generator, self.config
        mean_a, mean_b = self._encode(a, "source"), self._encode(b, "target")
        z_a, z_b = mean_a + standard_normal(mean_a, g), mean_b + standard_normal(mean_b, g)
        fake_b, fake_a = self._decode(z_a, "target"), self._decode(z_b, "source")
        again_a, again_b = self._encode(fake_b, "target"), self._encode(fake_a, "source")  # a's latent, from b's side
        cycle_a = self._decode(again_a + standard_normal(again_a, g), "source")
        cycle_b = self._decode(again_b + standard_normal(again_b, g), "target")

        reconstruction = (self._decode(z_a, "source") - a).abs().mean() + (self._decode(z_b, "target") - b).abs().mean()
        kl = mean_a.pow(2).mean() + mean_b.pow(2).mean()
        cycle = (cycle_a - a).abs().mean() + (cycle_b - b).abs().mean()
        cycle_kl = again_a.pow(2).mean() + again_b.pow(2).mean()
        adversarial = self.fool_critics(fake_b, fake_a)
        loss = (float(c["gan_weight"]) * adversarial + float(c["reconstruction_weight"]) * reconstruction
                + float(c["kl_weight"]) * kl + float(c["cycle_weight"]) * cycle + float(c["cycle_kl_weight"]) * cycle_kl)
        context.optimize("generators", loss)  # also fills the critics' gradients; their step zeroes them first
        critics = self.update_critics(batch, fake_a, fake_b, context)
        logged = {"loss": loss, "adversarial": adversarial, "reconstruction": reconstruction, "kl": kl, "cycle": cycle,
                  "cycle_kl": cycle_kl, "discriminators": critics}
        return {key: float(value.detach()) for key, value in logged.items()}

    @torch.no_grad()
    def translate(
        self, source: torch.Tensor, generator: torch.Generator, samples: int = 1, **options: Any
    ) -> Translation:
        refuse_sampling(self.name, samples, options)
        translated = self._decode(self._encode(source, "source"), "target")
        return Translation(samples=translated.float().clamp(-1.0, 1.0)[None], nfe=1)
