"""What a diffusion process is, kept apart from how a sampler walks it back (as score_sde_pytorch's
`sde_lib.py` is kept apart from its `sampling.py`).

Every process here is Gaussian: x_t = alpha(t) x0 + sigma(t) eps with eps ~ N(0, I) and continuous
t in [0, 1], and also the forward SDE dx = f(x, t) dt + g(t) dw whose marginals those are. The
discrete DDPM is included by extending its table of alphas_cumprod to continuous time, so every
sampler (ancestral, DDIM, SDE, probability-flow ODE) runs on every process.

Times are (B,) tensors, one per sample, and so are alpha, sigma and g; use `per_sample` to broadcast.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch

from crossdiff.diffusion.streams import normal
from crossdiff.errors import CrossdiffError

SCHEDULES = ("linear", "cosine")
NETWORK_TIME_SCALE = 999.0  # continuous t -> the 0..999 range of DDPM indices the UNet's embedding expects


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1), to broadcast per-sample coefficients against images like `like`."""
    return values.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def standard_normal(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """N(0, I) shaped like `like`, drawn on the generator's device so a seed gives the same numbers
    whatever device the images are on (per batch row for crossdiff.diffusion.streams.ItemStreams)."""
    return normal(like.shape, generator, like.dtype).to(like.device)


class GaussianProcess(ABC):
    """x_t = alpha(t) x0 + sigma(t) eps for t in [0, 1]; samplers start at t = 1 and stop at `t_min`.

    `prior_std`: the standard deviation of x_1 the samplers start from. `max_steps`: the most sampling
    steps the process allows (T for a discrete model, None for continuous ones). `resolution`: the
    time step of the process's own discretisation (1/T, or 1/1000 for SDEs as in score_sde's N = 1000),
    which fixes the Langevin corrector's alpha.
    """

    t_min: float
    prior_std: float = 1.0
    max_steps: int | None = None
    resolution: float = 1e-3

    @abstractmethod
    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """Scale of the data in x_t."""

    @abstractmethod
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Standard deviation of the noise in x_t."""

    @abstractmethod
    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift f(x, t) (shaped like x) and diffusion g(t) (B,) of the forward SDE dx = f dt + g dw
        (Song et al. 2021, eq. 5), chosen so its marginals are exactly x_t above."""

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """What the UNet's time embedding receives: 999 t, as score_sde feeds its continuous VP models."""
        return NETWORK_TIME_SCALE * t

    def sample_time(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Training times, uniform on [t_min, 1] (score_sde's continuous training)."""
        u = torch.rand(batch, generator=generator, device=generator.device, dtype=torch.float64)
        return (self.t_min + (1.0 - self.t_min) * u).float()

    def time_grid(self, steps: int) -> torch.Tensor:
        """The `steps` times a sampler evaluates the network at, from 1 down to t_min (float64)."""
        _check_steps(steps, self.max_steps)
        return torch.linspace(1.0, self.t_min, steps, dtype=torch.float64)

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        """x_1 ~ N(0, prior_std^2 I) on the generator's device (float32)."""
        return self.prior_std * normal(shape, generator)

    def input_scale(self, t: torch.Tensor) -> torch.Tensor:
        """1 / sqrt(alpha^2 + sigma^2): brings x_t to about unit variance before the network (Karras et
        al. 2022, EDM, c_in with sigma_data = 1). It is 1 for VP processes and matters for VE ones, whose
        x_t reaches sigma_max = 50 or more."""
        return torch.rsqrt(self.alpha(t) ** 2 + self.sigma(t) ** 2)

    def perturb(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = alpha(t) x0 + sigma(t) noise."""
        return per_sample(self.alpha(t), x0) * x0 + per_sample(self.sigma(t), x0) * noise


class DiscreteVP(GaussianProcess):
    """DDPM (Ho et al. 2020): T noise levels with alphas_cumprod from a beta schedule; network time = index.

    Index i (0..T-1) sits at t = (i + 1) / T. Between those times log(alphas_cumprod) is interpolated
    linearly (with alphas_cumprod = 1 at t = 0), which makes the process a VP SDE with piecewise constant
    beta(t) = -T log(1 - beta_i): on the grid it is exactly the DDPM, and off it the SDE and ODE samplers
    still have a well-defined process.
    """

    def __init__(self, steps: int = 1000, schedule: str = "linear") -> None:
        if steps < 1:
            raise CrossdiffError(f"the number of diffusion steps T must be >= 1, not {steps}")
        self.steps = int(steps)
        self.schedule = schedule
        self.betas = beta_schedule(schedule, self.steps)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)
        self._log_alpha_bar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.log(self.alphas_cumprod)])
        self._tables: dict[torch.device, torch.Tensor] = {}  # the table per device: one copy, not one per call
        self.t_min = 1.0 / self.steps
        self.max_steps = self.steps
        self.resolution = 1.0 / self.steps

    def _segment(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Node log-alpha-bar values at both ends of t's segment, and t's fraction along it."""
        table = self._tables.get(t.device)
        if table is None:
            table = self._tables[t.device] = self._log_alpha_bar.to(t.device)
        position = t.double().clamp(0.0, 1.0) * self.steps
        left = position.floor().clamp(max=self.steps - 1)
        index = left.long()
        return table[index], table[index + 1], position - left

    def _log_alpha_bar_at(self, t: torch.Tensor) -> torch.Tensor:
        start, end, fraction = self._segment(t)
        return start + fraction * (end - start)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(0.5 * self._log_alpha_bar_at(t)).to(t.dtype)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(self._log_alpha_bar_at(t))).to(t.dtype)

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end, _ = self._segment(t)
        beta = (self.steps * (start - end)).to(t.dtype)
        return -0.5 * per_sample(beta, x) * x, torch.sqrt(beta)

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The DDPM index t T - 1 (fractional between grid times, which only SDE/ODE samplers visit)."""
        return t * self.steps - 1.0

    def sample_time(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """A uniform index i in 0..T-1, as t = (i + 1) / T (Ho et al. 2020, Algorithm 1)."""
        index = torch.randint(0, self.steps, (batch,), generator=generator, device=generator.device)
        return (index + 1).float() / self.steps

    def time_grid(self, steps: int) -> torch.Tensor:
        """`steps` evenly spaced indices from T - 1 down to 0, as DDIM chooses its sub-sequence
        (Song et al. 2021a, sec. 4.2); distinct because their spacing is at least one index."""
        _check_steps(steps, self.max_steps)
        index = torch.floor(torch.linspace(self.steps, 1.0, steps, dtype=torch.float64) + 0.5)
        return index / self.steps


class VPSDE(GaussianProcess):
    """Variance-preserving SDE, dx = -beta(t) x / 2 dt + sqrt(beta(t)) dw with beta linear in t
    (Song et al. 2021, eq. 11; the continuous limit of DDPM's linear schedule for beta_max = 20)."""

    t_min = 1e-3  # score_sde's sampling_eps for VP: below it sigma is too small for a stable score

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0) -> None:
        if not 0.0 <= beta_min < beta_max:
            raise CrossdiffError(f"need 0 <= beta_min < beta_max, not {beta_min} and {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def _log_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(self._log_alpha(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(2.0 * self._log_alpha(t)))

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        beta = self.beta_min + t * (self.beta_max - self.beta_min)
        return -0.5 * per_sample(beta, x) * x, torch.sqrt(beta)


class VESDE(GaussianProcess):
    """Variance-exploding SDE, dx = sqrt(d sigma^2 / dt) dw with sigma(t) = sigma_min (sigma_max /
    sigma_min)^t (Song et al. 2021, eq. 9; NCSN's geometric noise levels).

    sigma_max: Song & Ermon 2020 ("Improved techniques", Technique 1) take it as large as the largest
    Euclidean distance between training images, so that x_1 no longer tells images apart. Images in
    [-1, 1] of H x W pixels whose pixels differ by about 1 RMS are sqrt(H W) apart: 64 at 64 x 64,
    50 is about that for the 48-64 px slices used in quick runs, 256 at 256 x 256. The methods default
    to sqrt(H W); N(x0, sigma_max^2 I) then differs from the N(0, sigma_max^2 I) prior by a KL of
    |x0|^2 / (2 sigma_max^2), at most 0.5 nats per image.
    """

    t_min = 1e-5  # score_sde's sampling_eps for VE

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0) -> None:
        if not 0.0 < sigma_min < sigma_max:
            raise CrossdiffError(f"need 0 < sigma_min < sigma_max, not {sigma_min} and {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.prior_std = self.sigma_max

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.sigma(t) * math.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min))
        return torch.zeros_like(x), g


def beta_schedule(name: str, steps: int) -> torch.Tensor:
    """DDPM betas (float64). 'linear': 1e-4..0.02 for T = 1000 (Ho et al. 2020), scaled by 1000 / T for
    other T as improved-diffusion does, so the end point stays noise; 'cosine': Nichol & Dhariwal 2021,
    eq. 17, with offset s = 0.008 and betas clipped at 0.999."""
    if name == "linear":
        scale = 1000.0 / steps
        return torch.linspace(scale * 1e-4, min(scale * 0.02, 0.999), steps, dtype=torch.float64)
    if name == "cosine":
        edges = torch.arange(steps + 1, dtype=torch.float64) / steps
        alpha_bar = torch.cos((edges + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1.0 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise CrossdiffError(f"unknown beta schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def _check_steps(steps: int, most: int | None) -> None:
    if steps < 1 or (most is not None and steps > most):
        limit = f"1..{most}" if most is not None else ">= 1"
        raise CrossdiffError(f"sampling steps must be {limit} for this process, not {steps}")
