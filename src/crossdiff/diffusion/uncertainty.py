"""Monte-Carlo uncertainty: draw several samples per slice and keep all of them; their mean is the
translation and their per-pixel standard deviation the uncertainty map (`Translation.mean`/`.std`).

Draws of all slices are flattened into one list of (draw, slice) items and sampled `batch` items at
a time, so memory stays bounded however many draws are asked for. All randomness comes from one
generator consumed in a fixed order, so the same seed and settings give identical output. The volume
path (crossdiff.inference) instead hands every call one device batch of items with one random stream
each (crossdiff.diffusion.streams): those rows are sampled as one batch, whatever `batch` says.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from crossdiff.diffusion.samplers import SampleResult
from crossdiff.diffusion.streams import ItemStreams
from crossdiff.errors import CrossdiffError

# Samples target images for a chunk of source slices (one output per source row).
Draw = Callable[[torch.Tensor], SampleResult]


def monte_carlo(draw: Draw, source: torch.Tensor, samples: int, batch: int) -> SampleResult:
    """`samples` draws for each of the B slices of `source` -> SampleResult with x (samples, B, C, H, W)
    and nfe per draw (the largest over chunks, which differ only for adaptive samplers)."""
    if samples < 1 or batch < 1:
        raise CrossdiffError(f"need samples >= 1 and batch >= 1, not {samples} and {batch}")
    slices = source.shape[0]
    streams = ItemStreams.active()
    if streams is not None:
        if len(streams) != samples * slices:
            raise CrossdiffError(f"{len(streams)} item streams for {samples} draw(s) of {slices} slice(s)")
        batch = samples * slices  # the volume path sized this call for the device
    results = [draw(source[chunk % slices]) for chunk in torch.arange(samples * slices).split(batch)]
    x = torch.cat([result.x for result in results])
    return SampleResult(x.reshape(samples, slices, *x.shape[1:]), max(result.nfe for result in results))
