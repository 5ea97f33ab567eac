"""`munit` (Huang, Liu, Belongie & Kautz, ECCV 2018): unpaired translation that splits every image into a
content code shared by the domains and a style code of its own domain (crossdiff.nets.munit: ResNet
content encoder, MLP-fed AdaIN decoder, style encoder; crossdiff.methods.two_domain's PatchGAN critics).

Per step, with a the source and b the target slices and s_a, s_b drawn from N(0, I):
- image reconstruction: each image decoded from its own content and style, `image_weight` x L1;
- translation: b' = decoder_b(content(a), s_b) and a' = decoder_a(content(b), s_a) must fool the
  target and source critics (least squares, `gan_weight`);
- latent reconstruction: encoding the translations again must give back the content they came from
  (`content_weight` x L1) and the style they were drawn with (`style_weight` x L1).
The weights are MUNIT's (gan 1, image 10, content 1, style 1; its optional style-augmented cycle loss is
off by default there and not used here), and so are the widths by default (64 filters, 2 downsamplings,
4 residual blocks, an 8-number style, a 256-wide MLP); on this project's CPU budgets they are scaled
down (benchmarks/configs/brain-unpaired.yaml), keeping the architecture and the losses.

Translation decodes the source's content with the target decoder and a style drawn from N(0, I), so
it is stochastic: `--samples N` draws N styles, their mean is the output and their per-pixel spread the
uncertainty map. 2-D slices only (`slices: {context: 0}`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from crossdiff.diffusion.processes import standard_normal
from crossdiff.diffusion.samplers import SampleResult
from crossdiff.diffusion.uncertainty import monte_carlo
from crossdiff.errors import CrossdiffError
from crossdiff.methods import register_method
from crossdiff.methods.base import DataSpec, StepContext, Translation
from crossdiff.methods.two_domain import CRITIC_DEFAULTS, TwoDomainGAN
from crossdiff.nets.munit import AdaINDecoder, StyleEncoder, check_munit_settings, content_encoder

MUNIT_DEFAULTS: dict[str, Any] = {
    "filters": 64,
    "downsamplings": 2,
    "blocks": 4,
    "style_dim": 8,
    "style_downsamplings": 4,
    "mlp_dim": 256,
    "gan_weight": 1.0,
    "image_weight": 10.0,
    "content_weight": 1.0,
    "style_weight": 1.0,
    **CRITIC_DEFAULTS,
    "batch": 16,  # slice-draws translated at once
}


@register_method("munit", "MUNIT: content (ResNet) + style (MLP, AdaIN decoder) codes; image, content and style "
                          "reconstruction + adversarial losses; unpaired, 2-D; stochastic (style draws)")
class MUNITMethod(TwoDomainGAN):
    name: ClassVar[str] = "munit"
    stochastic: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = MUNIT_DEFAULTS
    generator_modules: ClassVar[tuple[str, ...]] = (
        "source_content", "source_style", "source_decoder", "target_content", "target_style", "target_decoder")

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        super().__init__(config, data)
        c, channels = self.config, data.source_channels
        filters, downsamplings, blocks = int(c["filters"]), int(c["downsamplings"]), int(c["blocks"])
        style_dim, style_downsamplings, mlp_dim = int(c["style_dim"]), int(c["style_downsamplings"]), int(c["mlp_dim"])
        check_munit_settings(filters, downsamplings, blocks, style_dim, style_downsamplings, mlp_dim)
        for domain in ("source", "target"):
            setattr(self, f"{domain}_content", content_encoder(channels, filters, downsamplings, blocks))
            setattr(self, f"{domain}_style", StyleEncoder(channels, filters, style_downsamplings, style_dim))
            setattr(self, f"{domain}_decoder", AdaINDecoder(channels, filters, downsamplings, blocks, style_dim, mlp_dim))

    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        a, b, c = batch["source"], batch["target"], self.config
        content_a, style_a = self.source_content(a), self.source_style(a)
        content_b, style_b = self.target_content(b), self.target_style(b)
        drawn_a, drawn_b = standard_normal(style_a, context.generator), standard_normal(style_b, context.generator)
        fake_a, fake_b = self.source_decoder(content_b, drawn_a), self.target_decoder(content_a, drawn_b)

        image = ((self.source_decoder(content_a, style_a) - a).abs().mean()
                 + (self.target_decoder(content_b, style_b) - b).abs().mean())
        content = ((self.target_content(fake_b) - content_a).abs().mean()
                   + (self.source_content(fake_a) - content_b).abs().mean())
        style = (self.target_style(fake_b) - drawn_b).abs().mean() + (self.source_style(fake_a) - drawn_a).abs().mean()
        adversarial = self.fool_critics(fake_b, fake_a)
        loss = (float(c["gan_weight"]) * adversarial + float(c["image_weight"]) * image
                + float(c["content_weight"]) * content + float(c["style_weight"]) * style)
        context.optimize("generators", loss)  # also fills the critics' gradients; their step zeroes them first
        critics = self.update_critics(batch, fake_a, fake_b, context)
        logged = {"loss": loss, "adversarial": adversarial, "image": image, "content": content, "style": style,
                  "discriminators": critics}
        return {key: float(value.detach()) for key, value in logged.items()}

    @torch.no_grad()
    def translate(
        self, source: torch.Tensor, generator: torch.Generator, samples: int = 1, **options: Any
    ) -> Translation:
        """`samples` draws per slice, each with its own target style from N(0, I)."""
        if options:
            raise CrossdiffError(f"munit takes no translation options (got {', '.join(sorted(options))})")
        style_dim = int(self.config["style_dim"])

        def draw(chunk: torch.Tensor) -> SampleResult:
            style = standard_normal(chunk.new_empty(chunk.shape[0], style_dim), generator)
            return SampleResult(self.target_decoder(self.source_content(chunk), style), 1)

        result = monte_carlo(draw, source, samples, int(self.config["batch"]))
        return Translation(result.x.float().clamp(-1.0, 1.0), result.nfe)
