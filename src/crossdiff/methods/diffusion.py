"""Conditional diffusion translation: the denoiser sees the noisy target and the source slice(s), and
sampling walks noise back to a target image for that source.

Two methods share everything but the process:
- `cddpm`: the discrete DDPM (Ho et al. 2020) with a linear or cosine schedule;
- `score-sde`: the continuous VP or VE SDE trained by denoising score matching (Song et al. 2021).
Both take every sampler in crossdiff.diffusion.samplers (ddpm, ddim, em, pc, ode): the processes are
all Gaussian with an SDE, so each sampler applies to each. On `cddpm` every sampler but one evaluates
the network only at its T training levels; the adaptive ODE (solver 'rk45') also visits times between
them, which the network never saw in training (the time embedding interpolates smoothly).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from crossdiff.diffusion.predictions import check_prediction, diffusion_loss, prediction_target, to_x0_eps
from crossdiff.diffusion.processes import VESDE, VPSDE, DiscreteVP, GaussianProcess, per_sample, standard_normal
from crossdiff.diffusion.samplers import Denoise, SampleResult, check_options, sample
from crossdiff.diffusion.uncertainty import monte_carlo
from crossdiff.errors import CrossdiffError
from crossdiff.methods import register_method
from crossdiff.methods.base import DataSpec, SingleLossMethod, Translation
from crossdiff.nets.denoiser import DENOISER_DEFAULTS, build_denoiser

SDES = ("vp", "ve")

COMMON_DEFAULTS: dict[str, Any] = {
    **DENOISER_DEFAULTS,
    "lr": 2e-4,
    "weight_decay": 0.0,  # as DDPM and score_sde, which train with plain Adam
    # 'v' rather than DDPM's 'epsilon': on 47 STS_003 slices at 32 px, batch 16, the eps model's
    # translations after 1200 steps were worse than the mean CT slice (L1 0.28-0.40 vs 0.096), the v
    # model's after 600 were 0.034. As a score-matching weight, v is lambda(t) = sigma^2 (alpha^2 +
    # sigma^2) / alpha^2 against eps's sigma^2: it stresses the noisiest times, where only the source
    # tells what the target is.
    "prediction": "v",
    "clip": True,  # clamp x0_hat to [-1, 1] while sampling (DDPM's clip_denoised): images live there
    "masked_loss": False,  # learn only inside the body mask; off so the background is learnt too
    "sampler_options": {},  # options of the configured sampler (e.g. {eta: 0.5}); translate() may override
    "batch": 16,  # slice-draws sampled at once: bounds memory for Monte-Carlo draws
}


def sampling_settings(
    config: dict[str, Any], sampler: str | None, steps: int | None, options: dict[str, Any]
) -> tuple[str, int, dict[str, Any]]:
    """The sampler, steps and sampler options one translation uses: the call's, else the method config's.
    The config's `sampler_options` belong to its own sampler, so they apply only when that one is used."""
    name = sampler or config["sampler"]
    if name == config["sampler"]:
        options = {**config["sampler_options"], **options}
    return name, int(config["steps"] if steps is None else steps), options


# A network as the losses and samplers below call it: (x_t, t) -> its raw output (epsilon, v or x0), with
# whatever it is conditioned on already bound.
Network = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def denoising_loss(process: GaussianProcess, prediction: str, network: Network, x0: torch.Tensor,
                   generator: torch.Generator, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Noise x0 at random times and score the network's prediction (Ho et al. 2020, Algorithm 1)."""
    t = process.sample_time(x0.shape[0], generator).to(x0.device)
    noise = standard_normal(x0, generator)
    output = network(process.perturb(x0, t, noise), t)
    alpha, sigma = per_sample(process.alpha(t), x0), per_sample(process.sigma(t), x0)
    return diffusion_loss(output, prediction_target(prediction, x0, noise, alpha, sigma), mask=mask)


def read_out(process: GaussianProcess, prediction: str, clip: bool, network: Network) -> Denoise:
    """The network as samplers see it, x_t, t -> (x0_hat, eps_hat); `clip` clamps x0_hat to [-1, 1]."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = per_sample(process.alpha(t), x_t), per_sample(process.sigma(t), x_t)
        x0_hat, eps_hat = to_x0_eps(prediction, network(x_t, t), x_t, alpha, sigma)
        if not clip:
            return x0_hat, eps_hat
        x0_hat = x0_hat.clamp(-1.0, 1.0)
        return x0_hat, (x_t - alpha * x0_hat) / sigma

    return denoise


class _ConditionalDiffusion(SingleLossMethod):
    """What both diffusion methods share: the denoiser, the loss, and sampling with Monte-Carlo draws.
    Subclasses give their extra defaults and build their process."""

    stochastic: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        unknown = sorted(set(config) - set(COMMON_DEFAULTS) - set(self.defaults))
        if unknown:
            raise CrossdiffError(f"{self.name} does not know the settings {', '.join(unknown)}")
        super().__init__({**COMMON_DEFAULTS, **self.defaults, **config}, data)
        check_prediction(self.config["prediction"])
        check_options(self.config["sampler"], self.config["sampler_options"])
        self.process = self.build_process()
        self.net = build_denoiser(self.config, data)

    @abstractmethod
    def build_process(self) -> GaussianProcess:
        """The process this method noises with, from its config."""

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The denoising loss of the target given the source slices."""
        source = batch["source"]
        return denoising_loss(self.process, self.config["prediction"], lambda x_t, t: self._network(x_t, source, t),
                              batch["target"], generator, mask=batch["mask"] if self.config["masked_loss"] else None)

    def _network(self, x_t: torch.Tensor, source: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale = per_sample(self.process.input_scale(t), x_t)
        return self.net(x_t * scale, source, self.process.network_time(t))

    def denoiser(self, source: torch.Tensor) -> Denoise:
        """The network as samplers see it, x_t, t -> (x0_hat, eps_hat), conditioned on `source`."""
        return read_out(self.process, self.config["prediction"], self.config["clip"],
                        lambda x_t, t: self._network(x_t, source, t))

    def sampling_denoiser(self, source: torch.Tensor, generator: torch.Generator) -> Denoise:
        """What translation samples with: `denoiser(source)`; a method whose condition is itself random
        (unit-ddpm conditions on the noisy source) draws it from `generator`."""
        return self.denoiser(source)

    @torch.no_grad()
    def translate(
        self,
        source: torch.Tensor,
        generator: torch.Generator,
        samples: int = 1,
        *,
        sampler: str | None = None,
        steps: int | None = None,
        batch: int | None = None,
        **options: Any,
    ) -> Translation:
        """Draw `samples` target images per source slice. sampler/steps/batch default to the config;
        `options` are the sampler's (eta; predictor, snr, corrector_steps; solver, rtol, atol)."""
        name, steps, options = sampling_settings(self.config, sampler, steps, options)
        shape = (self.data.target_channels, *source.shape[-2:])

        def draw(chunk: torch.Tensor) -> SampleResult:
            start = self.process.prior_sample((chunk.shape[0], *shape), generator).to(source.device)
            return sample(name, self.sampling_denoiser(chunk, generator), self.process, start, steps, generator, **options)

        result = monte_carlo(draw, source, samples, int(self.config["batch"] if batch is None else batch))
        return Translation(result.x.clamp(-1.0, 1.0), result.nfe)


@register_method("cddpm", "conditional DDPM (discrete, linear/cosine schedule); samplers ddpm, ddim, em, pc, ode")
class ConditionalDDPM(_ConditionalDiffusion):
    """Conditional DDPM: T discrete noise levels; default sampling is 50-step DDIM (deterministic given
    the start noise, 20 times fewer network calls than ancestral sampling at T = 1000; in the STS_003
    comparison noted at the 'prediction' default, ddim at 20 steps and ddpm at 100 both scored L1 0.034)."""

    name = "cddpm"
    defaults: ClassVar[dict[str, Any]] = {"timesteps": 1000, "schedule": "linear", "sampler": "ddim", "steps": 50}

    def build_process(self) -> GaussianProcess:
        return DiscreteVP(int(self.config["timesteps"]), self.config["schedule"])


# Default sampling per SDE, from translations of 32-px STS_003 slices by v models trained 600 steps
# (L1 to the CT; the mean CT slice scores 0.096). VP: ode (Heun) 10/25/50 steps 0.038/0.040/0.041,
# pc 25/50/100 steps 0.13/0.077/0.053, ddim 20 0.037. VE: pc 25/50/100 steps 0.096/0.044/0.044,
# ode 20/50 0.066/0.065, ddim 50 0.064. PC on VE is also score_sde's choice.
SDE_SAMPLING: dict[str, dict[str, Any]] = {"vp": {"sampler": "ode", "steps": 25}, "ve": {"sampler": "pc", "steps": 50}}


@register_method("score-sde", "conditional score SDE (continuous VP or VE); samplers pc, em, ode, ddpm, ddim")
class ConditionalScoreSDE(_ConditionalDiffusion):
    """Conditional score-based SDE (Song et al. 2021) trained by denoising score matching (every
    prediction reads out a score; see 'prediction' for the weighting).

    `sampler` and `steps` None mean SDE_SAMPLING[sde] (49 NFE for VP, 100 for VE), and `sigma_max` None
    means sqrt(H W) of the slices (see VESDE for why); the values chosen are kept in the config, so a
    saved config rebuilds the same method.
    """

    name = "score-sde"
    defaults: ClassVar[dict[str, Any]] = {
        "sde": "vp",
        "beta_min": 0.1,
        "beta_max": 20.0,
        "sigma_min": 0.01,
        "sigma_max": None,
        "sampler": None,
        "steps": None,
    }

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        sde = config.get("sde", self.defaults["sde"])
        chosen = {**SDE_SAMPLING.get(sde, SDE_SAMPLING["vp"]), "sigma_max": math.sqrt(data.size[0] * data.size[1])}
        given = {key: value for key, value in config.items() if value is not None}
        super().__init__({**chosen, **given}, data)

    def build_process(self) -> GaussianProcess:
        kind = self.config["sde"]
        if kind == "vp":
            return VPSDE(float(self.config["beta_min"]), float(self.config["beta_max"]))
        if kind == "ve":
            return VESDE(float(self.config["sigma_min"]), float(self.config["sigma_max"]))
        raise CrossdiffError(f"unknown sde {kind!r}; choose one of {', '.join(SDES)}")
