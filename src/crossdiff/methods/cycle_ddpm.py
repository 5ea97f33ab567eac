"""`cycle-ddpm`: a regular conditional DDPM made unpaired the way SynDiff makes its diffusion unpaired,
as the SynDiff paper's cycle-consistent DDPM competitor (Ozbey et al. 2023).

The diffusion model is `cddpm`'s (crossdiff.methods.diffusion: MONAI's DiffusionModelUNet sees the noisy
target and the source slice as channels; T = 1000, here with the cosine schedule). Without pairs there
is no true source for a target slice b, so its condition is made: SynDiff's non-diffusive ResNet
estimators (crossdiff.methods.syndiff.estimators) map b to a source estimate F(b) (and source slices a
to target estimates G(a)). Per step:
- the DDPM learns b from noisy b given F(b) (its denoising loss, weight `diffusion_weight`): the cycle
  b -> F(b) -> b closes through the diffusion model, and the loss trains F as well;
- F(b) and G(a) must fool PatchGAN critics of real sources and targets (softplus, `adversarial_weight`);
- the estimators' own cycle, F(G(a)) ~ a and G(F(b)) ~ b (L1, `estimator_cycle_weight`, SynDiff's 0.5).
Translation conditions the DDPM on the real source; sampling is any crossdiff sampler (default 50-step
DDIM; `--sampler ddpm --steps 1000` is the ancestral chain of the paper). Draws differ, so `--samples`
gives an uncertainty map. 2-D slices only (`slices: {context: 0}`). The default widths are `cddpm`'s small
denoiser and syndiff-unpaired's estimators, sized for the CPU (the paper's networks are wider).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from crossdiff.methods import register_method
from crossdiff.methods.base import DataSpec, StepContext, check_single_slices
from crossdiff.methods.diffusion import ConditionalDDPM
from crossdiff.methods.syndiff import estimators, patch_critic_loss
from crossdiff.methods.unet import adamw_groups

CYCLE_DDPM_DEFAULTS: dict[str, Any] = {
    **ConditionalDDPM.defaults,
    "schedule": "cosine",
    "filters": 32,
    "blocks": 4,
    "critic_filters": 32,
    "critic_layers": 3,
    "diffusion_weight": 1.0,
    "adversarial_weight": 1.0,
    "estimator_cycle_weight": 0.5,
    "betas": [0.5, 0.999],  # one Adam for the DDPM and the estimators, with the GAN parts' momentum
}
GENERATORS = ("net", "target_estimator", "source_estimator")
CRITICS = ("target_critic", "source_critic")


@register_method("cycle-ddpm", "cycle-consistent DDPM: conditional DDPM (T 1000, cosine) whose source condition comes "
                               "from non-diffusive estimators (cycle + adversarial); unpaired, 2-D; stochastic")
class CycleDDPM(ConditionalDDPM):
    name = "cycle-ddpm"
    paired: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = CYCLE_DDPM_DEFAULTS

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        check_single_slices(self.name, data)
        super().__init__(config, data)
        self.target_estimator, self.source_estimator, self.target_critic, self.source_critic = estimators(
            self.config, data.source_channels)

    def modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in (*GENERATORS, *CRITICS)}

    def make_optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
        return adamw_groups(self.modules(), {"generators": GENERATORS, "discriminators": CRITICS}, self.config)

    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        a, b, c = batch["source"], batch["target"], self.config
        b_estimate, a_estimate = self.target_estimator(a), self.source_estimator(b)
        critics = (patch_critic_loss(self.target_critic, b, b_estimate.detach())
                   + patch_critic_loss(self.source_critic, a, a_estimate.detach()))
        context.optimize("discriminators", critics)

        # the generators' backward also fills the critics' gradients; their next step zeroes them
        diffusion = self.loss({"target": b, "source": a_estimate, "mask": batch["target_mask"]}, context.generator)
        adversarial = (F.softplus(-self.target_critic(b_estimate).float()).mean()
                       + F.softplus(-self.source_critic(a_estimate).float()).mean())
        cycle = (self.source_estimator(b_estimate) - a).abs().mean() + (self.target_estimator(a_estimate) - b).abs().mean()
        loss = (float(c["diffusion_weight"]) * diffusion + float(c["adversarial_weight"]) * adversarial
                + float(c["estimator_cycle_weight"]) * cycle)
        context.optimize("generators", loss)
        logged = {"loss": loss, "diffusion": diffusion, "adversarial": adversarial, "estimator_cycle": cycle,
                  "discriminators": critics}
        return {key: float(value.detach()) for key, value in logged.items()}
