"""`cddpm-distill`: progressive distillation (Salimans & Ho, ICLR 2022) of a trained `cddpm` into a student
that samples in 1-4 deterministic DDIM steps (crossdiff.diffusion.distillation).

A new run starts from the teacher named by `teacher` (a cddpm run or checkpoint; a relative path is read
from the folder of the `--config` YAML, so a benchmark entry, whose YAML sits in its run folder, names the
same fold's cddpm run as `../NAME`). Its method settings are copied into `teacher_config`, and the
student and a frozen teacher copy are built from them with the teacher's EMA weights; a saved run
rebuilds from `teacher_config` alone and takes both networks from its checkpoint, so it needs the
teacher's files no more. Training runs `rounds` rounds of `round_steps` steps: in round r the student
samples in N_r = steps x 2^(rounds - 1 - r) steps and learns, at a random step of its grid, the x0 whose
one DDIM step lands where the teacher's two land (Salimans & Ho, Algorithm 2), in the teacher's own
prediction parametrisation and loss ('v': the SNR + 1 weighting); then the student becomes the next
round's teacher. After the last round it keeps learning on the final N. The round and the teacher's
weights live in the checkpoint, so a resumed run continues exactly.

The teacher must predict v or x0: an eps prediction turns into x0 by dividing by alpha, which is near 0 at
the first step, where the student has to produce the whole image (Salimans & Ho, section 4). Sampling
starts from noise and is deterministic given it, so Monte-Carlo draws (different start noise) still give
an uncertainty map. The loop's EMA mixes the student across a round change: keep ema_decay low (0.99)
or the last round long.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from crossdiff.diffusion.distillation import ddim_move, ddim_to_zero, step_grid, two_step_target
from crossdiff.diffusion.predictions import diffusion_loss, prediction_target, to_x0_eps
from crossdiff.diffusion.processes import DiscreteVP, per_sample, standard_normal
from crossdiff.diffusion.samplers import Denoise, SampleResult
from crossdiff.diffusion.uncertainty import monte_carlo
from crossdiff.errors import CrossdiffError
from crossdiff.methods import register_method
from crossdiff.methods.base import DataSpec, Method, SingleLossMethod, StepContext, Translation
from crossdiff.methods.unet import SAMPLED_DEFAULTS, checked_settings
from crossdiff.nets.denoiser import build_denoiser

DISTILL_DEFAULTS: dict[str, Any] = {
    "teacher": None,  # the cddpm run or checkpoint to distil (a new run needs it)
    "teacher_config": None,  # the teacher's method settings, copied from it when a new run starts
    "steps": 4,  # the final student's steps (= NFE)
    "rounds": 3,  # halvings: the first student takes steps x 2^(rounds - 1), taught by the teacher at twice that
    "round_steps": 500,  # training steps per round
    **SAMPLED_DEFAULTS,  # lr 2e-4, cddpm's rate (Salimans & Ho: 1e-4 with far longer rounds)
}


class _Round(nn.Module):
    """The current round as a buffer, so checkpoints hold it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("index", torch.zeros((), dtype=torch.long))


@register_method("cddpm-distill", "progressive distillation of a trained cddpm (method config teacher: RUN): "
                                  "a student sampling in 1-4 DDIM steps; stochastic by its start noise")
class DistilledDiffusion(SingleLossMethod):
    name: ClassVar[str] = "cddpm-distill"
    stochastic: ClassVar[bool] = True
    builds_on_a_run: ClassVar[bool] = True

    def __init__(self, config: dict[str, Any], data: DataSpec) -> None:
        super().__init__(checked_settings(self.name, DISTILL_DEFAULTS, config), data)
        c = self.config
        if int(c["steps"]) < 1 or int(c["rounds"]) < 1 or int(c["round_steps"]) < 1:
            raise CrossdiffError(f"cddpm-distill needs steps, rounds and round_steps >= 1, not {c['steps']}, "
                                 f"{c['rounds']} and {c['round_steps']}")
        trained = None
        if c["teacher_config"] is None:
            trained = self._load_teacher(c["teacher"], data)
            c["teacher_config"] = dict(trained.config)
        teacher = c["teacher_config"]
        if teacher.get("prediction") not in ("v", "x0"):
            raise CrossdiffError(f"cddpm-distill needs a teacher that predicts v or x0, not {teacher.get('prediction')!r}")
        self.process = DiscreteVP(int(teacher["timesteps"]), teacher["schedule"])
        step_grid(self.process, self.student_steps(0) * 2)  # the first teacher's grid must fit the process
        self.net = build_denoiser(teacher, data)
        self.teacher = build_denoiser(teacher, data).requires_grad_(False).eval()
        self.round = _Round()
        if trained is not None and not next(self.net.parameters()).is_meta:  # meta: the config check's build
            self.net.load_state_dict(trained.net.state_dict())
            self.teacher.load_state_dict(trained.net.state_dict())

    @classmethod
    def default_settings(cls, settings: dict[str, Any]) -> dict[str, Any]:
        """DISTILL_DEFAULTS: a student cannot be built without a teacher, so the defaults are read, not built."""
        return dict(DISTILL_DEFAULTS)

    @classmethod
    def with_paths_from(cls, config: dict[str, Any], folder: Path) -> dict[str, Any]:
        """A relative `teacher` is read from `folder`, the folder of the YAML that names it."""
        teacher = config.get("teacher")
        if teacher is None or Path(teacher).is_absolute():
            return config
        return {**config, "teacher": str(folder / teacher)}

    @staticmethod
    def _load_teacher(path: str | None, data: DataSpec) -> Method:
        from crossdiff.inference import load_method

        if path is None:
            raise CrossdiffError("cddpm-distill starts from a trained cddpm: name its run in the method settings, "
                                 "teacher: RUN")
        with torch.device("cpu"):  # real weights even while the config check builds the student on 'meta'
            teacher, config, _, _ = load_method(path, "cpu")
        if teacher.name != "cddpm":
            raise CrossdiffError(f"the teacher {path} is a {teacher.name} run; cddpm-distill distils a cddpm")
        if teacher.data != data:
            raise CrossdiffError(f"the teacher {path} was trained on slices {config['data']}, not on these ({data})")
        return teacher

    def student_steps(self, round_index: int) -> int:
        return int(self.config["steps"]) * 2 ** (int(self.config["rounds"]) - 1 - round_index)

    def modules(self) -> dict[str, nn.Module]:
        return {"net": self.net, "teacher": self.teacher, "round": self.round}

    def _output(self, network: nn.Module, x_t: torch.Tensor, source: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return network(x_t, source, self.process.network_time(t))

    def denoiser(self, network: nn.Module, source: torch.Tensor) -> Denoise:
        """A network as the DDIM steps see it, x_t, t -> (x0_hat, eps_hat), x0_hat clipped to [-1, 1] when the
        teacher's sampling clipped it (cddpm's `clip`)."""
        teacher = self.config["teacher_config"]

        def denoise(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            alpha, sigma = per_sample(self.process.alpha(t), x_t), per_sample(self.process.sigma(t), x_t)
            x0_hat, eps_hat = to_x0_eps(teacher["prediction"], self._output(network, x_t, source, t), x_t, alpha, sigma)
            if not teacher.get("clip", True):
                return x0_hat, eps_hat
            x0_hat = x0_hat.clamp(-1.0, 1.0)
            return x0_hat, (x_t - alpha * x0_hat) / sigma

        return denoise

    def _enter_round(self, step: int) -> None:
        wanted = min((step - 1) // int(self.config["round_steps"]), int(self.config["rounds"]) - 1)
        if wanted > int(self.round.index):
            self.teacher.load_state_dict(getattr(self.net, "module", self.net).state_dict())
            self.round.index.fill_(wanted)

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        x0, source = batch["target"], batch["source"]
        steps = self.student_steps(int(self.round.index))
        coarse, fine = step_grid(self.process, steps), step_grid(self.process, 2 * steps)
        k = torch.randint(steps, (x0.shape[0],), generator=generator, device=generator.device).cpu()
        t, middle, s = (times.float().to(x0.device) for times in (coarse[k], fine[2 * k + 1], coarse[k + 1]))
        x_t = self.process.perturb(x0, t, standard_normal(x0, generator))
        with torch.no_grad():
            teach = self.denoiser(self.teacher, source)
            z = ddim_move(self.process, x_t, teach(x_t, t)[0], t, middle)
            z = ddim_move(self.process, z, teach(z, middle)[0], middle, s)
            target_x0 = two_step_target(self.process, x_t, z, t, s)
            alpha, sigma = per_sample(self.process.alpha(t), x0), per_sample(self.process.sigma(t), x0)
            target_eps = (x_t - alpha * target_x0) / sigma
            target = prediction_target(self.config["teacher_config"]["prediction"], target_x0, target_eps, alpha, sigma)
        output = self._output(self.net, x_t, source, t)
        return diffusion_loss(output, target, mask=batch["mask"] if self.config["masked_loss"] else None)

    def training_step(self, batch: dict[str, torch.Tensor], context: StepContext) -> dict[str, float]:
        """At a round's first step the student so far becomes the teacher, then one step of the round."""
        self._enter_round(context.step)
        return {**super().training_step(batch, context), "student_steps": float(self.student_steps(int(self.round.index)))}

    @torch.no_grad()
    def translate(
        self, source: torch.Tensor, generator: torch.Generator, samples: int = 1, *, steps: int | None = None,
        teacher: bool = False, batch: int | None = None, **options: Any,
    ) -> Translation:
        """`samples` draws per slice in `steps` DDIM steps (default: those of the last round training reached,
        the config's `steps` once every round has run). `teacher` samples with the frozen teacher instead (for
        comparisons: after training it is the last round's teacher)."""
        if options:
            raise CrossdiffError(f"cddpm-distill takes the translation options steps, teacher and batch, not "
                                 f"{', '.join(sorted(options))}")
        steps = self.student_steps(int(self.round.index)) if steps is None else int(steps)
        network = self.teacher if teacher else self.net
        shape = (self.data.target_channels, *source.shape[-2:])

        def draw(chunk: torch.Tensor) -> SampleResult:
            start = self.process.prior_sample((chunk.shape[0], *shape), generator).to(source.device)
            return ddim_to_zero(self.denoiser(network, chunk), self.process, start, steps)

        result = monte_carlo(draw, source, samples, int(self.config["batch"] if batch is None else batch))
        return Translation(result.x.float().clamp(-1.0, 1.0), result.nfe)
