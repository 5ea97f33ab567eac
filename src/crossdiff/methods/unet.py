"""`unet` and `attention-unet`: regression baselines, the simplest paired methods and the template for new ones.

One network maps the source slice (and its 2.5-D context) straight to the target slice; the loss is
L1, optionally plus SSIM and perceptual terms (crossdiff.losses). The two methods differ only in the
network (MONAI `UNet` or `AttentionUnet`); pix2pix reuses the rest with a discriminator added. They
are deterministic: one translation per slice, no uncertainty. Everything else (AMP, EMA, clipping,
checkpoints, DDP) is the training loop's job.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from monai.networks.nets import AttentionUnet, UNet
from torch import nn

from crossdiff.errors import CrossdiffError
from crossdiff.losses import RECONSTRUCTION_DEFAULTS, ReconstructionLoss
from crossdiff.methods import register_method
from crossdiff.methods.base import DataSpec, Method, StepContext, Translation

OUTPUTS = ("tanh", "clamp")
OPTIMISER_DEFAULTS: dict[str, Any] = {"lr": 2e-4, "weight_decay": 1e-4, "betas": [0.9, 0.999]}
# what the bridge, flow and distilled-diffusion methods share: AdamW without weight decay (as DDPM and score_sde
# train), learning inside the body mask only or not, and how many slice-draws are sampled at once
SAMPLED_DEFAULTS: dict[str, Any] = {**OPTIMISER_DEFAULTS, "weight_decay": 0.0, "masked_loss": False, "batch": 16}
REGRESSION_DEFAULTS: dict[str, Any] = {
    # 'clamp': a linear output clamped to [-1, 1] at inference only; 'tanh' saturates where most of the target
    # sits at -1 (skull-stripped brain T2: the default tanh UNet collapsed to the floor, std 0.0; clamp learnt)
    "output": "clamp",
    "masked_loss": False,  # learn only inside the mask (e.g. where the MR has data); off learns the background too
    **RECONSTRUCTION_DEFAULTS,
    **OPTIMISER_DEFAULTS,
}
UNET_DEFAULTS: dict[str, Any] = {
    "channels": [32, 64, 128, 256],
    "strides": [2, 2, 2],
    "num_res_units": 2,
    # No normalisation by default: instance norm divides out each slice's own intensity level, which
    # a regression to absolute HU needs (held-out sarcoma MAE 163 HU with it, 101 HU without); batch
    # norm ties DDP ranks' statistics to their shard. Any MONAI norm name works ('batch', 'instance').
    "norm": None,
    "dropout": 0.0,
}
ATTENTION_UNET_DEFAULTS: dict[str, Any] = {"channels": [32, 64, 128, 256], "strides": [2, 2, 2], "dropout": 0.0}


def checked_settings(name: str, defaults: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The defaults updated by `config`; an unknown key is an error rather than a silently ignored typo."""
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        raise CrossdiffError(f"unknown {name} settings: {', '.join(unknown)} (known: {', '.join(defaults)})")
    return {**defaults, **config}


def adamw(parameters: Iterable[nn.Parameter], config: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW with the method's `lr`, `weight_decay` and `betas` (OPTIMISER_DEFAULTS)."""
    return torch.optim.AdamW(
        parameters,
        lr=float(config["lr"]),
        weight_decay=float(config["weight_decay"]),
        betas=tuple(float(b) for b in config["betas"]),  # type: ignore[arg-type]
    )


def adamw_groups(modules: dict[str, nn.Module], groups: dict[str, Sequence[str]],
                 config: dict[str, Any]) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
    """One AdamW (`adamw`) per named group of modules, e.g. {"generators": [...], "discriminators": [...]}:
    the `Method.optimizers` a method with several jointly trained networks returns."""
    return {name: (adamw([p for module in names for p in modules[module].parameters()], config), list(names))
            for name, names in groups.items()}


def refuse_sampling(name: str, samples: int, options: dict[str, Any]) -> None:
    """Deterministic methods take no translation options and draw exactly once."""
    if options:
        raise CrossdiffError(f"{name} takes no translation options (got {', '.join(sorted(options))})")
    if samples != 1:
        raise CrossdiffError(f"{name} is deterministic: it draws one translation, not several samples")


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


class RegressionMethod(Method):
    """Source slices in, target slice out, learned with the reconstruction loss over the slice or, with
    `masked_loss`, only inside the mask (where the source has data and the body is). Subclasses build
    the network (`build_network`) from their `defaults`."""

    stochastic: ClassVar[bool] = False
    defaults: ClassVar[dict[str, Any]] = REGRESSION_DEFAULTS

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        super().__init__(checked_settings(self.name, self.defaults, config), data)
        if self.config["output"] not in OUTPUTS:
            raise CrossdiffError(f"{self.name} output must be one of {', '.join(OUTPUTS)}, not {self.config['output']!r}")
        self.net = self.build_network()
        # training-only parts, made when the loop asks for the optimisers: inference needs neither
        self._optimizers: dict[str, tuple[torch.optim.Optimizer, list[str]]] | None = None
        self.reconstruction: ReconstructionLoss | None = None

    @abstractmethod
    def build_network(self) -> nn.Module:
        """The source -> target network, from `self.config` and `self.data`."""

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
        if self._optimizers is None:
            # the loop has moved the networks to the training device before asking
            self.reconstruction = ReconstructionLoss.from_config(self.config).to(module_device(self.net))
            self._optimizers = self.make_optimizers()
        return self._optimizers

    def make_optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
        return {"net": (adamw(self.net.parameters(), self.config), ["net"])}

    def _predict(self, source: torch.Tensor) -> torch.Tensor:
        raw = self.net(source)
        return torch.tanh(raw) if self.config["output"] == "tanh" else raw

    def _reconstruction_loss(
        self, prediction: torch.Tensor, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert self.reconstruction is not None, "optimizers() builds the training loss"
        weight = batch["mask"] if self.config["masked_loss"] else None
        return self.reconstruction(prediction, batch["target"], weight)

    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        loss, terms = self._reconstruction_loss(self._predict(batch["source"]), batch)
        context.optimize("net", loss)
        return {"loss": float(loss.detach()), **{key: float(value.detach()) for key, value in terms.items()}}

    @torch.no_grad()
    def translate(
        self, source: torch.Tensor, generator: torch.Generator, samples: int = 1, **options: Any
    ) -> Translation:
        refuse_sampling(self.name, samples, options)
        prediction = self._predict(source).float().clamp(-1.0, 1.0)
        return Translation(samples=prediction[None], nfe=1)


@register_method("unet", "Regression UNet (L1, optional SSIM/perceptual): one deterministic translation per slice")
class UNetMethod(RegressionMethod):
    name: ClassVar[str] = "unet"
    defaults: ClassVar[dict[str, Any]] = {**UNET_DEFAULTS, **REGRESSION_DEFAULTS}

    def build_network(self) -> nn.Module:
        return UNet(
            spatial_dims=2,
            in_channels=self.data.source_channels,
            out_channels=self.data.target_channels,
            channels=list(self.config["channels"]),
            strides=list(self.config["strides"]),
            num_res_units=int(self.config["num_res_units"]),
            norm=self.config["norm"],
            dropout=float(self.config["dropout"]),
        )


@register_method("attention-unet", "Regression Attention UNet (Oktay et al.; L1, optional SSIM/perceptual): deterministic")
class AttentionUNetMethod(RegressionMethod):
    """The same regression with attention gates on the skip connections (MONAI `AttentionUnet`)."""

    name: ClassVar[str] = "attention-unet"
    defaults: ClassVar[dict[str, Any]] = {**ATTENTION_UNET_DEFAULTS, **REGRESSION_DEFAULTS}

    def build_network(self) -> nn.Module:
        return AttentionUnet(
            spatial_dims=2,
            in_channels=self.data.source_channels,
            out_channels=self.data.target_channels,
            channels=list(self.config["channels"]),
            strides=list(self.config["strides"]),
            dropout=float(self.config["dropout"]),
        )
