"""How a loaded method's networks run fast at inference on any device: the autocast dtype per device,
the memory format, optional torch.compile (Acceleration), and how many (slice, draw) items go through
them at once (BatchSizer).

None of it changes what a method computes beyond floating-point rounding; precision 'fp32' without
compile is the reference. Measured effects are in benchmarks/results/speed.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from crossdiff.errors import CrossdiffError
from crossdiff.methods.base import Method

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# CPU: as many items as make one 256 x 256 slice. At 256 x 256, batches of 1, 2 and 4 items took the same
# time to within noise (benchmarks/results/speed.md, "Batch size on the CPU"): a bigger batch buys nothing
# there and costs memory; the demo's 64 x 64 items go 16 at a time, as the demo model's `batch` did before.
CPU_BATCH_PIXELS = 16 * 64 * 64
PROBE_ITEMS = 4  # CUDA: items in the first batch, whose peak memory gives the per-item footprint
MEMORY_SHARE = 0.7  # of the memory still available after the probe, what the chosen batch may take
MAX_BATCH = 4096


@dataclass(frozen=True)
class Acceleration:
    """`precision`: 'auto' is bf16 on CUDA (fp16 where bf16 is missing) and fp32 on the CPU. bf16 on a CPU
    with AMX was 2.4x faster but moved the demo's MAE (benchmarks/results/speed.md): a result should not
    depend on which CPU a user happens to have, so the CPU gets bf16 only when asked.
    `channels_last`: the networks' convolutions in NHWC. `compile`: torch.compile the networks (CUDA
    graphs on CUDA) and pad the last batch so every batch has the same shape."""

    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise CrossdiffError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")

    def resolved(self, device: torch.device) -> str:
        """'fp32', 'bf16' or 'fp16': what 'auto' means on `device`, or the precision asked for."""
        precision = self.precision if self.precision != "auto" else _native_precision(device)
        if precision == "fp16" and device.type == "cpu":
            raise CrossdiffError("precision fp16 needs a GPU; on the CPU use bf16 or fp32")
        return precision

    def dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype on `device`, None for fp32."""
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.resolved(device)]


def _native_precision(device: torch.device) -> str:
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


@contextlib.contextmanager
def accelerated(method: Method, device: torch.device, acceleration: Acceleration) -> Iterator[None]:
    """Inference mode and autocast, and the method's networks in channels_last and compiled if asked,
    for the duration; the networks are put back as they were afterwards."""
    modules = method.modules()
    dtype = acceleration.dtype(device)
    if acceleration.channels_last:
        for module in modules.values():
            module.to(memory_format=torch.channels_last)
    if acceleration.compile:
        mode = "reduce-overhead" if device.type == "cuda" else None
        for name, module in modules.items():
            setattr(method, name, torch.compile(module, mode=mode, dynamic=False))
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    try:
        with torch.inference_mode(), autocast:
            yield
    finally:
        for name, module in modules.items():
            setattr(method, name, module)
            module.to(memory_format=torch.contiguous_format)


class BatchSizer:
    """Items per network batch: the requested number; on CUDA, after a probe batch of PROBE_ITEMS whose
    peak memory gives the per-item footprint, as many as fit in MEMORY_SHARE of what is still available;
    elsewhere CPU_BATCH_PIXELS / pixels per item. Results do not depend on the batch size (every item has
    its own random stream), so the probe batch is part of the real work."""

    def __init__(self, requested: int | None, device: torch.device, pixels: int) -> None:
        if requested is not None and requested < 1:
            raise CrossdiffError(f"the batch size must be >= 1, not {requested}")
        self.device = device
        self.measured = requested is not None or device.type != "cuda"
        if requested is not None:
            self.batch = requested
        elif device.type == "cuda":
            self.batch = PROBE_ITEMS
        else:
            self.batch = max(1, CPU_BATCH_PIXELS // pixels)

    @contextlib.contextmanager
    def measuring(self, items: int) -> Iterator[None]:
        """Wrap the first batch: its footprint fixes the batch size of the rest (CUDA only)."""
        if self.measured:
            yield
            return
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        yield
        per_item = max((torch.cuda.max_memory_allocated(self.device) - before) / items, 1.0)
        free, _ = torch.cuda.mem_get_info(self.device)
        cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        self.batch = int(min(MAX_BATCH, max(1, MEMORY_SHARE * (free + cached) // per_item)))
        self.measured = True
