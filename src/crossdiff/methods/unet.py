"""`unet`: a plain regression UNet, the simplest paired baseline and the template for new methods.

One MONAI `UNet` maps the source slice (and its 2.5-D context) straight to the target slice; the
loss is L1, optionally plus an SSIM term. It is deterministic: one translation per slice, no
uncertainty. Everything else (AMP, EMA, clipping, checkpoints, DDP) is the training loop's job.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from monai.losses import SSIMLoss
from monai.networks.nets import UNet
from torch import nn

from crossdiff.errors import CrossdiffError
from crossdiff.methods import register_method
from crossdiff.methods.base import DataSpec, Method, StepContext, Translation

DEFAULTS: dict[str, Any] = {
    "channels": [32, 64, 128, 256],
    "strides": [2, 2, 2],
    "num_res_units": 2,
    # No normalisation by default: instance norm divides out each slice's own intensity level, which
    # a regression to absolute HU needs (held-out sarcoma MAE 163 HU with it, 101 HU without); batch
    # norm ties DDP ranks' statistics to their shard. Any MONAI norm name works ('batch', 'instance').
    "norm": None,
    "dropout": 0.0,
    "output": "tanh",  # or 'clamp': a linear output clamped to [-1, 1] at inference only
    "masked_loss": False,  # learn only inside the mask (e.g. where the MR has data); off learns the background too
    "ssim_weight": 0.0,
    "lr": 2e-4,
    "weight_decay": 1e-4,
    "betas": [0.9, 0.999],
}
OUTPUTS = ("tanh", "clamp")


@register_method("unet", "Regression UNet (L1, optional SSIM): one deterministic translation per slice")
class UNetMethod(Method):
    """Source slices in, target slice out, learned with L1 over the slice or, with `masked_loss`,
    only inside the mask (where the source has data and the body is)."""

    name: ClassVar[str] = "unet"
    stochastic: ClassVar[bool] = False

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        unknown = sorted(set(config) - set(DEFAULTS))
        if unknown:
            raise CrossdiffError(f"unknown unet settings: {', '.join(unknown)} (known: {', '.join(DEFAULTS)})")
        super().__init__({**DEFAULTS, **config}, data)
        if self.config["output"] not in OUTPUTS:
            raise CrossdiffError(f"unet output must be one of {', '.join(OUTPUTS)}, not {self.config['output']!r}")
        self.net = UNet(
            spatial_dims=2,
            in_channels=data.source_channels,
            out_channels=data.target_channels,
            channels=list(self.config["channels"]),
            strides=list(self.config["strides"]),
            num_res_units=int(self.config["num_res_units"]),
            norm=self.config["norm"],
            dropout=float(self.config["dropout"]),
        )
        self.optimizer: torch.optim.Optimizer | None = None  # made when training asks: inference needs none
        self.ssim = SSIMLoss(spatial_dims=2, data_range=2.0) if self.config["ssim_weight"] > 0 else None

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net}

    def optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(
                self.net.parameters(),
                lr=float(self.config["lr"]),
                weight_decay=float(self.config["weight_decay"]),
                betas=tuple(float(b) for b in self.config["betas"]),
            )
        return {"net": (self.optimizer, ["net"])}

    def _predict(self, source: torch.Tensor) -> torch.Tensor:
        raw = self.net(source)
        return torch.tanh(raw) if self.config["output"] == "tanh" else raw

    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        prediction = self._predict(batch["source"])
        weight = batch["mask"] if self.config["masked_loss"] else torch.ones_like(batch["mask"])
        l1 = ((prediction - batch["target"]).abs() * weight).sum() / weight.sum().clamp_min(1.0)
        losses = {"l1": l1}
        if self.ssim is not None:
            losses["ssim"] = self.ssim(prediction.float(), batch["target"].float())
        loss = l1 + self.config["ssim_weight"] * losses.get("ssim", 0.0)
        context.optimize("net", loss)
        return {"loss": float(loss.detach()), **{key: float(value.detach()) for key, value in losses.items()}}

    @torch.no_grad()
    def translate(
        self, source: torch.Tensor, generator: torch.Generator, samples: int = 1, **options: Any
    ) -> Translation:
        if options:
            raise CrossdiffError(f"unet takes no translation options (got {', '.join(sorted(options))})")
        if samples != 1:
            raise CrossdiffError("unet is deterministic: it draws one translation, not several samples")
        prediction = self._predict(source).float().clamp(-1.0, 1.0)
        return Translation(samples=prediction[None], nfe=1)
