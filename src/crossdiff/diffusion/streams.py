"""One random stream per Monte-Carlo item, so a volume's draws do not depend on how they are batched.

A sampler draws the noise of a whole batch at once. From one generator, the numbers a row gets depend
on which rows share its batch and in what order, so a different batch size gives a different result.
`ItemStreams` is a torch.Generator that also holds one generator per batch row, seeded by the item's
key (seed, slice, draw) through NumPy's SeedSequence; `normal` (which `standard_normal` and
`prior_sample` call) fills row i from stream i only. A draw of slice s is then the same whether it
is sampled alone, beside the other draws of s or in a batch of a thousand items, and the first 8
draws of a 32-draw run are those of an 8-draw run. Randomness drawn straight from the base generator
(`torch.randn(..., generator=streams)`) still works but is batch-dependent: sampling code should go
through `normal`.

While the volume path runs a method's `translate` on item streams (`with streams.drawing():`),
`monte_carlo` takes the rows as one batch instead of splitting them again, since the volume path has
already sized the call for the device (`ItemStreams.active`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import numpy as np
import torch

from crossdiff.errors import CrossdiffError


def stream_seed(*entropy: int) -> int:
    """A 64-bit seed from a few integers, well mixed (SeedSequence) so nearby keys get unrelated streams."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1, np.uint64)[0])


class ItemStreams(torch.Generator):
    """A generator for a batch whose row i is item `keys[i]`: row i's noise comes from its own stream."""

    def __new__(cls, seed: int, keys: Sequence[tuple[int, ...]], device: torch.device | str) -> ItemStreams:
        return super().__new__(cls, device)

    def __init__(self, seed: int, keys: Sequence[tuple[int, ...]], device: torch.device | str) -> None:
        self.manual_seed(stream_seed(seed))
        self.keys = [tuple(int(k) for k in key) for key in keys]
        self.rows = [torch.Generator(device).manual_seed(stream_seed(seed, *key)) for key in self.keys]

    def __len__(self) -> int:
        return len(self.rows)

    def normal(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """N(0, I) of `shape` on the streams' device, row i from stream i (one call per row: its numbers
        then depend on nothing but the item's key and how much of its stream earlier calls used)."""
        if not shape or shape[0] != len(self.rows):
            raise CrossdiffError(
                f"noise of shape {tuple(shape)} asked of streams for {len(self.rows)} items: with item streams "
                f"every random draw must have one row per item")
        noise = torch.empty(tuple(shape), dtype=dtype, device=self.device)
        for row, generator in zip(noise, self.rows, strict=True):
            row.normal_(generator=generator)
        return noise

    @contextlib.contextmanager
    def drawing(self) -> Iterator[ItemStreams]:
        """Mark these streams as the ones the current translate call samples its items with."""
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    @staticmethod
    def active() -> ItemStreams | None:
        """The streams of the translate call in progress, or None outside the volume path."""
        return _ACTIVE.get()


_ACTIVE: ContextVar[ItemStreams | None] = ContextVar("crossdiff_item_streams", default=None)


def normal(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """N(0, I) on the generator's device: per item for ItemStreams, else one draw for the whole shape."""
    if isinstance(generator, ItemStreams):
        return generator.normal(shape, dtype)
    return torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
