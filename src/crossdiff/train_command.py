"""Training through the `crossdiff train` command in a child process, exactly as a user runs it: what the
benchmark and the scripts under benchmarks/ use, so they measure the real code path. A run folder that
already holds a checkpoint is resumed from it (its saved config wins); otherwise `config` starts it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from crossdiff import checkpoints
from crossdiff.errors import CrossdiffError


@dataclass(frozen=True)
class CommandRun:
    """How the run went: wall seconds of this call, whether it resumed an earlier run, the command, and
    the training process's own peak resident set size in bytes (its rusage from `os.wait4`: one number
    per run, unlike the benchmark process's peak, which covers everything it did before)."""

    seconds: float
    resumed: bool
    command: list[str]
    peak_memory_bytes: int


def train_with_command(method: str, manifest: Path, run_dir: Path, config: Path, options: list[str],
                       new_run_options: list[str] | None = None) -> CommandRun:
    """`crossdiff train --method METHOD --manifest MANIFEST --out RUN_DIR OPTIONS`, plus `--config CONFIG`
    and `new_run_options` (e.g. cldm's --autoencoder) for a new run or `--resume` for a started one."""
    command = [sys.executable, "-m", "crossdiff", "train", "--method", method, "--manifest", str(manifest),
               "--out", str(run_dir), *options]
    resumed = checkpoints.latest_checkpoint(run_dir) is not None
    command += ["--resume"] if resumed else ["--config", str(config), *(new_run_options or [])]
    start = time.perf_counter()
    with subprocess.Popen(command) as child:
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
    if child.returncode != 0:
        raise CrossdiffError(f"training {method} in {run_dir} failed (exit code {child.returncode}; its message is "
                             "above); run again to resume from the last checkpoint")
    peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024  # Linux reports KiB
    return CommandRun(time.perf_counter() - start, resumed, command, int(peak))
