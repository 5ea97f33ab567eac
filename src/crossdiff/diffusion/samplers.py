"""How a Gaussian process is walked back from noise: one plain function per sampler (as in k-diffusion),
registered in SAMPLERS under the name the command line uses.

Every sampler has the signature

    sampler(denoise, process, x, steps, generator, **options) -> SampleResult(x, nfe)

where `denoise(x, t) -> (x0_hat, eps_hat)` wraps the network for times t (B,), `x` is the start
x_1 ~ prior, and every random number comes from `generator`. The network is evaluated at
`process.time_grid(steps)` (1 = t_0 > ... > t_{n-1} = t_min) and, as is standard (DDPM's last step,
score_sde's `denoise=True`), the result is the x0_hat of the evaluation at t_min. NFE is counted by
wrapping `denoise`, so it is exact rather than a formula: n for ddpm, ddim and em; n (1 + corrector
steps) for pc; 2 n - 1 for the Heun ODE; the solver's evaluations + 1 for the adaptive ODE.

Use `sample(name, ...)`, which rejects unknown samplers and options with a CrossdiffError.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.integrate import solve_ivp

from crossdiff.diffusion.predictions import score
from crossdiff.diffusion.processes import GaussianProcess, per_sample, standard_normal
from crossdiff.errors import CrossdiffError

Denoise = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# One move from time t to the next grid time s, given x_t and the network's (x0_hat, eps_hat) at t.
Step = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

PREDICTORS = ("reverse-diffusion", "em")
SOLVERS = ("heun", "rk45")


@dataclass
class SampleResult:
    x: torch.Tensor
    nfe: int


class _Counted:
    """Counts calls of a denoiser: the NFE every sampler reports."""

    def __init__(self, denoise: Denoise) -> None:
        self.denoise = denoise
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        return self.denoise(x, t)


def _times(value: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (B,) time tensor for the batch x."""
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=x.dtype)


def _walk(denoise: _Counted, process: GaussianProcess, x: torch.Tensor, steps: int, step: Step) -> SampleResult:
    """Evaluate the network once per grid time and move with `step` to the next one; return x0_hat at t_min."""
    grid = process.time_grid(steps)
    for now, after in itertools.pairwise(grid):
        t = _times(now, x)
        x0_hat, eps_hat = denoise(x, t)
        x = step(x, t, _times(after, x), x0_hat, eps_hat)
    return SampleResult(denoise(x, _times(grid[-1], x))[0], denoise.calls)


def _transition(
    process: GaussianProcess, t: torch.Tensor, s: torch.Tensor, like: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """alpha_s, sigma_s, sigma_t, alpha_t / alpha_s and the variance sigma_t^2 - (alpha_t / alpha_s)^2
    sigma_s^2 of q(x_t | x_s), the forward transition between two grid times (Kingma et al. 2021, VDM)."""
    alpha_t, sigma_t = per_sample(process.alpha(t), like), per_sample(process.sigma(t), like)
    alpha_s, sigma_s = per_sample(process.alpha(s), like), per_sample(process.sigma(s), like)
    ratio = alpha_t / alpha_s
    return alpha_s, sigma_s, sigma_t, ratio, (sigma_t**2 - ratio**2 * sigma_s**2).clamp(min=0.0)


def ddpm(
    denoise: Denoise, process: GaussianProcess, x: torch.Tensor, steps: int, generator: torch.Generator
) -> SampleResult:
    """Ancestral sampling from the posterior q(x_s | x_t, x0 = x0_hat) (Ho et al. 2020, eqs. 6-7, in the
    general alpha/sigma form of Kingma et al. 2021, VDM, appendix A); with fewer steps than T it skips
    grid times, the posterior being exact between any two."""

    def step(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, x0_hat: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        alpha_s, sigma_s, sigma_t, ratio, variance = _transition(process, t, s, x)
        mean = (ratio * sigma_s**2 * x + alpha_s * variance * x0_hat) / sigma_t**2
        return mean + torch.sqrt(variance) * sigma_s / sigma_t * standard_normal(x, generator)

    return _walk(_Counted(denoise), process, x, steps, step)


def ddim(
    denoise: Denoise,
    process: GaussianProcess,
    x: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    *,
    eta: float = 0.0,
) -> SampleResult:
    """DDIM (Song, Meng & Ermon 2021, eq. 12): x_s = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,
    c = eta times the posterior standard deviation; eta = 0 is deterministic, eta = 1 is ddpm."""
    if not 0.0 <= eta <= 1.0:
        raise CrossdiffError(f"ddim needs 0 <= eta <= 1, not {eta}")

    def step(
        x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, x0_hat: torch.Tensor, eps_hat: torch.Tensor
    ) -> torch.Tensor:
        alpha_s, sigma_s, sigma_t, _, variance = _transition(process, t, s, x)
        c = eta * torch.sqrt(variance) * sigma_s / sigma_t
        return alpha_s * x0_hat + torch.sqrt(sigma_s**2 - c**2) * eps_hat + c * standard_normal(x, generator)

    return _walk(_Counted(denoise), process, x, steps, step)


def _euler_maruyama_step(process: GaussianProcess, generator: torch.Generator) -> Step:
    """Euler-Maruyama on the reverse SDE dx = [f - g^2 score] dt + g dw (Song et al. 2021, eq. 6),
    stepping backwards by t - s."""

    def step(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, _: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
        drift, g = process.sde(x, t)
        g, dt = per_sample(g, x), per_sample(t - s, x)
        reverse_drift = drift - g**2 * score(eps_hat, per_sample(process.sigma(t), x))
        return x - reverse_drift * dt + g * torch.sqrt(dt) * standard_normal(x, generator)

    return step


def _reverse_diffusion_step(process: GaussianProcess, generator: torch.Generator) -> Step:
    """score_sde's ReverseDiffusionPredictor: discretise the forward process between the grid times as
    x_t = x_s + f_d + G z with f_d = (alpha_t / alpha_s - 1) x, G^2 the transition variance, and reverse
    it as x_s = x_t - f_d + G^2 score + G z (Song et al. 2021, appendix E)."""

    def step(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, _: torch.Tensor, eps_hat: torch.Tensor) -> torch.Tensor:
        _, _, sigma_t, ratio, variance = _transition(process, t, s, x)
        mean = (2.0 - ratio) * x + variance * score(eps_hat, sigma_t)
        return mean + torch.sqrt(variance) * standard_normal(x, generator)

    return step


def em(
    denoise: Denoise, process: GaussianProcess, x: torch.Tensor, steps: int, generator: torch.Generator
) -> SampleResult:
    """Euler-Maruyama on the reverse-time SDE (Song et al. 2021, eq. 6; score_sde's EulerMaruyamaPredictor)."""
    return _walk(_Counted(denoise), process, x, steps, _euler_maruyama_step(process, generator))


def _langevin(
    denoise: _Counted,
    process: GaussianProcess,
    x: torch.Tensor,
    t: torch.Tensor,
    generator: torch.Generator,
    snr: float,
    corrector_steps: int,
) -> torch.Tensor:
    """Langevin corrector at time t (Song et al. 2021, Algorithms 4-5; score_sde's LangevinCorrector):
    step size 2 alpha (snr |z| / |score|)^2 with alpha = (alpha(t) / alpha(t - resolution))^2, i.e.
    1 - beta_i for VP and 1 for VE. Norms are per sample (score_sde takes the batch mean), so a slice's
    result does not depend on which slices share its batch."""
    earlier = (t - process.resolution).clamp(min=0.0)
    alpha = per_sample((process.alpha(t) / process.alpha(earlier)) ** 2, x)
    sigma = per_sample(process.sigma(t), x)
    for _ in range(corrector_steps):
        grad = score(denoise(x, t)[1], sigma)
        noise = standard_normal(x, generator)
        ratio = noise.flatten(1).norm(dim=1) / grad.flatten(1).norm(dim=1).clamp(min=1e-12)
        step_size = 2.0 * alpha * per_sample(snr * ratio, x) ** 2
        x = x + step_size * grad + torch.sqrt(2.0 * step_size) * noise
    return x


def pc(
    denoise: Denoise,
    process: GaussianProcess,
    x: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    *,
    predictor: str = "reverse-diffusion",
    snr: float = 0.16,
    corrector_steps: int = 1,
) -> SampleResult:
    """Predictor-corrector sampling (Song et al. 2021, Algorithms 2-3): at every grid time
    `corrector_steps` Langevin steps, then one predictor step ('reverse-diffusion' or 'em') to the next.
    snr 0.16 is score_sde's CIFAR-10 setting."""
    if predictor not in PREDICTORS:
        raise CrossdiffError(f"unknown predictor {predictor!r}; choose one of {', '.join(PREDICTORS)}")
    if snr <= 0.0 or corrector_steps < 0:
        raise CrossdiffError(f"pc needs snr > 0 and corrector_steps >= 0, not {snr} and {corrector_steps}")
    counted = _Counted(denoise)
    move = (_reverse_diffusion_step if predictor == "reverse-diffusion" else _euler_maruyama_step)(process, generator)

    def correct(at: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return _langevin(counted, process, x, at, generator, snr, corrector_steps)

    def step(
        x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, x0_hat: torch.Tensor, eps_hat: torch.Tensor
    ) -> torch.Tensor:
        return correct(s, move(x, t, s, x0_hat, eps_hat))

    first = _times(process.time_grid(steps)[0], x)
    return _walk(counted, process, correct(first, x), steps, step)


def _heun_step(denoise: _Counted, process: GaussianProcess) -> Step:
    """Heun's method (Karras et al. 2022, EDM, Algorithm 1) on the probability-flow ODE written as
    d(x / sigma) / d(alpha / sigma) = x0_hat, the data-prediction form of Lu et al. 2022 (DPM-Solver++);
    its Euler step is exactly DDIM. Unlike EDM's x / alpha against sigma / alpha, it stays well
    conditioned where alpha -> 0 (the cosine schedule's t = 1) and sigma -> 0 (t_min)."""

    def step(x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, x0_hat: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
        sigma_t, sigma_s = per_sample(process.sigma(t), x), per_sample(process.sigma(s), x)
        change = per_sample(process.alpha(s) / process.sigma(s) - process.alpha(t) / process.sigma(t), x)
        scaled = x / sigma_t
        guess = sigma_s * (scaled + change * x0_hat)
        return sigma_s * (scaled + change * 0.5 * (x0_hat + denoise(guess, s)[0]))

    return step


def ode(
    denoise: Denoise,
    process: GaussianProcess,
    x: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    *,
    solver: str = "heun",
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> SampleResult:
    """Probability-flow ODE (Song et al. 2021, eq. 13) from t = 1 to t_min, then x0_hat there. 'heun'
    (default): second-order Heun on the `steps` grid times, 2 steps - 1 NFE (rtol/atol unused); 'rk45':
    adaptive Runge-Kutta of scipy's solve_ivp in t with rtol/atol, as score_sde's ode_sampler (`steps`
    unused; NFE is what the tolerances need). Deterministic given x: `generator` is not used."""
    if solver not in SOLVERS:
        raise CrossdiffError(f"unknown ODE solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    counted = _Counted(denoise)
    if solver == "heun":
        return _walk(counted, process, x, steps, _heun_step(counted, process))
    if rtol <= 0.0 or atol <= 0.0:
        raise CrossdiffError(f"the ODE tolerances must be > 0, not rtol={rtol} and atol={atol}")
    shape, dtype = x.shape, x.dtype

    def velocity(t: float, flat: np.ndarray) -> np.ndarray:
        """dx/dt = f - g^2 score / 2."""
        state = torch.from_numpy(flat).reshape(shape).to(device=x.device, dtype=dtype)
        time = _times(t, state)
        drift, g = process.sde(state, time)
        score_hat = score(counted(state, time)[1], per_sample(process.sigma(time), state))
        return (drift - 0.5 * per_sample(g, state) ** 2 * score_hat).double().cpu().numpy().ravel()

    start = x.double().cpu().numpy().ravel()
    solution = solve_ivp(velocity, (1.0, process.t_min), start, method="RK45", rtol=rtol, atol=atol)
    if not solution.success:
        raise CrossdiffError(f"the probability-flow ODE solver failed: {solution.message}")
    end = torch.from_numpy(solution.y[:, -1]).reshape(shape).to(device=x.device, dtype=dtype)
    return SampleResult(counted(end, _times(process.t_min, end))[0], counted.calls)


SAMPLERS: dict[str, Callable[..., SampleResult]] = {"ddpm": ddpm, "ddim": ddim, "em": em, "pc": pc, "ode": ode}


def sampler_options(name: str) -> dict[str, Any]:
    """The options a sampler accepts, with their defaults."""
    if name not in SAMPLERS:
        raise CrossdiffError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    parameters = inspect.signature(SAMPLERS[name]).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def check_options(name: str, options: dict[str, Any]) -> None:
    """Refuse options that sampler `name` does not take, naming the ones it does."""
    accepted = sampler_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = ", ".join(accepted) or "no options"
        raise CrossdiffError(f"sampler {name!r} does not take {', '.join(unknown)} (it takes {takes})")


@torch.no_grad()
def sample(
    name: str,
    denoise: Denoise,
    process: GaussianProcess,
    x: torch.Tensor,
    steps: int,
    generator: torch.Generator,
    **options: Any,
) -> SampleResult:
    """Run sampler `name` without autograd (sampling never needs gradients); unknown samplers and
    options are a CrossdiffError."""
    check_options(name, options)
    return SAMPLERS[name](denoise, process, x, steps, generator, **options)
