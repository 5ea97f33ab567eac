"""`cyclegan` (Zhu et al. 2017): unpaired translation with two generators and two critics.

`generator` maps source to target (it is what translation uses), `reverse_generator` target to
source; `discriminator` judges targets and `reverse_discriminator` sources (70x70 PatchGANs). The
generators learn from the least-squares adversarial loss, the cycle loss
`cycle_weight` x reconstruction(F(G(a)), a) + reconstruction(G(F(b)), b) (L1, lambda 10, plus the
optional SSIM/perceptual terms) and the identity loss `identity_weight` x `cycle_weight` x
L1(G(b), b) + L1(F(a), a) (0.5 x 10). The critics see real images against generated ones drawn
from a pool of 50 earlier fakes per side; the pools are buffers of the `target_pool`/`source_pool`
modules, so checkpoints hold them and resume is exact (under DDP every process keeps its own pools and
a checkpoint holds rank 0's, which every process gets back on resume).

Training data is unpaired (`paired = False`): the batches come from an UnpairedSliceDataset, source
slices of some cases and target slices of others. Slices must be 2-D (`slices.context: 0`): the
reverse generator turns one target slice into one source slice, and the cycle feeds that back to the
forward generator, which therefore cannot ask for the 2k+1 neighbouring source slices of 2.5-D input.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from crossdiff.losses import (
    RECONSTRUCTION_DEFAULTS,
    ReconstructionLoss,
    adversarial_loss,
    check_gan_loss,
    critic_loss,
)
from crossdiff.methods import register_method
from crossdiff.methods.base import DataSpec, Method, StepContext, Translation, check_single_slices
from crossdiff.methods.unet import adamw, checked_settings, module_device, refuse_sampling
from crossdiff.nets.gan import ImagePool, PatchGAN, ResnetGenerator

CYCLEGAN_DEFAULTS: dict[str, Any] = {
    "filters": 64,
    "blocks": 9,
    "downsamplings": 2,
    "norm": "instance",
    "dropout": 0.0,
    "discriminator_filters": 64,
    "discriminator_layers": 3,  # 70x70 patches
    "gan_loss": "lsgan",
    "cycle_weight": 10.0,
    "identity_weight": 0.5,  # relative to cycle_weight, as CycleGAN's lambda_identity; 0 switches it off
    "pool_size": 50,
    **RECONSTRUCTION_DEFAULTS,
    "lr": 2e-4,
    "betas": [0.5, 0.999],
    "weight_decay": 0.0,
}


@register_method("cyclegan", "CycleGAN: two ResNet generators and PatchGANs, cycle + identity losses; unpaired, 2-D")
class CycleGANMethod(Method):
    name: ClassVar[str] = "cyclegan"
    stochastic: ClassVar[bool] = False
    paired: ClassVar[bool] = False

    defaults: ClassVar[dict[str, Any]] = CYCLEGAN_DEFAULTS

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        super().__init__(checked_settings(self.name, self.defaults, config), data)
        check_single_slices(self.name, data)
        check_gan_loss(self.config["gan_loss"])
        c = self.config
        critic = (int(c["discriminator_filters"]), int(c["discriminator_layers"]))
        channels = data.source_channels
        self.generator = self.build_generator(channels)
        self.reverse_generator = self.build_generator(channels)
        self.discriminator = PatchGAN(channels, *critic)
        self.reverse_discriminator = PatchGAN(channels, *critic)
        self.target_pool = ImagePool(int(c["pool_size"]), (channels, *data.size))
        self.source_pool = ImagePool(int(c["pool_size"]), (channels, *data.size))
        self._optimizers: dict[str, tuple[torch.optim.Optimizer, list[str]]] | None = None
        self.cycle: ReconstructionLoss | None = None  # training-only, made with the optimisers

    def build_generator(self, channels: int) -> nn.Module:
        """One of the two generators (both directions have the same architecture); subclasses swap it."""
        return ResnetGenerator(channels, channels, **self.resnet_settings())

    def resnet_settings(self) -> dict[str, Any]:
        c = self.config
        return {"filters": int(c["filters"]), "blocks": int(c["blocks"]), "downsamplings": int(c["downsamplings"]),
                "norm": c["norm"], "dropout": float(c["dropout"])}

    def modules(self) -> dict[str, nn.Module]:
        return {
            "generator": self.generator,
            "reverse_generator": self.reverse_generator,
            "discriminator": self.discriminator,
            "reverse_discriminator": self.reverse_discriminator,
            "target_pool": self.target_pool,
            "source_pool": self.source_pool,
        }

    def optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
        if self._optimizers is None:
            self.cycle = ReconstructionLoss.from_config(self.config).to(module_device(self.generator))
            generators = [*self.generator.parameters(), *self.reverse_generator.parameters()]
            critics = [*self.discriminator.parameters(), *self.reverse_discriminator.parameters()]
            self._optimizers = {
                "generators": (adamw(generators, self.config), ["generator", "reverse_generator"]),
                "discriminators": (adamw(critics, self.config), ["discriminator", "reverse_discriminator"]),
            }
        return self._optimizers

    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        assert self.cycle is not None, "optimizers() builds the training loss"
        real_a, real_b = batch["source"], batch["target"]
        kind, weight = self.config["gan_loss"], float(self.config["cycle_weight"])

        fake_b, fake_a = self.generator(real_a), self.reverse_generator(real_b)
        cycle_a, terms_a = self.cycle(self.reverse_generator(fake_b), real_a)
        cycle_b, terms_b = self.cycle(self.generator(fake_a), real_b)
        adversarial = (adversarial_loss(self.discriminator(fake_b), True, kind)
                       + adversarial_loss(self.reverse_discriminator(fake_a), True, kind))
        loss = adversarial + weight * (cycle_a + cycle_b)
        identity = torch.zeros((), device=real_a.device)
        if self.config["identity_weight"] > 0:
            identity = (self.generator(real_b) - real_b).abs().mean() + (self.reverse_generator(real_a) - real_a).abs().mean()
            loss = loss + float(self.config["identity_weight"]) * weight * identity
        context.optimize("generators", loss)  # also fills the critics' gradients; their step zeroes them first

        critic = (critic_loss(self.discriminator, real_b, self.target_pool(fake_b.detach(), context.generator), kind)
                  + critic_loss(self.reverse_discriminator, real_a, self.source_pool(fake_a.detach(), context.generator), kind))
        context.optimize("discriminators", critic)
        logged = {"loss": loss, "adversarial": adversarial, "cycle": cycle_a + cycle_b, "identity": identity,
                  "discriminators": critic, **{f"cycle_{key}": terms_a[key] + terms_b[key] for key in terms_a}}
        return {key: float(value.detach()) for key, value in logged.items()}

    @torch.no_grad()
    def translate(
        self, source: torch.Tensor, generator: torch.Generator, samples: int = 1, **options: Any
    ) -> Translation:
        refuse_sampling(self.name, samples, options)
        return Translation(samples=self.generator(source).float().clamp(-1.0, 1.0)[None], nfe=1)
