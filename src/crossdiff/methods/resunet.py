"""`resunet`: the strongest regression baseline built from MONAI parts, in nnU-Net's style: the bar a
generative method has to clear (regression won both SynthRAD challenges; SynthRAD2025 task 1 went to an
nnU-Net ResEnc model).

What it takes from nnU-Net (Isensee et al. 2021; v2's residual-encoder presets, 2024):
- the network: MONAI's `DynUNet`, its re-implementation of nnU-Net's UNet, with residual blocks
  (`res_block`), leaky ReLU, 3x3 kernels, stride-2 convolutions to go down, transposed ones up;
- deep supervision: the `deep_supervision` coarsest-but-one decoder outputs are supervised too, with
  weights halving per level (normalised to sum 1), as nnU-Net weights its lower resolutions;
- patch training: use `slices: {crop: [h, w]}` (random patches centred on the body; validation and
  translation see whole slices) and sliding-window inference over the whole slice with Gaussian
  weighting (MONAI `SlidingWindowInferer(mode="gaussian")`, nnU-Net's sigma of 1/8 of the window and
  half-window overlap), the window the training patch (the data size the method is built for) unless
  `window` says otherwise;
- heavy augmentation: the slice dataset's flips, rotation and scaling (nnU-Net rotates up to 180 degrees
  and scales 0.7-1.4: set `slices: {rotation: ..., scale: [...]}`), plus nnU-Net's intensity
  augmentations of the input (crossdiff.data.intensity_augmentation);
- test-time mirroring: the mean of the predictions over every combination of the `mirror` flips
  (nnU-Net mirrors along the axes it trained with; our slices flip left-right by default).
The loss is L1 + `ssim_weight` x SSIM (a synthesis loss; nnU-Net segments with Dice + cross-entropy).

What it does not have: nnU-Net's automatic planning (patch size, depth and batch size from the data's
spacing and the GPU's memory: here they are settings), its SGD with Nesterov momentum 0.99 and
polynomial learning-rate decay (the shared loop trains every method with AdamW at a constant rate),
ResEnc's several residual blocks per encoder stage (DynUNet has one per stage), the five-fold
cross-validation ensemble, and 3-D: crossdiff's pipeline is slice based (2-D, or 2.5-D with
`slices: {context: k}`, which this method takes as input channels), so the 3d_fullres configuration
of the SynthRAD winners is not provided.

No normalisation by default, for the reason given at UNET_DEFAULTS' 'norm' (instance norm divides out
each slice's own intensity level, which a regression to absolute HU needs); DynUNet only offers MONAI
norm layers, so 'none' swaps them for identities.
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import torch
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import DynUNet
from torch import nn

from crossdiff.data.intensity_augmentation import augment_intensity
from crossdiff.errors import CrossdiffError
from crossdiff.methods import register_method
from crossdiff.methods.base import DataSpec, StepContext, Translation
from crossdiff.methods.unet import REGRESSION_DEFAULTS, RegressionMethod, refuse_sampling

MIRRORS = {"h": -1, "v": -2}  # flip axis of (B, C, H, W) slices
RESUNET_DEFAULTS: dict[str, Any] = {
    **REGRESSION_DEFAULTS,
    "filters": [32, 64, 128, 256],  # one entry per resolution level; each level below the first halves the size
    "norm": "none",  # or a MONAI norm name: 'instance' (nnU-Net's), 'batch', ...
    "deep_supervision": 2,  # lower-resolution decoder outputs also supervised (0: off); fewer than levels - 1
    "intensity_augmentation": True,
    "ssim_weight": 0.5,
    "window": None,  # sliding-window size [h, w] for translation; None: the training images' size (the patch)
    "overlap": 0.5,
    "window_batch": 8,  # windows run through the network at once
    "mirror": ["h"],  # test-time mirroring: the flips to average over ([] for none)
}


class _NoNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _without_norms(module: nn.Module) -> nn.Module:
    """Replace every normalisation layer of `module` by an identity, in place."""
    for name, child in module.named_children():
        if isinstance(child, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)):
            setattr(module, name, _NoNorm())
        else:
            _without_norms(child)
    return module


@register_method("resunet", "nnU-Net-style residual UNet (MONAI DynUNet): deep supervision, L1 + SSIM, intensity "
                            "augmentation, sliding-window Gaussian inference, test-time mirroring; deterministic")
class ResUNetMethod(RegressionMethod):
    name: ClassVar[str] = "resunet"
    defaults: ClassVar[dict[str, Any]] = RESUNET_DEFAULTS

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        super().__init__(config, data)
        unknown = sorted(set(self.config["mirror"]) - set(MIRRORS))
        if unknown:
            raise CrossdiffError(f"resunet mirror takes flips among {', '.join(MIRRORS)}, not {', '.join(unknown)}")
        window = self.config["window"]
        if window is not None and (len(window) != 2 or min(int(s) for s in window) < 1):
            raise CrossdiffError(f"resunet window must be [h, w] or null, not {window}")
        weights = [0.5**level for level in range(int(self.config["deep_supervision"]) + 1)]
        self.supervision = [w / sum(weights) for w in weights]

    def build_network(self) -> nn.Module:
        filters = [int(f) for f in self.config["filters"]]
        supervised = int(self.config["deep_supervision"])
        if len(filters) < 2 or not 0 <= supervised < len(filters) - 1:
            raise CrossdiffError(f"resunet needs two or more filters and 0 <= deep_supervision < {len(filters) - 1} "
                                 f"(levels - 1), not filters {filters} and deep_supervision {supervised}")
        norm = self.config["norm"]
        network = DynUNet(
            spatial_dims=2,
            in_channels=self.data.source_channels,
            out_channels=self.data.target_channels,
            kernel_size=[3] * len(filters),
            strides=[1] + [2] * (len(filters) - 1),
            upsample_kernel_size=[2] * (len(filters) - 1),
            filters=filters,
            norm_name="instance" if norm == "none" else norm,
            res_block=True,
            deep_supervision=supervised > 0,
            deep_supr_num=max(supervised, 1),
        )
        return _without_norms(network) if norm == "none" else network

    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        source = batch["source"]
        if self.config["intensity_augmentation"]:
            source = augment_intensity(source, context.generator)
        outputs = self._predict(source)  # (B, 1 + deep_supervision, C, H, W) in training with deep supervision
        levels = outputs.unbind(dim=1) if len(self.supervision) > 1 else (outputs,)
        loss, terms = self._reconstruction_loss(levels[0], batch)
        loss = self.supervision[0] * loss
        for weight, output in zip(self.supervision[1:], levels[1:]):
            loss = loss + weight * self._reconstruction_loss(output, batch)[0]
        context.optimize("net", loss)
        return {"loss": float(loss.detach()), **{key: float(value.detach()) for key, value in terms.items()}}

    def _full_resolution(self, source: torch.Tensor) -> torch.Tensor:
        """The main output alone (a network in training mode also returns its deep-supervision outputs)."""
        output = self._predict(source)
        return output[:, 0] if output.dim() == source.dim() + 1 else output

    def _whole(self, source: torch.Tensor) -> torch.Tensor:
        """One prediction per slice from Gaussian-weighted windows (one window when the slice is no larger)."""
        window = self.config["window"] or self.data.size
        inferer = SlidingWindowInferer(
            roi_size=[int(s) for s in window], sw_batch_size=int(self.config["window_batch"]),
            overlap=float(self.config["overlap"]), mode="gaussian", sigma_scale=0.125, padding_mode="constant", cval=-1.0,
        )
        return inferer(source, self._full_resolution)

    @torch.no_grad()
    def translate(
        self, source: torch.Tensor, generator: torch.Generator, samples: int = 1, **options: Any
    ) -> Translation:
        """The mean over every combination of the `mirror` flips of the sliding-window prediction."""
        refuse_sampling(self.name, samples, options)
        axes = [MIRRORS[flip] for flip in self.config["mirror"]]
        flips = [list(chosen) for count in range(len(axes) + 1) for chosen in itertools.combinations(axes, count)]
        total = torch.zeros((), device=source.device)
        for dims in flips:
            flipped = source.flip(dims) if dims else source
            prediction = self._whole(flipped).float()
            total = total + (prediction.flip(dims) if dims else prediction)
        mean = (total / len(flips)).clamp(-1.0, 1.0)
        return Translation(samples=mean[None], nfe=len(flips))
