"""Samplers of a rectified flow (Liu et al. 2023; flow matching, Lipman et al. 2023), as plain functions
on MONAI's `RFlowScheduler`.

MONAI's convention: timesteps run from T (`num_train_timesteps`, pure noise) to 0 (data), the path is
straight, x_t = (1 - t/T) x0 + (t/T) eps, and the network predicts the velocity v = x0 - eps, so
x_s = x_t + v (t - s) / T. The scheduler gives the sampling grid (`set_timesteps`: `steps` equal steps
from T, rounded to whole timesteps) and the Euler step (`step`). Heun's second-order step is written
here (MONAI has none): the Euler guess is corrected by the velocity at its end point, except on the
last step into t = 0 (as EDM, Karras et al. 2022, whose network is not evaluated at zero noise). NFE is
counted, not computed: `steps` for euler, 2 `steps` - 1 for heun.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.networks.schedulers import RFlowScheduler

from crossdiff.diffusion.samplers import SampleResult
from crossdiff.errors import CrossdiffError

# x_t, timesteps (B,) on the scheduler's 0..T scale -> predicted velocity
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _grid(scheduler: RFlowScheduler, steps: int, device: torch.device) -> list[tuple[int, int]]:
    """(t, next t) pairs of the scheduler's `steps`-step grid, ending at 0."""
    if not 1 <= steps <= scheduler.num_train_timesteps:
        raise CrossdiffError(f"flow sampling steps must be 1..{scheduler.num_train_timesteps}, not {steps}")
    scheduler.set_timesteps(steps, device=device)
    times = [int(t) for t in scheduler.timesteps] + [0]
    return list(zip(times[:-1], times[1:]))


def _times(value: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(value), device=x.device)


def euler(velocity: Velocity, scheduler: RFlowScheduler, x: torch.Tensor, steps: int) -> SampleResult:
    """MONAI's Euler steps from noise x (at t = T) to t = 0."""
    calls = 0
    for now, after in _grid(scheduler, steps, x.device):
        v = velocity(x, _times(now, x))
        calls += 1
        x, _ = scheduler.step(v, now, x, after)
    return SampleResult(x, calls)


def heun(velocity: Velocity, scheduler: RFlowScheduler, x: torch.Tensor, steps: int) -> SampleResult:
    """Heun's method on the same grid: the mean of the velocities at both ends of each Euler step."""
    calls = 0
    for now, after in _grid(scheduler, steps, x.device):
        v = velocity(x, _times(now, x))
        calls += 1
        guess, _ = scheduler.step(v, now, x, after)
        if after == 0:
            x = guess
            continue
        corrected = 0.5 * (v + velocity(guess, _times(after, x)))
        calls += 1
        x, _ = scheduler.step(corrected, now, x, after)
    return SampleResult(x, calls)


FLOW_SAMPLERS: dict[str, Callable[[Velocity, RFlowScheduler, torch.Tensor, int], SampleResult]] = {
    "euler": euler, "heun": heun}


def flow_sample(name: str, velocity: Velocity, scheduler: RFlowScheduler, x: torch.Tensor, steps: int) -> SampleResult:
    """Run flow sampler `name` without autograd; an unknown name is a CrossdiffError."""
    if name not in FLOW_SAMPLERS:
        raise CrossdiffError(f"unknown flow sampler {name!r}; choose one of {', '.join(FLOW_SAMPLERS)}")
    with torch.no_grad():
        return FLOW_SAMPLERS[name](velocity, scheduler, x, steps)
