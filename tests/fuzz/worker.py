"""An isolated worker process: inputs run there under an address-space limit (RLIMIT_AS) and a wall-clock
timeout, so a segfault, an abort, a hang or a runaway allocation ends one input's run, is classified,
and the campaign goes on with a fresh worker. Peak memory is measured per input (VmHWM, reset before
each one through /proc/self/clear_refs)."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from multiprocessing.connection import Connection
from typing import Any

PEAK_RESET = "/proc/self/clear_refs"


def serve(connection: Connection, memory_limit: int) -> None:
    """The worker's loop: run each task received, send back its result; None ends it."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    import SimpleITK as sitk

    from . import targets

    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    while (task := connection.recv()) is not None:
        _reset_peak()
        start = time.perf_counter()
        result = targets.run(task["target"], task["path"])
        result["seconds"] = time.perf_counter() - start
        result["peak_rss_mb"] = _peak_rss_mb()
        result["oracle"] = targets.stated_geometry(task, result)
        connection.send(result)


def _reset_peak() -> None:
    try:
        with open(PEAK_RESET, "w") as handle:
            handle.write("5")
    except OSError:  # not Linux: the peak then covers the worker's life so far
        pass


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Worker:
    """One worker process at a time, restarted after a crash or a hang."""

    def __init__(self, memory_limit: int, timeout: float) -> None:
        self.memory_limit, self.timeout = memory_limit, timeout
        self.context = multiprocessing.get_context("spawn")
        self.process: Any = None
        self.restarts = 0

    def _start(self) -> None:
        parent, child = self.context.Pipe()
        self.process = self.context.Process(target=serve, args=(child, self.memory_limit), daemon=True)
        self.process.start()
        child.close()
        self.connection = parent

    def run(self, task: dict[str, Any]) -> dict[str, Any]:
        """The task's result, or {'outcome': 'hang'} / {'outcome': 'crash', 'exception': the signal or exit code}."""
        if self.process is None or not self.process.is_alive():
            self._start()
        start = time.perf_counter()
        self.connection.send(task)
        if self.connection.poll(self.timeout):
            try:
                return self.connection.recv()
            except (EOFError, ConnectionResetError):
                self.process.join(5)
                code = self.process.exitcode
                self._forget()
                name = signal.Signals(-code).name if code is not None and code < 0 else f"exit code {code}"
                return {"outcome": "crash", "exception": name, "seconds": time.perf_counter() - start}
        self.process.kill()
        self.process.join(5)
        self._forget()
        return {"outcome": "hang", "exception": f"no result in {self.timeout:.0f} s", "seconds": self.timeout}

    def _forget(self) -> None:
        self.connection.close()
        self.process = None
        self.restarts += 1

    def close(self) -> None:
        if self.process is not None and self.process.is_alive():
            self.connection.send(None)
            self.process.join(10)
            if self.process.is_alive():
                os.kill(self.process.pid, signal.SIGKILL)
        self.process = None
