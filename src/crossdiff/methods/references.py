"""Reference "methods" every real method must beat: the mean training target slice, and the best map
from source intensity alone to target intensity, both fitted on the training patients.

They run through the same loop, checkpoints, translate path and benchmark as the networks, so a
benchmark scores them on the same voxels with the same statistics. Training only accumulates sums
(no optimiser, no gradient): enough steps to see every training slice once or more (with the loop's
augmentation) give their estimates. A method that does not beat `intensity-map` has learnt nothing
an intensity lookup could not; one that does not beat `mean-target` has not even learnt the anatomy's
average.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from crossdiff.methods import register_method
from crossdiff.methods.base import DataSpec, Method, StepContext, Translation
from crossdiff.methods.unet import checked_settings, refuse_sampling

INTENSITY_BINS = 128


class _Sums(nn.Module):
    """Running sums as buffers, so checkpoints (safetensors) hold the fitted reference."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("total", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(shape, dtype=torch.float64))


class _Reference(Method):
    stochastic: ClassVar[bool] = False
    patch_training: ClassVar[bool] = False  # the mean slice is a whole slice
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        super().__init__(checked_settings(self.name, self.defaults, config), data)

    def optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
        return {}


@register_method("mean-target", "Reference: the mean training target slice, whatever the source")
class MeanTarget(_Reference):
    """Predicts the pixel-wise mean of the training target slices (at the working slice size)."""

    name: ClassVar[str] = "mean-target"

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        super().__init__(config, data)
        self.sums = _Sums((data.target_channels, *data.size))

    def modules(self) -> dict[str, nn.Module]:
        return {"sums": self.sums}

    @torch.no_grad()
    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        target = batch["target"].double()
        self.sums.total += target.sum(dim=0)
        self.sums.count += target.shape[0]
        return {"slices": float(self.sums.count.flatten()[0])}

    @torch.no_grad()
    def translate(self, source: torch.Tensor, generator: torch.Generator, samples: int = 1, **options: Any) -> Translation:
        refuse_sampling(self.name, samples, options)
        mean = (self.sums.total / self.sums.count.clamp(min=1)).float()[None]
        if mean.shape[-2:] != source.shape[-2:]:
            mean = F.interpolate(mean, size=source.shape[-2:], mode="bilinear", align_corners=False)
        return Translation(samples=mean.expand(source.shape[0], -1, -1, -1)[None].to(source.device), nfe=0)


@register_method("intensity-map", "Reference: the mean target intensity for each source intensity, fitted on training slices")
class IntensityMap(_Reference):
    """A lookup table from the source's centre slice intensity ([-1, 1], `bins` bins) to the mean target
    intensity inside the mask: the best any per-voxel intensity transform can do in the L2 sense on the
    training data. Bins the training data never filled take the nearest filled bin's value."""

    name: ClassVar[str] = "intensity-map"
    defaults: ClassVar[dict[str, Any]] = {"bins": INTENSITY_BINS}

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        super().__init__(config, data)
        self.sums = _Sums((int(self.config["bins"]),))

    def modules(self) -> dict[str, nn.Module]:
        return {"sums": self.sums}

    def _bins(self, source: torch.Tensor) -> torch.Tensor:
        centre = source[:, source.shape[1] // 2]
        bins = int(self.config["bins"])
        return ((centre.clamp(-1, 1) + 1) / 2 * bins).long().clamp(0, bins - 1)

    @torch.no_grad()
    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        inside = batch["mask"][:, 0] > 0.5
        index = self._bins(batch["source"])[inside]
        values = batch["target"][:, 0][inside].double()
        self.sums.total.index_add_(0, index, values)
        self.sums.count.index_add_(0, index, torch.ones_like(values))
        return {"voxels": float(self.sums.count.sum())}

    def _table(self) -> torch.Tensor:
        filled = self.sums.count > 0
        if not filled.any():
            return torch.full_like(self.sums.total, -1.0)
        means = self.sums.total / self.sums.count.clamp(min=1)
        positions = torch.arange(len(means), device=means.device)
        known = positions[filled]
        nearest = known[(positions[:, None] - known[None]).abs().argmin(dim=1)]
        return means[nearest]

    @torch.no_grad()
    def translate(self, source: torch.Tensor, generator: torch.Generator, samples: int = 1, **options: Any) -> Translation:
        refuse_sampling(self.name, samples, options)
        mapped = self._table().float()[self._bins(source)][:, None]
        return Translation(samples=mapped[None], nfe=0)
