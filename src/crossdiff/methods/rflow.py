"""`rflow`: conditional rectified flow / flow matching (Liu et al. 2023; Lipman et al. 2023): straight paths
from noise to the target slice, conditioned on the source by concatenation, sampled in 1-50 steps.

Training draws a time t, puts the target on the straight line to fresh noise, x_t = (1 - t/T) x0 + (t/T) eps
(MONAI `RFlowScheduler.add_noise`, T = 1000), and regresses the velocity x0 - eps with the denoiser of
crossdiff.nets.denoiser (MONAI's DiffusionModelUNet, which also sees the source slices); `masked_loss`
restricts the squared error to the body. Times are drawn from the training loop's generator, uniform or
logit-normal (`time_sampling`, Esser et al. 2024's choice for few-step sampling), as whole timesteps, the
grid MONAI's scheduler samples on. Sampling integrates from noise with crossdiff.diffusion.flow's Euler
or Heun steps; the start noise makes each draw different, so Monte-Carlo draws give an uncertainty map.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from monai.networks.schedulers import RFlowScheduler

from crossdiff.diffusion.flow import FLOW_SAMPLERS, flow_sample
from crossdiff.diffusion.predictions import diffusion_loss
from crossdiff.diffusion.processes import standard_normal
from crossdiff.diffusion.samplers import SampleResult
from crossdiff.diffusion.uncertainty import monte_carlo
from crossdiff.errors import CrossdiffError
from crossdiff.methods import register_method
from crossdiff.methods.base import DataSpec, SingleLossMethod, Translation
from crossdiff.methods.unet import SAMPLED_DEFAULTS, checked_settings
from crossdiff.nets.denoiser import DENOISER_DEFAULTS, build_denoiser

TIME_SAMPLING = ("uniform", "logit-normal")
RFLOW_DEFAULTS: dict[str, Any] = {
    **DENOISER_DEFAULTS,
    "timesteps": 1000,
    "time_sampling": "uniform",
    "loc": 0.0,  # logit-normal: t / T = sigmoid(loc + scale n), n ~ N(0, 1)
    "scale": 1.0,
    "sampler": "euler",  # or 'heun'
    "steps": 10,
    **SAMPLED_DEFAULTS,
}


@register_method("rflow", "conditional rectified flow / flow matching (MONAI RFlowScheduler); Euler or Heun, "
                          "1-50 steps; stochastic")
class RectifiedFlowMethod(SingleLossMethod):
    name: ClassVar[str] = "rflow"
    stochastic: ClassVar[bool] = True

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        super().__init__(checked_settings(self.name, RFLOW_DEFAULTS, config), data)
        c = self.config
        if c["time_sampling"] not in TIME_SAMPLING:
            raise CrossdiffError(f"rflow time_sampling must be one of {', '.join(TIME_SAMPLING)}, not {c['time_sampling']!r}")
        if c["sampler"] not in FLOW_SAMPLERS:
            raise CrossdiffError(f"rflow sampler must be one of {', '.join(FLOW_SAMPLERS)}, not {c['sampler']!r}")
        self.scheduler = RFlowScheduler(num_train_timesteps=int(c["timesteps"]), use_discrete_timesteps=True)
        self.net = build_denoiser(c, data)

    def _training_times(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Whole timesteps in 0..T-1, uniform or logit-normal, from the loop's generator."""
        if self.config["time_sampling"] == "uniform":
            fraction = torch.rand(batch, generator=generator, device=generator.device)
        else:
            normal = torch.randn(batch, generator=generator, device=generator.device)
            fraction = torch.sigmoid(float(self.config["loc"]) + float(self.config["scale"]) * normal)
        return (fraction * self.scheduler.num_train_timesteps).long().clamp(max=self.scheduler.num_train_timesteps - 1)

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        x0 = batch["target"]
        t = self._training_times(x0.shape[0], generator).to(x0.device)
        noise = standard_normal(x0, generator)
        x_t = self.scheduler.add_noise(x0, noise, t)
        velocity = self.net(x_t, batch["source"], t.float())
        return diffusion_loss(velocity, x0 - noise, mask=batch["mask"] if self.config["masked_loss"] else None)

    @torch.no_grad()
    def translate(
        self, source: torch.Tensor, generator: torch.Generator, samples: int = 1, *, sampler: str | None = None,
        steps: int | None = None, batch: int | None = None, **options: Any,
    ) -> Translation:
        """`samples` draws per slice with `sampler` ('euler' or 'heun') in `steps` steps (defaults: the config's)."""
        if options:
            raise CrossdiffError(f"rflow takes the translation options sampler, steps and batch, not "
                                 f"{', '.join(sorted(options))}")
        name = self.config["sampler"] if sampler is None else sampler
        steps = int(self.config["steps"] if steps is None else steps)
        shape = (self.data.target_channels, *source.shape[-2:])

        def draw(chunk: torch.Tensor) -> SampleResult:
            noise = standard_normal(chunk.new_empty(chunk.shape[0], *shape), generator)
            return flow_sample(name, lambda x, t: self.net(x, chunk, t), self.scheduler, noise, steps)

        result = monte_carlo(draw, source, samples, int(self.config["batch"] if batch is None else batch))
        return Translation(result.x.float().clamp(-1.0, 1.0), result.nfe)
