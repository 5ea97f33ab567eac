"""`pix2pix` (Isola et al. 2017): the `unet` regression with a conditional PatchGAN critic added.

The generator is the `unet` method's network and reconstruction loss; a 70x70 PatchGAN sees the
source slice(s) with either the real or the generated target and learns to tell them apart, and the
generator learns from `reconstruction_weight` x reconstruction (L1, lambda 100 in the paper) plus the
adversarial loss. Each step first updates the discriminator, then the generator against the updated
discriminator, through two optimisers (`generator`, `discriminator`). Translation is one generator
pass in eval mode (no dropout noise), so the method is deterministic.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from crossdiff.losses import adversarial_loss, check_gan_loss
from crossdiff.methods import register_method
from crossdiff.methods.base import DataSpec, StepContext
from crossdiff.methods.unet import UNetMethod, adamw
from crossdiff.nets.gan import PatchGAN

PIX2PIX_DEFAULTS: dict[str, Any] = {
    "reconstruction_weight": 100.0,
    "gan_loss": "vanilla",
    "discriminator_filters": 64,
    "discriminator_layers": 3,  # 70x70 patches
    "lr": 2e-4,
    "betas": [0.5, 0.999],
    "weight_decay": 0.0,
}


@register_method("pix2pix", "pix2pix: UNet generator + 70x70 PatchGAN, L1 (x100) + adversarial loss; deterministic")
class Pix2PixMethod(UNetMethod):
    name: ClassVar[str] = "pix2pix"
    defaults: ClassVar[dict[str, Any]] = {**UNetMethod.defaults, **PIX2PIX_DEFAULTS}

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        super().__init__(config, data)
        check_gan_loss(self.config["gan_loss"])
        self.discriminator = PatchGAN(
            data.source_channels + data.target_channels,
            int(self.config["discriminator_filters"]),
            int(self.config["discriminator_layers"]),
        )

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net, "discriminator": self.discriminator}

    def make_optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
        return {
            "generator": (adamw(self.net.parameters(), self.config), ["net"]),
            "discriminator": (adamw(self.discriminator.parameters(), self.config), ["discriminator"]),
        }

    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        source, target = batch["source"], batch["target"]
        fake = self._predict(source)
        kind = self.config["gan_loss"]

        # real and generated pairs in one call (one forward per backward, as DDP wants)
        judged = self.discriminator(torch.cat([torch.cat([source, target], 1), torch.cat([source, fake.detach()], 1)]))
        on_real, on_fake = judged.chunk(2)
        critic = 0.5 * (adversarial_loss(on_real, True, kind) + adversarial_loss(on_fake, False, kind))
        context.optimize("discriminator", critic)

        # the generator's backward also fills the discriminator's gradients; its next step zeroes them
        fooling = adversarial_loss(self.discriminator(torch.cat([source, fake], 1)), True, kind)
        reconstruction, terms = self._reconstruction_loss(fake, batch)
        loss = fooling + float(self.config["reconstruction_weight"]) * reconstruction
        context.optimize("generator", loss)
        logged = {"loss": loss, "adversarial": fooling, "discriminator": critic, **terms}
        return {key: float(value.detach()) for key, value in logged.items()}
