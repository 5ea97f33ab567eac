"""`attgan`: a cycle-consistent GAN whose generators are attention UNets, as the SynDiff paper's attGAN
competitor (Ozbey et al. 2023, after Emami et al.'s attention-guided GANs).

Everything but the generators is CycleGAN's (crossdiff.methods.cyclegan): two generators (source ->
target, used for translation, and target -> source), two 70x70 PatchGAN critics with least-squares
losses and pools of earlier fakes, and a cycle loss; with the paper's weights, cycle 100 and adversarial
1, and no identity term. The generators are MONAI's `AttentionUnet` (Oktay et al. 2018: attention gates
on the skip connections; batch norm in its convolution blocks, instance norm where each decoder level
merges) with a tanh output, so images stay in [-1, 1]; slice sides must be divisible by the product of
`strides`.

At short budgets the cycle weight of 100 dominates: on unpaired brain T1 -> T2 (tests/test_comparison_set.py)
the generators kept the T1 contrast for 700 steps, because the adversarial term has almost no say until
the cycle is nearly exact, which these UNets reach slowly; with weight 1 the same networks learn.

`channels` defaults to MONAI's usual [64, 128, 256, 512]; on the CPU budgets of this project it is
scaled down (e.g. [16, 32, 64, 128] in benchmarks/configs/brain-unpaired.yaml), keeping the
architecture and the losses.
"""

from __future__ import annotations

from typing import Any, ClassVar

from monai.networks.nets import AttentionUnet
from torch import nn

from crossdiff.methods import register_method
from crossdiff.methods.cyclegan import CYCLEGAN_DEFAULTS, CycleGANMethod

ATTGAN_DEFAULTS: dict[str, Any] = {
    **{key: value for key, value in CYCLEGAN_DEFAULTS.items() if key not in ("filters", "blocks", "downsamplings", "norm")},
    "channels": [64, 128, 256, 512],
    "strides": [2, 2, 2],
    "cycle_weight": 100.0,
    "identity_weight": 0.0,
}


@register_method("attgan", "attGAN: CycleGAN with attention-UNet generators and PatchGANs, cycle (x 100) + "
                           "adversarial losses; unpaired, 2-D")
class AttentionGANMethod(CycleGANMethod):
    name: ClassVar[str] = "attgan"
    defaults: ClassVar[dict[str, Any]] = ATTGAN_DEFAULTS

    def build_generator(self, channels: int) -> nn.Module:
        c = self.config
        unet = AttentionUnet(spatial_dims=2, in_channels=channels, out_channels=channels, channels=list(c["channels"]),
                             strides=list(c["strides"]), dropout=float(c["dropout"]))
        return nn.Sequential(unet, nn.Tanh())
