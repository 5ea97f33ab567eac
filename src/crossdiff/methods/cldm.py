"""`cldm`: conditional latent diffusion that completes several missing modalities with ONE model.

Stage 1 (`stage: autoencoder`) trains a KL-regularised autoencoder (crossdiff.nets.autoencoder) on the
images of every target modality. Stage 2 (`stage: diffusion`) freezes it and learns conditional DDPM
in its latent space (Rombach et al. 2022): the noisy target latent is concatenated with the source,
and the target's modality code enters the UNet as a class label (MONAI's `num_class_embeds`), so one
network draws CT or MR (or PET) for the same source. Sampling is crossdiff's own (MONAI's inferers do
not pass class labels): any sampler of crossdiff.diffusion.samplers walks a denoise closure that binds
the source and the label.

Choices, and why:
- The source reaches the latent grid by pixel unshuffling (space-to-depth: f x f pixels become f^2
  channels), not through the autoencoder: the autoencoder learns the targets only, so the source
  modality would be foreign to it, and unshuffling keeps every source pixel at no cost in parameters.
- Target latents are the encoder's means (no posterior sampling), multiplied by `scale_factor` =
  1 / std of the training latents so the diffusion sees unit variance, as in latent diffusion; it is
  estimated once by `LatentDiffusion.from_autoencoder` and kept in the config.
- Latents are not clipped while sampling (images are, after decoding): they have no fixed range.
- The frozen autoencoder is a module without an optimiser, so a stage-2 checkpoint holds it and is
  self-contained; the training loop keeps it out of the EMA, DDP and train mode.

A stage-1 run does not translate (`translate` says so); `reconstruction_quality` scores it per modality.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from monai.metrics import SSIMMetric
from monai.networks.nets import DiffusionModelUNet
from torch import nn
from torch.utils.data import DataLoader, Dataset

from crossdiff.data.cases import PreparedCase
from crossdiff.data.slices import MultiTargetSliceDataset, SliceConfig
from crossdiff.diffusion.predictions import check_prediction, diffusion_loss, prediction_target, to_x0_eps
from crossdiff.diffusion.processes import DiscreteVP, per_sample, standard_normal
from crossdiff.diffusion.samplers import Denoise, SampleResult, check_options, sample
from crossdiff.diffusion.uncertainty import monte_carlo
from crossdiff.errors import CrossdiffError
from crossdiff.methods import register_method
from crossdiff.methods.base import DataSpec, Method, StepContext, Translation
from crossdiff.methods.diffusion import sampling_settings
from crossdiff.nets.autoencoder import (
    DISCRIMINATOR_DEFAULTS,
    autoencoder_settings,
    build_autoencoder,
    build_discriminator,
    compression,
    kl_divergence,
)
from crossdiff.nets.denoiser import DENOISER_DEFAULTS

SHARED_DEFAULTS: dict[str, Any] = {
    "stage": "diffusion",
    "targets": ["ct"],  # target modality keys; a key's position is its class label
    "autoencoder": {},  # architecture, see crossdiff.nets.autoencoder.AUTOENCODER_DEFAULTS
}
AUTOENCODER_STAGE_DEFAULTS: dict[str, Any] = {
    "kl_weight": 1e-6,  # MONAI's and latent diffusion's weight: latents stay near N(0, 1) yet keep detail
    "adversarial_weight": 0.0,  # > 0 adds a patch-adversarial term (sharper, slower; off for CPU runs)
    "adversarial_start": 0,  # step from which that term applies (the reconstruction settles first)
    "discriminator": {},  # see crossdiff.nets.autoencoder.DISCRIMINATOR_DEFAULTS
    "lr": 1e-4,
    "weight_decay": 0.0,
}
DIFFUSION_STAGE_DEFAULTS: dict[str, Any] = {
    # the latent grid is 1/f of the slice: three levels (two halvings) suit the 16-64 px latents of
    # 64-256 px slices at f = 4
    **DENOISER_DEFAULTS,
    "channels": [32, 64, 64],
    "attention_levels": [False, False, True],
    "timesteps": 1000,
    "schedule": "linear",
    "prediction": "v",  # as cddpm: see the note at its default in crossdiff.methods.diffusion
    "sampler": "ddim",
    "steps": 50,
    "sampler_options": {},
    "batch": 16,  # slice-draws sampled at once
    "lr": 2e-4,
    "weight_decay": 0.0,
    "scale_factor": None,  # 1 / std of the training latents; set by LatentDiffusion.from_autoencoder
}
SCALE_SAMPLE = 512  # training slices encoded to estimate the latent scale


@register_method(
    "cldm", "conditional latent diffusion, one model for several targets (--stage autoencoder, then diffusion)"
)
class ConditionalLatentDiffusion(Method):
    """The registered name for both stages: building it gives the class of `config['stage']`."""

    name: ClassVar[str] = "cldm"
    stochastic: ClassVar[bool] = True
    multi_target: ClassVar[bool] = True
    training_stages: ClassVar[tuple[str, ...]] = ("autoencoder", "diffusion")  # the keys of STAGES, in order
    stage: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __new__(cls, config: dict[str, Any], data: DataSpec) -> ConditionalLatentDiffusion:
        if cls is ConditionalLatentDiffusion:
            stage = config.get("stage", SHARED_DEFAULTS["stage"])
            if stage not in STAGES:
                raise CrossdiffError(f"cldm has the stages {', '.join(STAGES)}, not {stage!r}")
            cls = STAGES[stage]
        return super().__new__(cls)

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        unknown = sorted(set(config) - set(SHARED_DEFAULTS) - set(self.defaults))
        if unknown:
            raise CrossdiffError(f"cldm's {self.stage} stage does not know the settings {', '.join(unknown)}")
        if config.get("stage", self.stage) != self.stage:
            raise CrossdiffError(f"a cldm {self.stage} stage cannot take stage {config['stage']!r}")
        merged = {**SHARED_DEFAULTS, **self.defaults, **config, "stage": self.stage}
        merged["autoencoder"] = autoencoder_settings(dict(merged["autoencoder"]))
        super().__init__(merged, data)
        targets = list(self.config["targets"])
        if not targets or len(set(targets)) != len(targets):
            raise CrossdiffError(f"cldm needs distinct target modalities, not {targets}")
        self.factor = compression(self.config["autoencoder"])
        if data.target_channels != 1 or any(size % self.factor for size in data.size):
            raise CrossdiffError(
                f"cldm needs one-channel slices whose size is a multiple of the compression {self.factor}, not {data.size}"
            )
        self.autoencoder = build_autoencoder(self.config["autoencoder"])

    @classmethod
    def default_settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """The shared settings and those of the stage `settings` asks for (a new diffusion stage cannot be
        built without its autoencoder, so the defaults are read rather than built)."""
        stage = settings.get("stage", SHARED_DEFAULTS["stage"])
        if stage not in STAGES:
            raise CrossdiffError(f"cldm has the stages {', '.join(STAGES)}, not {stage!r}")
        return {**SHARED_DEFAULTS, "stage": stage, **STAGES[stage].defaults}

    @property
    def targets(self) -> list[str]:
        return list(self.config["targets"])

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 1, H, W) in [-1, 1] through the autoencoder (latent means), clamped to [-1, 1]."""
        images = images.to(next(self.autoencoder.parameters()).device)
        return self.autoencoder.decode(self.autoencoder.encode(images)[0]).float().clamp(-1.0, 1.0)


class AutoencoderStage(ConditionalLatentDiffusion):
    """Stage 1: L1 reconstruction + kl_weight KL (+ adversarial_weight least-squares patch GAN term).

    Learns from batch['target'] of a MultiTargetSliceDataset built with source None (every target's slices)."""

    stochastic: ClassVar[bool] = False
    stage: ClassVar[str] = "autoencoder"
    defaults: ClassVar[dict[str, Any]] = AUTOENCODER_STAGE_DEFAULTS

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        super().__init__(config, data)
        self.discriminator = None
        if float(self.config["adversarial_weight"]) > 0:
            self.discriminator = build_discriminator({**DISCRIMINATOR_DEFAULTS, **self.config["discriminator"]})
            self.adversarial = PatchAdversarialLoss(criterion="least_squares")
        self._optimizers = {name: self._adamw(module) for name, module in self.modules().items()}

    def _adamw(self, module: nn.Module) -> torch.optim.Optimizer:
        lr, decay = float(self.config["lr"]), float(self.config["weight_decay"])
        return torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=decay)

    def modules(self) -> dict[str, nn.Module]:
        extra = {"discriminator": self.discriminator} if self.discriminator is not None else {}
        return {"autoencoder": self.autoencoder, **extra}

    def optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
        return {name: (optimizer, [name]) for name, optimizer in self._optimizers.items()}

    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        images = batch["target"]
        # forward(), not encode/decode: a DDP wrapper syncs gradients only through it. Its posterior draw
        # uses the global RNG, which the loop seeds and every checkpoint saves, so runs still repeat exactly.
        reconstruction, mu, sigma = self.autoencoder(images)
        l1, kl = (reconstruction - images).abs().mean(), kl_divergence(mu.float(), sigma.float())
        loss = l1 + float(self.config["kl_weight"]) * kl
        losses = {"l1": float(l1.detach()), "kl": float(kl.detach())}
        adversarial = self.discriminator is not None and context.step >= int(self.config["adversarial_start"])
        if adversarial:
            fooled = self.adversarial(self.discriminator(reconstruction)[-1], target_is_real=True, for_discriminator=False)
            loss = loss + float(self.config["adversarial_weight"]) * fooled
            losses["generator"] = float(fooled.detach())
        context.optimize("autoencoder", loss)
        if adversarial:
            fake = self.adversarial(self.discriminator(reconstruction.detach())[-1], target_is_real=False, for_discriminator=True)
            real = self.adversarial(self.discriminator(images)[-1], target_is_real=True, for_discriminator=True)
            critic = 0.5 * (fake + real)
            context.optimize("discriminator", critic)
            losses["discriminator"] = float(critic.detach())
        return {"loss": float(loss.detach()), **losses}

    def translate(
        self, source: torch.Tensor, generator: torch.Generator, samples: int = 1, **options: Any
    ) -> Translation:
        raise CrossdiffError(
            "this is a cldm autoencoder (stage 1): it does not translate; train the diffusion stage on it with "
            "`crossdiff train --method cldm --stage diffusion --autoencoder RUN`"
        )


class LatentDiffusion(ConditionalLatentDiffusion):
    """Stage 2: class-conditional DDPM on the frozen autoencoder's scaled latents.

    Learns from a MultiTargetSliceDataset: batch['code'] names each item's target modality. Build a new
    one with `from_autoencoder` (which loads stage 1 and estimates the latent scale); `cls(config, data)`
    rebuilds a saved one, whose checkpoint then supplies the autoencoder's weights.
    """

    stage: ClassVar[str] = "diffusion"
    defaults: ClassVar[dict[str, Any]] = DIFFUSION_STAGE_DEFAULTS

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        super().__init__(config, data)
        if self.config["scale_factor"] is None:
            raise CrossdiffError(
                "cldm's diffusion stage starts from a trained autoencoder: pass --autoencoder RUN "
                "(in Python, LatentDiffusion.from_autoencoder)"
            )
        check_prediction(self.config["prediction"])
        check_options(self.config["sampler"], self.config["sampler_options"])
        self.autoencoder.requires_grad_(False).eval()
        self.scale = float(self.config["scale_factor"])
        self.process = DiscreteVP(int(self.config["timesteps"]), self.config["schedule"])
        self.net = self._denoiser(data)
        self.optimizer = torch.optim.AdamW(
            self.net.parameters(), lr=float(self.config["lr"]), weight_decay=float(self.config["weight_decay"])
        )

    def _denoiser(self, data: DataSpec) -> DiffusionModelUNet:
        """The UNet on the latent grid: in, the noisy latent and the unshuffled source; one class per target."""
        latent = int(self.config["autoencoder"]["latent_channels"])
        settings = {key: self.config[key] for key in DENOISER_DEFAULTS}
        try:
            return DiffusionModelUNet(
                spatial_dims=2,
                in_channels=latent + data.source_channels * self.factor**2,
                out_channels=latent,
                channels=[int(c) for c in settings["channels"]],
                attention_levels=[bool(a) for a in settings["attention_levels"]],
                num_res_blocks=int(settings["num_res_blocks"]),
                norm_num_groups=int(settings["norm_num_groups"]),
                num_head_channels=int(settings["num_head_channels"]),
                num_class_embeds=len(self.targets),
            )
        except ValueError as error:
            raise CrossdiffError(f"cldm denoiser settings: {error}") from None

    @classmethod
    def from_autoencoder(
        cls, autoencoder: str | Path, config: dict[str, Any], data: DataSpec, train_set: Dataset
    ) -> LatentDiffusion:
        """A new stage-2 method on the stage-1 run or checkpoint `autoencoder`: its architecture and EMA
        weights, `config`'s targets (default: all the autoencoder learnt; each must be one of them), and
        the latent scale estimated on `train_set` (a MultiTargetSliceDataset)."""
        from crossdiff.inference import load_method

        stage_one = load_method(autoencoder, "cpu")[0]
        if not isinstance(stage_one, AutoencoderStage):
            raise CrossdiffError(f"{autoencoder} is not a cldm autoencoder run (it is {stage_one.name})")
        targets = list(config.get("targets", stage_one.targets))
        foreign = [target for target in targets if target not in stage_one.targets]
        if foreign:
            raise CrossdiffError(
                f"the autoencoder {autoencoder} learnt {', '.join(stage_one.targets)}, not {', '.join(foreign)}"
            )
        scale = 1.0 / latent_std(stage_one.autoencoder, train_set)
        settings = {**config, "stage": "diffusion", "targets": targets, "autoencoder": stage_one.config["autoencoder"]}
        method = cls({**settings, "scale_factor": scale}, data)
        method.autoencoder.load_state_dict(stage_one.autoencoder.state_dict())
        return method

    def modules(self) -> dict[str, nn.Module]:
        return {"autoencoder": self.autoencoder, "net": self.net}

    def sampling_pixels(self, size: tuple[int, int]) -> int:
        """The latent grid's: the loop's 50 steps run there, the decoder once per item at full size."""
        return (size[0] // self.factor) * (size[1] // self.factor)

    def optimizers(self) -> dict[str, tuple[torch.optim.Optimizer, list[str]]]:
        return {"model": (self.optimizer, ["net"])}

    def labels(self, codes: Sequence[str], device: torch.device) -> torch.Tensor:
        """Class labels of target modality keys; an unknown key is an error naming the known ones."""
        unknown = sorted(set(codes) - set(self.targets))
        if unknown:
            raise CrossdiffError(f"this cldm model makes {', '.join(self.targets)}, not {', '.join(unknown)}")
        return torch.tensor([self.targets.index(code) for code in codes], device=device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Target images -> scaled latents (encoder means times scale_factor)."""
        return self.autoencoder.encode(images)[0] * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents / self.scale).float().clamp(-1.0, 1.0)

    def condition(self, source: torch.Tensor) -> torch.Tensor:
        """Source slices on the latent grid, every pixel kept: (B, C, H, W) -> (B, C f^2, H/f, W/f)."""
        return F.pixel_unshuffle(source, self.factor)

    def _network(self, z_t: torch.Tensor, condition: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z_t, condition], dim=1), timesteps=self.process.network_time(t), class_labels=labels)

    def _loss(self, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """Ho et al. 2020, Algorithm 1, on latents, with the item's target code as the class label."""
        z0 = self.encode(batch["target"])
        t = self.process.sample_time(z0.shape[0], generator).to(z0.device)
        noise = standard_normal(z0, generator)
        labels = self.labels(batch["code"], z0.device)
        output = self._network(self.process.perturb(z0, t, noise), self.condition(batch["source"]), t, labels)
        alpha, sigma = per_sample(self.process.alpha(t), z0), per_sample(self.process.sigma(t), z0)
        return diffusion_loss(output, prediction_target(self.config["prediction"], z0, noise, alpha, sigma))

    def training_step(self, batch: dict[str, Any], context: StepContext) -> dict[str, float]:
        loss = self._loss(batch, context.generator)
        context.optimize("model", loss)
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def validation_loss(self, batch: dict[str, Any], generator: torch.Generator) -> float:
        return float(self._loss(batch, generator))

    def denoiser(self, condition: torch.Tensor, labels: torch.Tensor) -> Denoise:
        """The network as samplers see it, z_t, t -> (z0_hat, eps_hat), bound to a source and target labels."""

        def denoise(z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            alpha, sigma = per_sample(self.process.alpha(t), z_t), per_sample(self.process.sigma(t), z_t)
            return to_x0_eps(self.config["prediction"], self._network(z_t, condition, t, labels), z_t, alpha, sigma)

        return denoise

    @torch.no_grad()
    def translate(
        self,
        source: torch.Tensor,
        generator: torch.Generator,
        samples: int = 1,
        *,
        target: str | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        batch: int | None = None,
        **options: Any,
    ) -> Translation:
        """Draw `samples` images of modality `target` (default: the first of `targets`) per source slice;
        sampler/steps/batch default to the config, `options` are the sampler's."""
        code = self.targets[0] if target is None else target
        name, steps, options = sampling_settings(self.config, sampler, steps, options)
        label = self.labels([code], source.device)
        latent = (int(self.config["autoencoder"]["latent_channels"]), *(s // self.factor for s in source.shape[-2:]))

        def draw(chunk: torch.Tensor) -> SampleResult:
            start = self.process.prior_sample((chunk.shape[0], *latent), generator).to(source.device)
            denoise = self.denoiser(self.condition(chunk), label.expand(chunk.shape[0]))
            result = sample(name, denoise, self.process, start, steps, generator, **options)
            return SampleResult(self.decode(result.x), result.nfe)

        result = monte_carlo(draw, source, samples, int(self.config["batch"] if batch is None else batch))
        return Translation(result.x, result.nfe)


STAGES: dict[str, type[ConditionalLatentDiffusion]] = {"autoencoder": AutoencoderStage, "diffusion": LatentDiffusion}


def stage_datasets(
    config: dict[str, Any],
    train_cases: Sequence[PreparedCase],
    val_cases: Sequence[PreparedCase],
    source: str,
    slices: SliceConfig,
) -> tuple[MultiTargetSliceDataset, MultiTargetSliceDataset | None]:
    """The slices the stage of `config` learns from and is validated on. Stage 1: every target's own
    slices, and no validation set (it does not translate; score it with `reconstruction_quality`).
    Stage 2: source and target slices with their codes, validated on every target (the training loop
    translates each validation item into its own code's target)."""
    targets = list(config.get("targets", SHARED_DEFAULTS["targets"]))
    if config.get("stage", SHARED_DEFAULTS["stage"]) == AutoencoderStage.stage:
        return MultiTargetSliceDataset(train_cases, None, targets, slices, augment=True), None
    validation = MultiTargetSliceDataset(val_cases, source, targets, slices) if val_cases else None
    return MultiTargetSliceDataset(train_cases, source, targets, slices, augment=True), validation


@torch.no_grad()
def latent_std(autoencoder: nn.Module, dataset: Dataset, batch_size: int = 32) -> float:
    """Standard deviation of the encoder means of up to SCALE_SAMPLE target slices of `dataset`, evenly spread."""
    picked = np.unique(np.linspace(0, len(dataset) - 1, min(len(dataset), SCALE_SAMPLE)).round().astype(int))
    device = next(autoencoder.parameters()).device
    latents = [
        autoencoder.encode(batch["target"].to(device))[0].float()
        for batch in DataLoader(torch.utils.data.Subset(dataset, picked.tolist()), batch_size=batch_size)
    ]
    spread = float(torch.cat(latents).std())
    if not spread > 0:
        raise CrossdiffError("the autoencoder's latents do not vary over the training slices: no scale to estimate")
    return spread


@torch.no_grad()
def reconstruction_quality(
    reconstruct: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, batch_size: int = 16
) -> dict[str, dict[str, float]]:
    """Per target modality of a MultiTargetSliceDataset: MAE and PSNR inside the mask and SSIM over the
    whole slice, on the [-1, 1] scale (data range 2), of `reconstruct(target slices)`. Takes any
    reconstruction (an autoencoder's `reconstruct`, or a baseline such as down- and up-sampling)."""
    ssim = SSIMMetric(spatial_dims=2, data_range=2.0)
    sums: dict[str, dict[str, float]] = {}
    for batch in DataLoader(dataset, batch_size=batch_size):
        target, mask = batch["target"].float(), batch["mask"].float()
        output = reconstruct(target).float().cpu()
        scores = ssim(output, target).flatten()
        for i, code in enumerate(batch["code"]):
            inside = mask[i] > 0.5
            difference = (output[i] - target[i])[inside]
            entry = sums.setdefault(code, {"mae": 0.0, "squared": 0.0, "pixels": 0.0, "ssim": 0.0, "slices": 0.0})
            entry["mae"] += float(difference.abs().sum())
            entry["squared"] += float(difference.square().sum())
            entry["pixels"] += float(inside.sum())
            entry["ssim"] += float(scores[i])
            entry["slices"] += 1
    return {
        code: {
            "mae": entry["mae"] / max(entry["pixels"], 1.0),
            "psnr": float(10.0 * np.log10(4.0 / max(entry["squared"] / max(entry["pixels"], 1.0), 1e-12))),
            "ssim": entry["ssim"] / entry["slices"],
        }
        for code, entry in sums.items()
    }
