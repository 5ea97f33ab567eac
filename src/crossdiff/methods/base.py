"""What every translation method provides, so one training loop, one checkpoint format and one
volume-inference path serve them all (diffusion models, regression UNets, GANs).

A method owns its networks and optimisers and decides how one batch is learned from (a GAN
alternates two optimisers, a diffusion model has one); the training loop owns everything around it:
autocast, gradient clipping, EMA, DDP, checkpoints, resume, validation and progress. The method asks
the loop to apply a loss through `StepContext.optimize`, which is where those shared parts happen.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from crossdiff.errors import CrossdiffError

if TYPE_CHECKING:
    from crossdiff.data.slices import SliceConfig


@dataclass(frozen=True)
class DataSpec:
    """What the data looks like to the networks: channels of the source input (2k+1 for 2.5-D
    context) and of the target, and the slice size."""

    source_channels: int
    target_channels: int = 1
    size: tuple[int, int] = (64, 64)


def check_single_slices(name: str, data: DataSpec) -> None:
    """Unpaired methods that translate both ways turn one target slice into one source slice, which cannot
    give a forward network the 2k+1 neighbouring source slices of 2.5-D input."""
    if data.source_channels != data.target_channels:
        raise CrossdiffError(
            f"{name} translates 2-D slices both ways, so the source needs {data.target_channels} channel(s) like "
            f"the target, not {data.source_channels}: set `slices: {{context: 0}}` (2.5-D context cannot be cycled)")


@dataclass
class Translation:
    """Result of translating a batch of source slices: `samples` (N, B, C, H, W) in [-1, 1], one
    per Monte-Carlo draw (N = 1 for deterministic methods), and the network evaluations used per draw."""

    samples: torch.Tensor
    nfe: int

    @property
    def mean(self) -> torch.Tensor:
        return self.samples.mean(dim=0)

    @property
    def std(self) -> torch.Tensor | None:
        """Per-pixel spread across draws; None when there is only one draw (nothing to measure)."""
        return self.samples.std(dim=0, unbiased=True) if self.samples.shape[0] > 1 else None


@dataclass
class StepContext:
    """Handed to `Method.training_step` by the loop. `optimize(name, loss)` zeroes the grads of the
    named optimiser, back-propagates (with the loop's gradient scaler), clips, steps, and updates the
    EMA copies of the modules that optimiser trains. `generator` is the loop's seeded RNG for the step."""

    optimize: Callable[[str, torch.Tensor], None]
    generator: torch.Generator
    device: torch.device
    step: int


class Method(ABC):
    """Base class of every method; subclasses are registered with `@register_method(name, description)`.

    `config` holds only plain values (it is saved as YAML beside every checkpoint and must rebuild the
    method exactly with `cls(config, data)`). Each network is an attribute whose name is its key in
    `modules()`: the training loop swaps in DDP wrappers under the same names for multi-process runs.
    """

    name: ClassVar[str] = ""
    stochastic: ClassVar[bool] = False
    # False for methods that learn from unpaired data (CycleGAN): `crossdiff train` then gives them an
    # UnpairedSliceDataset, whose batches hold 'source', 'source_mask', 'target', 'target_mask'
    paired: ClassVar[bool] = True
    # True for one model that makes several targets, chosen at translation (cldm: `--target ct,mr`)
    multi_target: ClassVar[bool] = False
    # the stages `crossdiff train --stage` trains one after the other, each building on the previous
    # (cldm: autoencoder, then diffusion); empty for methods trained in one go
    training_stages: ClassVar[tuple[str, ...]] = ()
    # False for methods that must see whole slices in training (the mean-target reference): `crossdiff
    # train` then ignores the slices' `crop` (patch training) for them
    patch_training: ClassVar[bool] = True
    # True for methods built from another trained run (cddpm-distill's teacher): a benchmark, which trains
    # that run first, can only type-check their settings before it starts, not build them
    builds_on_a_run: ClassVar[bool] = False

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        self.config = dict(config)
        self.data = data

    @classmethod
    def default_settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """Every setting of this method with its default, whose type a config must match: the method
        built from no settings on PyTorch's meta device (nothing allocated). `settings` picks the variant
        for methods whose defaults depend on one (cldm's stage)."""
        with torch.device("meta"):
            return dict(cls({}, DataSpec(1)).config)

    @classmethod
    def training_data(cls, slices: SliceConfig) -> DataSpec:
        """What the networks see in training: `slices.crop` patches when the method trains on patches, else
        whole slices; the config check builds the method on it too, so a check and the run agree."""
        patch = slices.crop if slices.crop is not None and cls.patch_training else slices.size
        return DataSpec(slices.channels, 1, patch)

    def sampling_pixels(self, size: tuple[int, int]) -> int:
        """Pixels per item of a slice of `size` where the sampling loop works: what CPU batches are sized
        by (a method that samples in a smaller latent space says so, or its small steps go one at a time)."""
        return size[0] * size[1]

    @abstractmethod
    def modules(self) -> dict[str, nn.Module]:
        """Every network, by name: these are saved, EMA-averaged, moved to the device and DDP-wrapped."""

    @abstractmethod
    def optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
        """Optimiser by name, with the names of the modules it trains (for clipping and EMA)."""

    @abstractmethod
    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        """Learn from one batch through `context.optimize`; return the losses to log."""

    @abstractmethod
    def translate(
        self, source: torch.Tensor, generator: torch.Generator, samples: int = 1, **options: Any
    ) -> Translation:
        """Translate source slices (B, C, H, W) in [-1, 1]. Stochastic methods draw `samples` times;
        `options` are method-specific (sampler, steps, eta, ...), unknown ones are an error."""

    @classmethod
    def with_paths_from(cls, config: dict[str, Any], folder: Path) -> dict[str, Any]:
        """The method settings of a YAML file in `folder`, with the relative paths they name read from there
        (cddpm-distill's teacher); unchanged by default."""
        return config

    def validation_metrics(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, float]:
        """Method-specific held-out measures for the training record (e.g. a critic's accuracy), averaged over
        validation batches; none by default."""
        return {}

    def validation_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> float:
        """A cheap held-out loss to watch while training (default: L1 of one translation)."""
        result = self.translate(batch["source"], generator, samples=1)
        return float((result.mean - batch["target"]).abs().mean())


class SingleLossMethod(Method):
    """A method that learns one network `net` with one optimiser (named 'model') on one loss,
    `loss(batch, generator)`, which is also its held-out loss (one network call, where a translation costs
    its sampling steps): the diffusion, bridge and flow methods. Subclasses build `net`; the optimiser is
    built at first use, once subclasses' extra networks exist and the loop has placed them, and never for
    a model that only translates."""

    net: nn.Module
    _optimizers: dict[str, tuple[torch.optim.Optimizer, list[str]]] | None = None

    @abstractmethod
    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        """The training loss of a batch, every random draw from `generator`."""

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
        if self._optimizers is None:
            self._optimizers = self.make_optimizers()
        return self._optimizers

    def make_optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
        """AdamW on `net` with the config's lr, weight_decay and betas (PyTorch's betas where it has none)."""
        betas = tuple(float(b) for b in self.config.get("betas", (0.9, 0.999)))
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=float(self.config["lr"]),
                                      weight_decay=float(self.config["weight_decay"]), betas=betas)  # type: ignore[arg-type]
        return {"model": (optimizer, ["net"])}

    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        loss = self.loss(batch, context.generator)
        context.optimize("model", loss)
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def validation_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> float:
        return float(self.loss(batch, generator))
