"""Training through the `crossdiff train` command in a child process, exactly as a user runs it: what the
benchmark and the scripts under benchmarks/ use, so they measure the real code path. A run folder that
already holds a checkpoint is resumed from it (its saved config wins); otherwise `config` starts it."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from crossdiff import checkpoints
from crossdiff.errors import CrossdiffError

POLL_SECONDS = 0.25
PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class CommandRun:
    """How the run went: wall seconds of this call, whether it resumed an earlier run, the command, and
    the training process's own peak resident set size in bytes (None where /proc is missing)."""

    seconds: float
    resumed: bool
    command: list[str]
    peak_memory_bytes: int | None


def train_with_command(method: str, manifest: Path, run_dir: Path, config: Path, options: list[str],
                       new_run_options: list[str] | None = None) -> CommandRun:
    """`crossdiff train --method METHOD --manifest MANIFEST --out RUN_DIR OPTIONS`, plus `--config CONFIG`
    and `new_run_options` (e.g. cldm's --autoencoder) for a new run or `--resume` for a started one."""
    command = [sys.executable, "-m", "crossdiff", "train", "--method", method, "--manifest", str(manifest),
               "--out", str(run_dir), *options]
    resumed = checkpoints.latest_checkpoint(run_dir) is not None
    command += ["--resume"] if resumed else ["--config", str(config), *(new_run_options or [])]
    start = time.perf_counter()
    with subprocess.Popen(command, preexec_fn=_dies_with_parent if sys.platform.startswith("linux") else None) as child:
        peak = _peak_rss_until_exit(child)
    if child.returncode != 0:
        raise CrossdiffError(f"training {method} in {run_dir} failed (exit code {child.returncode}; its message is "
                             "above); run again to resume from the last checkpoint")
    return CommandRun(time.perf_counter() - start, resumed, command, peak)


def _dies_with_parent() -> None:
    """In the child, before it runs: Linux sends it SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG), so
    a killed benchmark does not leave its training running on, unseen, into a run folder a restart wants.
    prctl is looked up in the parent: the forked child calls it and nothing else."""
    _PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def _peak_rss_until_exit(child: subprocess.Popen) -> int | None:
    """The child's high-water RSS (VmHWM of /proc/PID/status, read every POLL_SECONDS until it exits;
    the mark only rises, so the last reading misses at most the final moments). Not the rusage of
    `wait4`: Linux carries a process's peak across fork and exec, so a child's ru_maxrss starts at its
    parent's size (measured: 427 MB for `python -c pass` started by a 400 MB parent)."""
    status, peak = Path(f"/proc/{child.pid}/status"), None
    while True:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak or 0, int(line.split()[1]) * 1024)  # kB
        except (OSError, ValueError):
            pass  # gone already, or no /proc (not Linux)
        try:
            child.wait(timeout=POLL_SECONDS)
            return peak
        except subprocess.TimeoutExpired:
            continue
