"""`unit-ddpm` (Sasaki, Willcocks & Breckon 2021, "UNIT-DDPM: unpaired image translation with denoising
diffusion probabilistic models"): two diffusion processes, one per modality, run in parallel, and the
noisy sample of each conditions the reverse step of the other. No adversarial training.

Networks: a denoiser per modality (`cddpm`'s DiffusionModelUNet: `net` denoises targets given a noisy
source, `reverse_net` sources given a noisy target) and a non-diffusive translator per direction
(CycleGAN's ResNet generator: `target_translator` a -> b, `source_translator` b -> a). With a the source
and b the target slices of one unpaired batch, every denoising term noises its image and its condition at
the same step t (fresh noise for each):
- the denoisers learn each real image given the noisy translation of that same image into the other
  modality (b given noisy F(b), a given noisy G(a); translations detached);
- the translators learn to make translations that the other modality's denoiser, given the real image
  as its noisy condition, denoises well (G(a) given noisy a, F(b) given noisy b; the denoisers are not
  stepped by this loss), plus the cycle F(G(a)) ~ a, G(F(b)) ~ b (L1, `cycle_weight`, 10 as in CycleGAN).
The first trains the joint model of both modalities; the second pulls the translations onto the data
the denoisers model, where a GAN would use a critic.

Translation walks the target chain back from N(0, I), conditioning each network call at time t on the
real source noised to t (a fresh draw each call, the paper's q(x_t^A | x_0^A)); any crossdiff sampler
works (default 50-step DDIM; `--sampler ddpm --steps 1000` is the paper's ancestral chain). Draws differ,
so `--samples` gives an uncertainty map. T = 1000 with DDPM's linear schedule. The default widths are
`cddpm`'s small denoiser and 32-filter, 4-block translators, sized for the CPU; 2-D slices only.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from crossdiff.diffusion.processes import per_sample, standard_normal
from crossdiff.diffusion.samplers import Denoise
from crossdiff.methods import register_method
from crossdiff.methods.base import DataSpec, StepContext, check_single_slices
from crossdiff.methods.diffusion import ConditionalDDPM, Network, denoising_loss, read_out
from crossdiff.methods.unet import adamw_groups
from crossdiff.nets.denoiser import build_denoiser
from crossdiff.nets.gan import ResnetGenerator

UNIT_DDPM_DEFAULTS: dict[str, Any] = {
    **ConditionalDDPM.defaults,
    "filters": 32,
    "blocks": 4,
    "cycle_weight": 10.0,
    "betas": [0.9, 0.999],
}
DENOISERS = ("net", "reverse_net")
TRANSLATORS = ("target_translator", "source_translator")


@register_method("unit-ddpm", "UNIT-DDPM: two parallel DDPMs, each modality's noisy sample conditions the other's "
                              "reverse step; translators with cycle loss, no GAN; unpaired, 2-D; stochastic")
class UnitDDPM(ConditionalDDPM):
    name = "unit-ddpm"
    paired: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = UNIT_DDPM_DEFAULTS

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        check_single_slices(self.name, data)
        super().__init__(config, data)
        c, channels = self.config, data.source_channels
        self.reverse_net = build_denoiser(c, data)  # source and target have the same channels
        translator = {"filters": int(c["filters"]), "blocks": int(c["blocks"])}
        self.target_translator = ResnetGenerator(channels, channels, **translator)
        self.source_translator = ResnetGenerator(channels, channels, **translator)

    def modules(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in (*DENOISERS, *TRANSLATORS)}

    def make_optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
        return adamw_groups(self.modules(), {"denoisers": DENOISERS, "translators": TRANSLATORS}, self.config)

    def _noisy_condition(self, net: nn.Module, condition: torch.Tensor, generator: torch.Generator) -> Network:
        """`net` as a function of (x_t, t), conditioned on `condition` noised to the same t."""

        def network(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            noisy = self.process.perturb(condition, t, standard_normal(condition, generator))
            scale = per_sample(self.process.input_scale(t), x_t)
            return net(x_t * scale, noisy * scale, self.process.network_time(t))

        return network

    def _denoising(self, net: nn.Module, x0: torch.Tensor, condition: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
        return denoising_loss(self.process, self.config["prediction"], self._noisy_condition(net, condition, generator),
                              x0, generator)

    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        a, b, g = batch["source"], batch["target"], context.generator
        b_translated, a_translated = self.target_translator(a), self.source_translator(b)
        denoisers = (self._denoising(self.net, b, a_translated.detach(), g)
                     + self._denoising(self.reverse_net, a, b_translated.detach(), g))
        context.optimize("denoisers", denoisers)

        # with the stepped denoisers; this backward also fills their gradients, which their next step zeroes
        translated = self._denoising(self.net, b_translated, a, g) + self._denoising(self.reverse_net, a_translated, b, g)
        cycle = ((self.source_translator(b_translated) - a).abs().mean()
                 + (self.target_translator(a_translated) - b).abs().mean())
        translators = translated + float(self.config["cycle_weight"]) * cycle
        context.optimize("translators", translators)
        logged = {"denoisers": denoisers, "translators": translators, "translated": translated, "cycle": cycle}
        return {key: float(value.detach()) for key, value in logged.items()}

    @torch.no_grad()
    def validation_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> float:
        """The target denoiser's loss on held-out pairs, conditioned as in translation (the noisy true source)."""
        return float(self._denoising(self.net, batch["target"], batch["source"], generator))

    def sampling_denoiser(self, source: torch.Tensor, generator: torch.Generator) -> Denoise:
        return read_out(self.process, self.config["prediction"], self.config["clip"],
                        self._noisy_condition(self.net, source, generator))
