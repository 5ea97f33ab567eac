"""What a method costs, measured the same way for every method: parameters, seconds per training step,
wall seconds and peak memory of a call (the benchmark divides by the slices translated and records the
NFE its translation reports); quality means little without them (a 1000-step sampler and a one-pass
UNet are not used the same way).

Peak memory on a GPU is `torch.cuda.max_memory_allocated` (reset before the measurement, so it is the
measured call's own peak). On the CPU it is the process's peak resident set size from
`resource.getrusage`, which the operating system cannot reset: it covers everything the process did
before, and is labelled as such.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from crossdiff.methods.base import Method
from crossdiff.training import METRICS_LOG

T = TypeVar("T")
CPU_MEMORY = "process peak RSS (whole process so far)"
GPU_MEMORY = "CUDA max allocated during the call"


def parameter_count(method: Method) -> int:
    """Parameters of every network the method owns (e.g. generator and discriminator of a GAN)."""
    return sum(p.numel() for module in method.modules().values() for p in module.parameters())


def training_seconds_per_step(run_dir: Path) -> float | None:
    """Median wall seconds per step over the rates the training loop logged in RUN/metrics.jsonl (the
    median keeps the first window, which holds warm-up and data preparation, from dominating)."""
    rates = [row["steps_per_s"] for row in _logged(run_dir)
             if isinstance(row.get("steps_per_s"), (int, float)) and row["steps_per_s"] > 0]
    return float(np.median([1.0 / value for value in rates])) if rates else None


def training_cpu_seconds(run_dir: Path) -> float | None:
    """The CPU seconds of the training loop: each logged window's steps over its CPU rate, summed (warm-up
    included, which a method that starts slow spends too). A benchmark budget gives every method budget x
    calibrated rate steps, so this is the budget each one actually used: the check on its calibration."""
    rows = [(row["step"], row["steps_per_cpu_s"]) for row in _logged(run_dir)
            if isinstance(row.get("step"), int) and isinstance(row.get("steps_per_cpu_s"), (int, float))
            and row["steps_per_cpu_s"] > 0]
    total, previous = 0.0, 0
    for step, rate in rows:
        total, previous = total + max(step - previous, 0) / rate, step
    return total if rows else None


def _logged(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of RUN/metrics.jsonl that parse (a line cut short by a kill is skipped)."""
    path = Path(run_dir) / METRICS_LOG
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.append(row if isinstance(row, dict) else {})
    return rows


@dataclass(frozen=True)
class Measurement:
    seconds: float
    peak_memory_bytes: int
    memory_kind: str


def measure(call: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, Measurement]:
    """Run `call` once and return its result with wall seconds and peak memory (see the module note)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = call()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if cuda:
        return result, Measurement(seconds, int(torch.cuda.max_memory_allocated(device)), GPU_MEMORY)
    return result, Measurement(seconds, process_peak_rss(), CPU_MEMORY)


def process_peak_rss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
