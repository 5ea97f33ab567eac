"""A diffusion bridge between a source image y and a target image x0 (Brownian bridge, as in BBDM: Li et
al., CVPR 2023), and its few-step sampler, as a plain function.

    x_t = (1 - m_t) x0 + m_t y + sqrt(delta_t) eps,   m_t = t,   delta_t = 2 s (m_t - m_t^2) + m_t^2 p^2

for t in [0, 1]: the target at t = 0, the source at t = 1. `s` (BBDM's variance scale) sets the noise in
the middle (at most s / 2); `p` is the end point's noise: 0 gives BBDM's hard prior x_1 = y, p > 0 the soft
prior of SelfRDB (Arslan et al. 2024), whose reverse process starts from a noisy source. delta_t /
(1 - m_t)^2 grows with t, so these marginals belong to a Markov chain whose steps
q(x_t | x_s) = N(a x_s + (m_t - a m_s) y, delta_t - a^2 delta_s), a = (1 - m_t) / (1 - m_s), are Gaussian.

The sampler walks `steps` equal steps from t = 1 to 0; at each it asks the network for x0_hat and draws
x_s from BBDM's step (its `p_sample`, the DDIM-like form with `eta`):

    x_s = (1 - m_s) x0_hat + m_s y + sqrt((delta_s - c^2) / delta_t) (x_t - (1 - m_t) x0_hat - m_t y) + c z,
    c^2 = eta^2 delta_s (1 - a^2 delta_s / delta_t)

which for eta = 1 is the exact posterior q(x_s | x_t, x0 = x0_hat, y) and for eta = 0 is deterministic; the
last step (s = 0) returns x0_hat. Every random number comes from the generator, so a seed repeats a draw.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from crossdiff.diffusion.processes import per_sample, standard_normal
from crossdiff.diffusion.samplers import SampleResult
from crossdiff.errors import CrossdiffError

# x_t, t (B,) -> x0_hat: the network as the sampler sees it, bound to its source
Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
TINY = 1e-12


class BrownianBridge:
    """The bridge's marginals and reverse steps; times are (B,) tensors in [0, 1]."""

    def __init__(self, variance_scale: float = 1.0, prior_std: float = 0.0) -> None:
        if variance_scale <= 0.0 or prior_std < 0.0:
            raise CrossdiffError(f"the bridge needs variance_scale > 0 and prior_std >= 0, not {variance_scale} and {prior_std}")
        self.variance_scale, self.prior_std = float(variance_scale), float(prior_std)

    def variance(self, t: torch.Tensor) -> torch.Tensor:
        """delta_t."""
        return 2.0 * self.variance_scale * (t - t**2) + (t * self.prior_std) ** 2

    def mean(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = per_sample(t, x0)
        return (1.0 - m) * x0 + m * y

    def perturb(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t given the target, the source and standard normal noise."""
        return self.mean(x0, y, t) + per_sample(self.variance(t).sqrt(), x0) * noise

    def start(self, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x_1: the source itself (hard prior) or the source with noise of std prior_std (soft prior)."""
        return y + self.prior_std * standard_normal(y, generator) if self.prior_std > 0 else y.clone()

    def step(self, x_t: torch.Tensor, x0_hat: torch.Tensor, y: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
             eta: float, generator: torch.Generator) -> torch.Tensor:
        """x_s from x_t with the network's x0_hat (BBDM's reverse step, see the module docstring)."""
        if float(s.max()) == 0.0:
            return x0_hat
        var_t, var_s = per_sample(self.variance(t), x_t), per_sample(self.variance(s), x_t)
        a = (1.0 - per_sample(t, x_t)) / (1.0 - per_sample(s, x_t))
        spread = eta**2 * var_s * (1.0 - a**2 * var_s / var_t.clamp(min=TINY))
        keep = ((var_s - spread).clamp(min=0.0) / var_t.clamp(min=TINY)).sqrt()
        moved = self.mean(x0_hat, y, s) + keep * (x_t - self.mean(x0_hat, y, t))
        return moved + spread.clamp(min=0.0).sqrt() * standard_normal(x_t, generator)


def bridge_sample(predict: Predict, bridge: BrownianBridge, y: torch.Tensor, steps: int, generator: torch.Generator,
                  eta: float = 1.0) -> SampleResult:
    """`steps` equal reverse steps from x_1 (drawn from `bridge.start`) to x_0; NFE counts `predict` calls."""
    if steps < 1 or not 0.0 <= eta <= 1.0:
        raise CrossdiffError(f"the bridge sampler needs steps >= 1 and 0 <= eta <= 1, not {steps} and {eta}")
    calls = 0
    x = bridge.start(y, generator)
    for now, after in itertools.pairwise(torch.linspace(1.0, 0.0, steps + 1).tolist()):
        t = torch.full((x.shape[0],), now, device=x.device)
        x0_hat = predict(x, t)
        calls += 1
        x = bridge.step(x, x0_hat, y, t, torch.full_like(t, after), eta, generator)
    return SampleResult(x, calls)
