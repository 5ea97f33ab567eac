"""Helpers for tests that run the real `crossdiff` command line in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "crossdiff" / "sample" / "STS_003"
SHARED_DATA = Path(os.environ.get("CROSSDIFF_SHARED_DATA", REPO.parent / "shared" / "data"))
SARCOMA = SHARED_DATA / "sarcoma-ct-mr-pet"
BRAIN = SHARED_DATA / "brain-multicontrast-mri"
BRAINWEB = SHARED_DATA / "brainweb-t1-pd-slices"


def require_shared() -> None:
    """Skip without ../shared/data on a developer's machine; in CI (CI=true) its absence is a failure."""
    if SHARED_DATA.is_dir():
        return
    message = f"shared data not found at {SHARED_DATA} (set CROSSDIFF_SHARED_DATA)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir() and not os.environ.get("CI"), reason=f"shared data not found at {SHARED_DATA}"
)


def crossdiff(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "crossdiff", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def assert_clear_failure(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit 1, no traceback, and an error line naming the file and the problem."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:")
    text = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"
