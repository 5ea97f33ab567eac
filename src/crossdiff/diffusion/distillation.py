"""Progressive distillation (Salimans & Ho, ICLR 2022): a student learns to make in one deterministic DDIM
step what its teacher makes in two, so each round halves the steps; what it needs, as plain functions.

The grid of an N-step sampler is t_k = 1 - k / N, k = 0..N, ending at t = 0 (alpha 1, sigma 0), so N steps
cost exactly N network calls (crossdiff.diffusion.samplers' grids end at t_min instead and spend one more
call there). On a discrete process the times are rounded to its T levels, which keeps the 2N grid's even
points on the N grid, as distillation needs. The DDIM step (eta 0) from t to s is

    x_s = alpha_s x0_hat + sigma_s (x_t - alpha_t x0_hat) / sigma_t,

and the student's target at x_t is the x0 whose single step lands where the teacher's two steps did
(Salimans & Ho, Algorithm 2): x0~ = (z_s - (sigma_s / sigma_t) x_t) / (alpha_s - (sigma_s / sigma_t) alpha_t).
"""

from __future__ import annotations

import itertools

import torch

from crossdiff.diffusion.processes import GaussianProcess, per_sample
from crossdiff.diffusion.samplers import Denoise, SampleResult
from crossdiff.errors import CrossdiffError


def step_grid(process: GaussianProcess, steps: int) -> torch.Tensor:
    """The N + 1 times 1 = t_0 > ... > t_N = 0 of an N-step sampler (float64), on the process's levels."""
    if steps < 1 or (process.max_steps is not None and steps > process.max_steps):
        raise CrossdiffError(f"distilled sampling takes 1..{process.max_steps or 'any'} steps, not {steps}")
    grid = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    if process.max_steps is not None:
        grid = torch.round(grid * process.max_steps) / process.max_steps
    return grid


def ddim_move(process: GaussianProcess, x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor,
              s: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM step from times t to s (B,); to s = 0 it is x0_hat."""
    alpha_t, sigma_t = per_sample(process.alpha(t), x_t), per_sample(process.sigma(t), x_t)
    alpha_s, sigma_s = per_sample(process.alpha(s), x_t), per_sample(process.sigma(s), x_t)
    return alpha_s * x0_hat + sigma_s * (x_t - alpha_t * x0_hat) / sigma_t


def two_step_target(process: GaussianProcess, x_t: torch.Tensor, z_s: torch.Tensor, t: torch.Tensor,
                    s: torch.Tensor) -> torch.Tensor:
    """The x0 whose DDIM step from x_t at t lands on the teacher's z_s at s."""
    alpha_t, sigma_t = per_sample(process.alpha(t), x_t), per_sample(process.sigma(t), x_t)
    alpha_s, sigma_s = per_sample(process.alpha(s), x_t), per_sample(process.sigma(s), x_t)
    ratio = sigma_s / sigma_t
    return (z_s - ratio * x_t) / (alpha_s - ratio * alpha_t)


def ddim_to_zero(denoise: Denoise, process: GaussianProcess, x: torch.Tensor, steps: int) -> SampleResult:
    """`steps` deterministic DDIM steps on `step_grid`, from x at t = 1 to t = 0; NFE = steps."""
    calls = 0
    with torch.no_grad():
        for now, after in itertools.pairwise(step_grid(process, steps).tolist()):
            t = torch.full((x.shape[0],), now, device=x.device)
            x0_hat, _ = denoise(x, t)
            calls += 1
            x = ddim_move(process, x, x0_hat, t, torch.full_like(t, after))
    return SampleResult(x, calls)
