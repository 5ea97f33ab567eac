"""`sagan`: a cycle-consistent GAN whose ResNet generators have self-attention in their last residual
blocks (SAGAN, Zhang et al. 2019), as the SynDiff paper's SAGAN competitor (Ozbey et al. 2023).

Everything but the generators is CycleGAN's (crossdiff.methods.cyclegan): two generators (source ->
target for translation, target -> source), two 70x70 PatchGAN critics with least-squares losses and
pools of earlier fakes, cycle (x 10) and identity losses. The generators are CycleGAN's ResNet with a
SAGAN self-attention layer (crossdiff.nets.gan.SelfAttention2d) after each of the last
`attention_blocks` residual blocks, where every position of the downsampled feature map can draw on
every other (long-range anatomy, which convolutions see only through depth). SAGAN's spectral
normalisation and hinge loss are not used: the SynDiff paper describes this competitor by its
self-attention generators in a cycle-consistent GAN.

The defaults are CycleGAN's published widths (64 filters, 9 blocks); on the CPU budgets of this project
they are scaled down (benchmarks/configs/brain-unpaired.yaml), keeping the architecture and the losses.
"""

from __future__ import annotations

from typing import Any, ClassVar

from crossdiff.methods import register_method
from crossdiff.methods.cyclegan import CYCLEGAN_DEFAULTS, CycleGANMethod

SAGAN_DEFAULTS: dict[str, Any] = {**CYCLEGAN_DEFAULTS, "attention_blocks": 2}


@register_method("sagan", "SAGAN: CycleGAN whose ResNet generators have self-attention in their last residual "
                          "blocks; PatchGANs, cycle + identity losses; unpaired, 2-D")
class SelfAttentionGANMethod(CycleGANMethod):
    name: ClassVar[str] = "sagan"
    defaults: ClassVar[dict[str, Any]] = SAGAN_DEFAULTS

    def resnet_settings(self) -> dict[str, Any]:
        return {**super().resnet_settings(), "attention_blocks": int(self.config["attention_blocks"])}
