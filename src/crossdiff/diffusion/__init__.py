"""Diffusion processes (what is noised and how), samplers (how it is walked back) and Monte-Carlo
uncertainty, shared by every diffusion method."""

from crossdiff.diffusion.predictions import PREDICTIONS, diffusion_loss, prediction_target, score, to_x0_eps
from crossdiff.diffusion.processes import SCHEDULES, VESDE, VPSDE, DiscreteVP, GaussianProcess, beta_schedule
from crossdiff.diffusion.samplers import SAMPLERS, Denoise, SampleResult, check_options, sample, sampler_options
from crossdiff.diffusion.uncertainty import monte_carlo

__all__ = [
    "PREDICTIONS",
    "SAMPLERS",
    "SCHEDULES",
    "VESDE",
    "VPSDE",
    "Denoise",
    "DiscreteVP",
    "GaussianProcess",
    "SampleResult",
    "beta_schedule",
    "check_options",
    "diffusion_loss",
    "monte_carlo",
    "prediction_target",
    "sample",
    "sampler_options",
    "score",
    "to_x0_eps",
]
