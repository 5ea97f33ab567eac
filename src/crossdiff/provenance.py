"""Which code produced a result: the package version and, in a git checkout, the commit and whether the
working tree had uncommitted changes, so a committed report can be traced to the code that made it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from crossdiff import __version__


def code_version() -> dict[str, str | bool | None]:
    """{'crossdiff': version, 'commit': sha or None, 'modified': bool or None} (None outside a git checkout)."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"crossdiff": __version__, "commit": commit, "modified": None if status is None else bool(status)}


def describe_code_version() -> str:
    """One line for reports: 'crossdiff 0.1.0, commit abc123 (clean)'."""
    version = code_version()
    if version["commit"] is None:
        return f"crossdiff {version['crossdiff']} (not a git checkout: commit unknown)"
    state = "with uncommitted changes" if version["modified"] else "clean"
    return f"crossdiff {version['crossdiff']}, commit {version['commit']} ({state})"
