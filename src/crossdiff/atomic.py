"""Write outputs so that a failed run leaves nothing half-written and never clobbers an earlier result.

Every writer in crossdiff goes through these helpers: the data lands in a temporary sibling first
and is moved over the destination with one `os.replace` only when it is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _format_suffix(path: Path) -> str:
    """The lower-case format suffix (`.nii.gz` kept whole): writers such as ITK pick the format by it."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _file_mode() -> int:
    """Permissions of an ordinary new file (0666 less the umask); mkstemp's files are private (0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(destination: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `destination`; on success move it into place, else delete it.

    The temporary name carries only the format suffix (no second '.nii' inside it, which NIfTI
    writers would misread), so any writer that sniffs the suffix writes the right format.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    base = destination.name.replace(".", "_")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{base}.", suffix=f"_tmp{_format_suffix(destination)}", dir=destination.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(_file_mode())
        os.replace(tmp, destination)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(destination: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `destination` whole, else it is removed."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    try:
        yield tmp
        if destination.exists():
            old = destination.with_name(f".{destination.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(destination, old)
            os.replace(tmp, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, destination)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(destination: str | Path, text: str) -> None:
    with atomic_path(destination) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(destination: str | Path, payload: Any) -> None:
    write_text(destination, json.dumps(payload, indent=2, sort_keys=False) + "\n")
