"""`bridge`: a diffusion bridge from the source slice to the target slice (BBDM's Brownian bridge; SelfRDB's
soft prior and self-consistent recursion as options), sampled in a few stochastic steps.

Unlike cddpm, which starts from noise and is told the source, the bridge starts from the source itself
(crossdiff.diffusion.bridge): x_t = (1 - t) x0 + t y + sqrt(delta_t) eps, so each step only has to move
the image a little of the way from MR to CT. y is the centre source slice; the denoiser (MONAI's
DiffusionModelUNet, crossdiff.nets.denoiser) also sees every source channel by concatenation, 2.5-D
context included. The network
predicts x0 and learns with L1 (BBDM's loss on its 'grad' objective x_t - x0 is the same L1); training
times are uniform on (0, 1], so any number of sampling steps is valid.

Options:
- `prior_std` > 0: SelfRDB's soft prior, the bridge ends at the source plus noise of that std (0: BBDM);
- `recursions` R > 1: SelfRDB's self-consistent recursion, the network also takes its previous x0
  estimate (zeros at first) and refines it R times per step (NFE = steps x R). SelfRDB stops early once
  the estimate changes by less than a threshold, measured over the whole batch; here always R, so a
  slice's result does not depend on the slices beside it. It trains with a random number of earlier
  refinements (0..R-1, without gradients) before the one it learns from, where SelfRDB back-propagates
  through all R; and SelfRDB adds an adversarial critic, which is left out (`syndiff` has one).
Sampling is stochastic for eta > 0 (and for a soft prior), so Monte-Carlo draws give an uncertainty map;
`steps` 1 is a single deterministic regression-like pass under a hard prior.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from crossdiff.diffusion.bridge import BrownianBridge, bridge_sample
from crossdiff.diffusion.processes import NETWORK_TIME_SCALE, standard_normal
from crossdiff.diffusion.samplers import SampleResult
from crossdiff.diffusion.uncertainty import monte_carlo
from crossdiff.errors import CrossdiffError
from crossdiff.methods import register_method
from crossdiff.methods.base import DataSpec, SingleLossMethod, Translation
from crossdiff.methods.unet import SAMPLED_DEFAULTS, checked_settings
from crossdiff.nets.denoiser import DENOISER_DEFAULTS, build_denoiser

BRIDGE_DEFAULTS: dict[str, Any] = {
    **DENOISER_DEFAULTS,
    "variance_scale": 1.0,  # BBDM's s: delta_t peaks at s / 2 in the middle of the bridge
    "prior_std": 0.0,  # > 0: SelfRDB's soft prior (noisy source at t = 1)
    "recursions": 1,  # > 1: SelfRDB's self-consistent recursion per step (it uses up to 5)
    "steps": 10,  # SelfRDB's number of steps
    "eta": 1.0,  # 1: posterior sampling (stochastic); 0: deterministic steps
    **SAMPLED_DEFAULTS,
}


@register_method("bridge", "diffusion bridge source -> target (Brownian bridge, BBDM; SelfRDB soft prior and "
                           "recursion as options): 10 stochastic steps")
class BridgeMethod(SingleLossMethod):
    name: ClassVar[str] = "bridge"
    stochastic: ClassVar[bool] = True

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        super().__init__(checked_settings(self.name, BRIDGE_DEFAULTS, config), data)
        c = self.config
        if data.target_channels != 1 or int(c["recursions"]) < 1:
            raise CrossdiffError(f"bridge needs one-channel targets and recursions >= 1, not {data.target_channels} "
                                 f"and {c['recursions']}")
        self.process = BrownianBridge(float(c["variance_scale"]), float(c["prior_std"]))
        recursive = int(c["recursions"]) > 1
        self.net = build_denoiser(c, DataSpec(data.source_channels + (1 if recursive else 0), 1, data.size))

    def endpoint(self, source: torch.Tensor) -> torch.Tensor:
        """y: the centre slice of the source stack (its own slice; the rest is 2.5-D context)."""
        centre = source.shape[1] // 2
        return source[:, centre : centre + 1]

    def _estimate(self, x_t: torch.Tensor, source: torch.Tensor, t: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        condition = source if previous is None else torch.cat([source, previous], dim=1)
        return self.net(x_t, condition, NETWORK_TIME_SCALE * t)

    def _refined(self, x_t: torch.Tensor, source: torch.Tensor, t: torch.Tensor, passes: int) -> torch.Tensor:
        """x0_hat after `passes` network calls, each refining the previous estimate (from zeros)."""
        if int(self.config["recursions"]) == 1:
            return self._estimate(x_t, source, t, None)
        estimate = torch.zeros_like(x_t)
        for _ in range(passes):
            estimate = self._estimate(x_t, source, t, estimate)
        return estimate

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        x0, source = batch["target"], batch["source"]
        u = torch.rand(x0.shape[0], generator=generator, device=generator.device).to(x0.device)
        t = 1.0 - u  # (0, 1]: t = 0 is the target itself
        x_t = self.process.perturb(x0, self.endpoint(source), t, standard_normal(x0, generator))
        earlier = int(torch.randint(int(self.config["recursions"]), (1,), generator=generator, device=generator.device))
        estimate = None
        if int(self.config["recursions"]) > 1:
            with torch.no_grad():
                estimate = self._refined(x_t, source, t, earlier)
        error = (self._estimate(x_t, source, t, estimate) - x0).abs()
        if not self.config["masked_loss"]:
            return error.mean()
        mask = batch["mask"]
        return (error * mask).sum() / mask.sum().clamp(min=1.0)

    @torch.no_grad()
    def translate(
        self, source: torch.Tensor, generator: torch.Generator, samples: int = 1, *, steps: int | None = None,
        eta: float | None = None, batch: int | None = None, **options: Any,
    ) -> Translation:
        """`samples` draws per slice, `steps` bridge steps each (default: the config's), `eta` their noise."""
        if options:
            raise CrossdiffError(f"bridge takes the translation options steps, eta and batch, not {', '.join(sorted(options))}")
        steps = int(self.config["steps"] if steps is None else steps)
        eta = float(self.config["eta"] if eta is None else eta)
        recursions = int(self.config["recursions"])

        def draw(chunk: torch.Tensor) -> SampleResult:
            result = bridge_sample(lambda x, t: self._refined(x, chunk, t, recursions).clamp(-1.0, 1.0), self.process,
                                   self.endpoint(chunk), steps, generator, eta)
            return SampleResult(result.x, result.nfe * recursions)

        result = monte_carlo(draw, source, samples, int(self.config["batch"] if batch is None else batch))
        return Translation(result.x.float().clamp(-1.0, 1.0), result.nfe)
