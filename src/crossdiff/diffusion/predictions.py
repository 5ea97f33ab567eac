"""What the network predicts, and the denoising loss.

The network may predict the noise eps ('epsilon', Ho et al. 2020), the clean image ('x0') or the
velocity ('v', Salimans & Ho 2022). Samplers only see (x0_hat, eps_hat), so these conversions are the
one place the choice matters. The velocity is written for any alpha, sigma as
v = (alpha eps - sigma x0) / sqrt(alpha^2 + sigma^2), which is Salimans & Ho's v on VP processes
(alpha^2 + sigma^2 = 1) and keeps the target at unit scale on VE ones.

Predicting epsilon is denoising score matching with the weight lambda(t) = sigma(t)^2 (Song et al.
2021, eq. 7): sigma * score = -eps.
"""

from __future__ import annotations

import torch

from crossdiff.errors import CrossdiffError

PREDICTIONS = ("epsilon", "v", "x0")


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise CrossdiffError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


def prediction_target(
    prediction: str, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The training target for x_t = alpha x0 + sigma noise (alpha, sigma broadcastable to x0)."""
    check_prediction(prediction)
    if prediction == "epsilon":
        return noise
    if prediction == "x0":
        return x0
    return (alpha * noise - sigma * x0) * torch.rsqrt(alpha**2 + sigma**2)


def to_x0_eps(
    prediction: str, output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0_hat, eps_hat) from the network output, consistent with x_t = alpha x0_hat + sigma eps_hat."""
    check_prediction(prediction)
    if prediction == "epsilon":
        return (x_t - sigma * output) / alpha, output
    if prediction == "x0":
        return output, (x_t - alpha * output) / sigma
    norm2 = alpha**2 + sigma**2
    scaled_v = output * torch.sqrt(norm2)
    return (alpha * x_t - sigma * scaled_v) / norm2, (sigma * x_t + alpha * scaled_v) / norm2


def score(eps_hat: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """grad log p_t(x) = -eps_hat / sigma (Vincent 2011; Song et al. 2021)."""
    return -eps_hat / sigma


def diffusion_loss(
    output: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error per sample, averaged over the batch.

    weight: (B,) per-sample weights (e.g. a lambda(t)); mask: (B, 1, H, W) of 0/1, to learn only inside
    the body, each sample averaged over its own masked pixels (a sample with an empty mask adds 0).
    """
    error = (output - target) ** 2
    if mask is None:
        per_sample = error.flatten(1).mean(dim=1)
    else:
        mask = mask.expand_as(error).to(error.dtype)
        per_sample = (error * mask).flatten(1).sum(dim=1) / mask.flatten(1).sum(dim=1).clamp(min=1.0)
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample.dtype)
    return per_sample.mean()
