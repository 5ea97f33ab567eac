"""One trainer per run folder.

Two `crossdiff train` processes writing into one RUN_DIR (a benchmark restarted while its killed parent's
training child still runs, or two benchmark processes given overlapping shares) would interleave their
metrics and overwrite each other's checkpoints. The trainer holds an exclusive lock on RUN_DIR/.training.lock
(flock: the kernel drops it when the process ends, however it ends, so it never goes stale); a second one
is refused before it prepares anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from crossdiff.errors import CrossdiffError

LOCK_FILE = ".training.lock"


@contextlib.contextmanager
def training_lock(run_dir: Path) -> Iterator[None]:
    """Hold RUN_DIR's training lock for the block; CrossdiffError naming the holder's pid if another has it.
    Under torchrun only rank 0 takes it: the ranks of one job train one run together."""
    if os.environ.get("RANK", "0") != "0":
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise CrossdiffError(f"{run_dir} is being trained by another process (pid {holder}); wait for it to end "
                                 "or stop it, then run again") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
