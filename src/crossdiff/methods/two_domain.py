"""What the shared-latent GANs (`unit`, `munit`) have in common: unpaired 2-D training, a 70x70 PatchGAN
critic per domain (`discriminator` judges targets, `reverse_discriminator` sources) with least-squares
(or vanilla) losses, and two optimisers, "generators" over the method's `generator_modules` and
"discriminators" over both critics. The generators step first; the critics then learn from the
detached translations of the same step (no image pool: neither UNIT nor MUNIT uses one)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from crossdiff.losses import adversarial_loss, check_gan_loss, critic_loss
from crossdiff.methods.base import DataSpec, Method, StepContext, check_single_slices
from crossdiff.methods.unet import adamw_groups, checked_settings
from crossdiff.nets.gan import PatchGAN

# UNIT's and MUNIT's optimiser settings (Adam, lr 1e-4, betas 0.5 / 0.999, weight decay 1e-4); their
# multi-scale critics are replaced by one 70x70 PatchGAN per domain
CRITIC_DEFAULTS: dict[str, Any] = {
    "discriminator_filters": 64,
    "discriminator_layers": 3,
    "gan_loss": "lsgan",
    "lr": 1e-4,
    "betas": [0.5, 0.999],
    "weight_decay": 1e-4,
}


class TwoDomainGAN(Method):
    """Subclasses give `defaults` (including CRITIC_DEFAULTS), build the networks named in
    `generator_modules` as attributes, and call `fool_critics` and `update_critics` in their step."""

    paired: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = CRITIC_DEFAULTS
    generator_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        super().__init__(checked_settings(self.name, self.defaults, config), data)
        check_single_slices(self.name, data)
        check_gan_loss(self.config["gan_loss"])
        critic = (int(self.config["discriminator_filters"]), int(self.config["discriminator_layers"]))
        self.discriminator = PatchGAN(data.target_channels, *critic)
        self.reverse_discriminator = PatchGAN(data.source_channels, *critic)
        self._optimizers: dict[str, tuple[torch.optim.Optimizer, list[str]]] | None = None

    def modules(self) -> dict[str, nn.Module]:
        return {**{name: getattr(self, name) for name in self.generator_modules},
                "discriminator": self.discriminator, "reverse_discriminator": self.reverse_discriminator}

    def optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
        if self._optimizers is None:
            groups = {"generators": self.generator_modules, "discriminators": ("discriminator", "reverse_discriminator")}
            self._optimizers = adamw_groups(self.modules(), groups, self.config)
        return self._optimizers

    def fool_critics(self, fake_target: torch.Tensor, fake_source: torch.Tensor) -> torch.Tensor:
        """The generators' adversarial loss: both critics should call their translations real."""
        kind = self.config["gan_loss"]
        return (adversarial_loss(self.discriminator(fake_target), True, kind)
                + adversarial_loss(self.reverse_discriminator(fake_source), True, kind))

    def update_critics(self, batch: dict[str, torch.Tensor], fake_source: torch.Tensor, fake_target: torch.Tensor,
                       context: StepContext) -> torch.Tensor:
        """One step of both critics on the batch's real slices against this step's translations."""
        kind = self.config["gan_loss"]
        loss = (critic_loss(self.discriminator, batch["target"], fake_target, kind)
                + critic_loss(self.reverse_discriminator, batch["source"], fake_source, kind))
        context.optimize("discriminators", loss)
        return loss
