"""`syndiff` (Ozbey et al., IEEE TMI 2023): adversarial diffusion that walks back in a few large steps.

The forward process is the VP schedule (beta 0.1 to 20) over `timesteps` = 1000 indices, visited only
at the `steps` + 1 grid points 0, k, 2k, ..., T (k = T / steps = 250 by default), so one step is
x_t = sqrt(1 - gamma_t) x_{t-k} + sqrt(gamma_t) eps with 1 - gamma_t = alpha_bar_t / alpha_bar_{t-k}.
Such a step is far from Gaussian in reverse, so instead of a Gaussian denoiser a conditional GAN
learns it: the generator G(x_t, y, t, z) predicts x0 from the noisy target, the source slices y,
the step and a latent z (crossdiff.nets.syndiff), and x_{t-k} is drawn from the posterior
q(x_{t-k} | x_t, x0 = G(...)). A time-conditioned discriminator D(x_{t-k}, x_t, t) tells true posterior
samples from generated ones (non-saturating softplus losses, R1 penalty on the true samples every
`r1_every` steps, scaled by the interval as in StyleGAN2's lazy regularisation). Paired training
adds `l1_weight` x L1(G(...), x0). Sampling starts from N(0, I) and makes `steps` generator calls;
z and the posterior noise make it stochastic, so Monte-Carlo draws give an uncertainty map.

SynDiff's unpaired mode is `syndiff-unpaired` (UnpairedSynDiffMethod, below).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from crossdiff.diffusion.processes import VPSDE, per_sample, standard_normal
from crossdiff.diffusion.samplers import SampleResult
from crossdiff.diffusion.uncertainty import monte_carlo
from crossdiff.errors import CrossdiffError
from crossdiff.methods import register_method
from crossdiff.methods.base import DataSpec, Method, StepContext, Translation, check_single_slices
from crossdiff.methods.unet import adamw, checked_settings
from crossdiff.nets.gan import PatchGAN, ResnetGenerator
from crossdiff.nets.syndiff import SynDiffGenerator, TimeDiscriminator

SYNDIFF_DEFAULTS: dict[str, Any] = {
    "timesteps": 1000,
    "steps": 4,  # k = timesteps / steps = 250
    "beta_min": 0.1,
    "beta_max": 20.0,
    "channels": [32, 64, 128],
    "latent": 32,  # SynDiff: 100; small here for the CPU
    "embedding": 64,
    "discriminator_channels": [32, 64, 128],
    "critic": "global",  # or 'patch': deeper residual critic with patch logits (SynDiff's large discriminator)
    "l1_weight": 0.5,
    "r1_weight": 1.0,  # SynDiff's r1_gamma
    "r1_every": 1,  # lazy R1: penalise every N-th step only
    "lr": 1.6e-4,  # SynDiff's generator rate
    "discriminator_lr": 1e-4,
    "betas": [0.5, 0.9],
    "weight_decay": 0.0,
    "batch": 16,  # slice-draws sampled at once
}


CRITICS = ("global", "patch")


@dataclass(frozen=True)
class LargeSteps:
    """The forward process at its grid points t_j = j k (j = 0..n): x_{t_j} = alpha_j x0 + sigma_j eps."""

    times: torch.Tensor  # (n + 1,) step indices 0, k, ..., T: what the networks see as t
    alpha: torch.Tensor
    sigma: torch.Tensor

    @classmethod
    def make(cls, timesteps: int, steps: int, beta_min: float, beta_max: float) -> LargeSteps:
        if steps < 1 or timesteps % steps:
            raise CrossdiffError(f"syndiff steps must divide timesteps ({timesteps}), not {steps}")
        times = torch.arange(steps + 1, dtype=torch.float64) * (timesteps // steps)
        process = VPSDE(beta_min, beta_max)
        alpha, sigma = process.alpha(times / timesteps), process.sigma(times / timesteps)
        return cls(times.float(), alpha.float(), sigma.float())

    @property
    def steps(self) -> int:
        return len(self.times) - 1

    def _at(self, values: torch.Tensor, j: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return per_sample(values[j.cpu()].to(like.device), like)

    def gamma(self, j: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return 1.0 - (self._at(self.alpha, j, like) / self._at(self.alpha, j - 1, like)) ** 2

    def noisy_pair(self, x0: torch.Tensor, j: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_{t_{j-1}}, x_{t_j}) from q: the earlier marginal, then one large forward step."""
        earlier = self._at(self.alpha, j - 1, x0) * x0 + self._at(self.sigma, j - 1, x0) * standard_normal(x0, generator)
        gamma = self.gamma(j, x0)
        return earlier, (1.0 - gamma).sqrt() * earlier + gamma.sqrt() * standard_normal(x0, generator)

    def _posterior_parts(self, j: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """gamma_j, sigma_j^2, sigma_{j-1}^2 and alpha_{j-1}: what q(x_{t_{j-1}} | x_{t_j}, x0) is made of."""
        return (self.gamma(j, like), self._at(self.sigma, j, like) ** 2, self._at(self.sigma, j - 1, like) ** 2,
                self._at(self.alpha, j - 1, like))

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, j: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A draw of q(x_{t_{j-1}} | x_{t_j}, x0); at j = 1 it is x0 itself (zero variance)."""
        gamma, variance, earlier_variance, earlier_alpha = self._posterior_parts(j, x_t)
        mean = (earlier_alpha * gamma * x0 + (1.0 - gamma).sqrt() * earlier_variance * x_t) / variance
        return mean + (gamma * earlier_variance / variance).sqrt() * standard_normal(x_t, generator)

    def posterior_terms(self, j: int) -> tuple[float, float]:
        """(c_j, s_j): the weight of x0 in the posterior's mean and its std, so a generated step's distance from
        a true one (c_j |x0 - x0_hat| against s_j) can be read off."""
        gamma, variance, earlier_variance, earlier_alpha = self._posterior_parts(torch.tensor([j]), torch.zeros(1))
        return float(earlier_alpha * gamma / variance), float((gamma * earlier_variance / variance).sqrt())


@dataclass
class ReverseStep:
    """One training step's images: the generator's x0 estimate, the true earlier image x_{t-k}, the
    generated one (posterior draw given the estimate), the later image x_t and its step index t."""

    x0_hat: torch.Tensor
    real: torch.Tensor
    fake: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor


@register_method("syndiff", "SynDiff: adversarial diffusion, 4 large steps, GAN-learnt reverse steps (+ L1); paired; stochastic")
class SynDiffMethod(Method):
    name: ClassVar[str] = "syndiff"
    stochastic: ClassVar[bool] = True
    paired: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = SYNDIFF_DEFAULTS

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        super().__init__(checked_settings(self.name, self.defaults, config), data)
        c = self.config
        if int(c["r1_every"]) < 1:
            raise CrossdiffError(f"syndiff r1_every must be >= 1, not {c['r1_every']}")
        self.schedule = self._schedule(int(c["steps"]))
        self.generator = SynDiffGenerator(data.target_channels, data.source_channels, c["channels"],
                                          int(c["latent"]), int(c["embedding"]))
        if c["critic"] not in CRITICS:
            raise CrossdiffError(f"syndiff critic must be one of {', '.join(CRITICS)}, not {c['critic']!r}")
        self.discriminator = self._critic(data.target_channels)
        self._optimizers: dict[str, tuple[torch.optim.Optimizer, list[str]]] | None = None

    def _critic(self, channels: int) -> TimeDiscriminator:
        c = self.config
        return TimeDiscriminator(channels, c["discriminator_channels"], int(c["embedding"]), patch=c["critic"] == "patch")

    def _schedule(self, steps: int) -> LargeSteps:
        c = self.config
        return LargeSteps.make(int(c["timesteps"]), steps, float(c["beta_min"]), float(c["beta_max"]))

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "discriminator": self.discriminator}

    def optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
        if self._optimizers is None:
            critic = {**self.config, "lr": self.config["discriminator_lr"]}
            self._optimizers = {
                "generator": (adamw(self.generator.parameters(), self.config), ["generator"]),
                "discriminator": (adamw(self.discriminator.parameters(), critic), ["discriminator"]),
            }
        return self._optimizers

    def _latent(self, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return standard_normal(like.new_empty(like.shape[0], int(self.config["latent"])), generator)

    def _reverse_step(self, network: nn.Module, x0: torch.Tensor, condition: torch.Tensor,
                      generator: torch.Generator, j: int | None = None) -> ReverseStep:
        """One random large step of x0's forward process (step `j` for every item, if given: a probe of the
        critic per step), and the network's walk back over it."""
        count = x0.shape[0]
        index = (torch.randint(1, self.schedule.steps + 1, (count,), generator=generator, device=generator.device).cpu()
                 if j is None else torch.full((count,), j, dtype=torch.long))
        t = self.schedule.times[index].to(x0.device)
        real, x_t = self.schedule.noisy_pair(x0, index, generator)
        x0_hat = network(x_t, condition, t, self._latent(x0, generator))
        return ReverseStep(x0_hat, real, self.schedule.posterior(x0_hat, x_t, index, generator), x_t, t)

    def _critic_loss(self, critic: nn.Module, step: ReverseStep, penalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Softplus loss of a time-conditioned critic on the true and generated earlier images (judged
        in one call: one forward per backward, as DDP wants), plus the lazy R1 penalty; and R1 alone."""
        real = step.real.detach().requires_grad_(penalise)
        on_real, on_fake = critic(torch.cat([real, step.fake.detach()]), torch.cat([step.x_t, step.x_t]),
                                  torch.cat([step.t, step.t])).float().chunk(2)
        loss = F.softplus(-on_real).mean() + F.softplus(on_fake).mean()
        if not penalise:
            return loss, torch.zeros((), device=loss.device)
        (gradient,) = torch.autograd.grad(on_real.sum(), real, create_graph=True)
        r1 = gradient.float().pow(2).flatten(1).sum(1).mean()
        return loss + 0.5 * float(self.config["r1_weight"]) * int(self.config["r1_every"]) * r1, r1

    def _penalise(self, context: StepContext) -> bool:
        return context.step % int(self.config["r1_every"]) == 0

    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        x0 = batch["target"]
        step = self._reverse_step(self.generator, x0, batch["source"], context.generator)
        critic, r1 = self._critic_loss(self.discriminator, step, self._penalise(context))
        context.optimize("discriminator", critic)

        # the generator's backward also fills the discriminator's gradients; its next step zeroes them
        adversarial = F.softplus(-self.discriminator(step.fake, step.x_t, step.t).float()).mean()
        l1 = (step.x0_hat - x0).abs().mean()
        loss = adversarial + float(self.config["l1_weight"]) * l1
        context.optimize("generator", loss)
        logged = {"loss": loss, "adversarial": adversarial, "l1": l1, "discriminator": critic, "r1": r1}
        return {key: float(value.detach()) for key, value in logged.items()}

    @torch.no_grad()
    def validation_metrics(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, float]:
        """How well the critic tells true from generated x_{t-k} on held-out slices: the share of true
        samples it scores real (logit > 0) and of generated ones it scores fake. 0.5 each is chance: the
        adversarial term then gives the generator nothing to learn from."""
        step = self._reverse_step(self.generator, batch["target"], batch["source"], generator)
        on_real = self.discriminator(step.real, step.x_t, step.t).float()
        on_fake = self.discriminator(step.fake, step.x_t, step.t).float()
        return {"critic_real_accuracy": float((on_real > 0).float().mean()),
                "critic_fake_accuracy": float((on_fake < 0).float().mean())}

    @torch.no_grad()
    def translate(
        self, source: torch.Tensor, generator: torch.Generator, samples: int = 1, *, steps: int | None = None,
        **options: Any,
    ) -> Translation:
        """`samples` draws per slice, each `steps` generator calls (default: the trained grid; another
        divisor of `timesteps` asks the generator about steps it never learnt)."""
        if options:
            raise CrossdiffError(f"syndiff takes only the translation option steps (got {', '.join(sorted(options))})")
        schedule = self.schedule if steps is None else self._schedule(int(steps))
        shape = (self.data.target_channels, *source.shape[-2:])

        def draw(chunk: torch.Tensor) -> SampleResult:
            x = standard_normal(chunk.new_empty(chunk.shape[0], *shape), generator)
            for step in range(schedule.steps, 0, -1):
                j = torch.full((chunk.shape[0],), step)
                x0_hat = self.generator(x, chunk, schedule.times[j].to(x.device), self._latent(x, generator))
                x = schedule.posterior(x0_hat, x, j, generator)
            return SampleResult(x, schedule.steps)

        result = monte_carlo(draw, source, samples, int(self.config["batch"]))
        return Translation(result.x.float().clamp(-1.0, 1.0), result.nfe)


UNPAIRED_DEFAULTS: dict[str, Any] = {
    **{key: value for key, value in SYNDIFF_DEFAULTS.items() if key != "l1_weight"},
    "cycle_weight": 0.5,  # lambda_1theta: cycle through the diffusive generators
    "estimator_cycle_weight": 0.5,  # lambda_1phi: cycle through the non-diffusive estimators
    "adversarial_weight": 1.0,
    "filters": 32,  # the non-diffusive ResNet estimators (CycleGAN's ResnetGenerator)
    "blocks": 4,
    "critic_filters": 32,  # their PatchGAN critics
    "critic_layers": 3,
}


@register_method("syndiff-unpaired", "SynDiff, unpaired: diffusive generators cycled through non-diffusive "
                                     "ResNet estimators, both directions; 2-D; stochastic")
class UnpairedSynDiffMethod(SynDiffMethod):
    """SynDiff's unpaired mode, registered under its own name because `paired` is a class attribute
    (it decides which dataset `crossdiff train` builds).

    Non-diffusive estimators (ResNet generators with PatchGAN critics) map each source slice a to a
    target estimate and each target slice b to a source estimate. The diffusive generators learn
    b from noisy b given the source estimate of b (`generator`, the one translation uses, with the
    real source then) and a from noisy a given the target estimate of a (`reverse_generator`), so
    their L1 to the real b and a closes the cycle b -> source estimate -> b (weight `cycle_weight`);
    the estimators' own cycle a -> target estimate -> a, b -> source estimate -> b has
    `estimator_cycle_weight`. All four generators learn jointly against four critics (softplus
    adversarial terms, weight `adversarial_weight`). Slices must be 2-D (`slices.context: 0`), as the
    estimators turn one slice into one slice.
    """

    name: ClassVar[str] = "syndiff-unpaired"
    paired: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = UNPAIRED_DEFAULTS

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        check_single_slices(self.name, data)
        super().__init__(config, data)
        c, channels = self.config, data.source_channels
        self.reverse_generator = SynDiffGenerator(channels, channels, c["channels"], int(c["latent"]), int(c["embedding"]))
        self.reverse_discriminator = self._critic(channels)
        self.target_estimator, self.source_estimator, self.target_critic, self.source_critic = estimators(c, channels)

    def modules(self) -> dict[str, nn.Module]:
        return {"generator": self.generator, "reverse_generator": self.reverse_generator,
                "target_estimator": self.target_estimator, "source_estimator": self.source_estimator,
                "discriminator": self.discriminator, "reverse_discriminator": self.reverse_discriminator,
                "target_critic": self.target_critic, "source_critic": self.source_critic}

    def optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
        if self._optimizers is None:
            critic = {**self.config, "lr": self.config["discriminator_lr"]}
            modules = self.modules()
            generators = ["generator", "reverse_generator", "target_estimator", "source_estimator"]
            critics = ["discriminator", "reverse_discriminator", "target_critic", "source_critic"]
            self._optimizers = {
                "generators": (adamw([p for name in generators for p in modules[name].parameters()], self.config), generators),
                "discriminators": (adamw([p for name in critics for p in modules[name].parameters()], critic), critics),
            }
        return self._optimizers

    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        a, b, g = batch["source"], batch["target"], context.generator
        b_estimate, a_estimate = self.target_estimator(a), self.source_estimator(b)
        to_b = self._reverse_step(self.generator, b, a_estimate, g)
        to_a = self._reverse_step(self.reverse_generator, a, b_estimate, g)

        penalise = self._penalise(context)
        critic_b, r1_b = self._critic_loss(self.discriminator, to_b, penalise)
        critic_a, r1_a = self._critic_loss(self.reverse_discriminator, to_a, penalise)
        estimates = (patch_critic_loss(self.target_critic, b, b_estimate.detach())
                     + patch_critic_loss(self.source_critic, a, a_estimate.detach()))
        critics = critic_b + critic_a + estimates
        context.optimize("discriminators", critics)

        # the generators' backward also fills the critics' gradients; their next step zeroes them
        adversarial = sum(F.softplus(-logits.float()).mean() for logits in (
            self.discriminator(to_b.fake, to_b.x_t, to_b.t), self.reverse_discriminator(to_a.fake, to_a.x_t, to_a.t),
            self.target_critic(b_estimate), self.source_critic(a_estimate)))
        cycle = (to_b.x0_hat - b).abs().mean() + (to_a.x0_hat - a).abs().mean()
        estimator_cycle = ((self.source_estimator(b_estimate) - a).abs().mean()
                           + (self.target_estimator(a_estimate) - b).abs().mean())
        loss = (float(self.config["adversarial_weight"]) * adversarial + float(self.config["cycle_weight"]) * cycle
                + float(self.config["estimator_cycle_weight"]) * estimator_cycle)
        context.optimize("generators", loss)
        logged = {"loss": loss, "adversarial": adversarial, "cycle": cycle, "estimator_cycle": estimator_cycle,
                  "discriminators": critics, "r1": r1_a + r1_b}
        return {key: float(value.detach()) for key, value in logged.items()}


def estimators(config: dict[str, Any], channels: int) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """SynDiff's non-diffusive module (also cycle-ddpm's): the source -> target and target -> source
    ResNet estimators (`filters`, `blocks`) and their PatchGAN critics (`critic_filters`, `critic_layers`)."""
    estimator = {"filters": int(config["filters"]), "blocks": int(config["blocks"])}
    critic = (int(config["critic_filters"]), int(config["critic_layers"]))
    return (ResnetGenerator(channels, channels, **estimator), ResnetGenerator(channels, channels, **estimator),
            PatchGAN(channels, *critic), PatchGAN(channels, *critic))


def patch_critic_loss(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Softplus loss of a PatchGAN critic on real and estimated images, judged in one call."""
    on_real, on_fake = critic(torch.cat([real, fake])).float().chunk(2)
    return F.softplus(-on_real).mean() + F.softplus(on_fake).mean()
