"""Write outputs so that a failed run leaves nothing half-written and never clobbers an earlier result.

Every writer in crossdiff goes through these helpers: the data lands in a temporary sibling first,
is flushed to the disk (fsync), and is moved over the destination with one `os.replace` only when it
is complete; the folder is then flushed too, so after a power cut the destination is the old or the
new version, never an empty file. Temporary names carry the writer's process id, so the temporaries
of a killed run are recognised and removed by the next writer of the same destination. A file system
that refuses (read-only, full, no permission) is an InputError naming the destination.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crossdiff.errors import InputError


def _format_suffix(path: Path) -> str:
    """The lower-case format suffix (`.nii.gz` kept whole): writers such as ITK pick the format by it."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else Path(name).suffix


def _file_mode() -> int:
    """Permissions of an ordinary new file (0666 less the umask); mkstemp's files are private (0600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _unwritable(destination: Path, error: OSError) -> InputError:
    return InputError(destination, f"could not be written ({error.strerror or error})")


@contextlib.contextmanager
def atomic_path(destination: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `destination`; on success move it into place, else delete it.

    The temporary name carries only the format suffix (no second '.nii' inside it, which NIfTI
    writers would misread), so any writer that sniffs the suffix writes the right format.
    """
    destination = Path(destination)
    base = destination.name.replace(".", "_")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(destination.parent, f".{base}.")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{base}.{os.getpid()}.", suffix=f"_tmp{_format_suffix(destination)}",
                                        dir=destination.parent)
        os.close(fd)
    except OSError as error:
        raise _unwritable(destination, error) from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(_file_mode())
        _fsync(tmp)
        os.replace(tmp, destination)
        _fsync(destination.parent)
    except OSError as error:
        raise _unwritable(destination, error) from None
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(destination: str | Path, private: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `destination` whole, else it is removed.

    The folder and its files get ordinary permissions (mkdtemp's folder and safetensors' files are
    private), except the files named in `private` (paths inside the folder: secrets), which only their
    owner may read; everything is flushed to the disk before the folder is published."""
    destination = Path(destination)
    old = destination.with_name(f".{destination.name}.old")
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        if old.is_dir() and not destination.exists():  # a run died between the two renames below
            os.replace(old, destination)
        remove_stale(destination.parent, f".{destination.name}.")
        tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.{os.getpid()}.", suffix=".tmp", dir=destination.parent))
    except OSError as error:
        raise _unwritable(destination, error) from None
    try:
        yield tmp
        _publishable(tmp, {tmp / name for name in private})
        if destination.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(destination, old)
            os.replace(tmp, destination)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, destination)
        _fsync(destination.parent)
    except OSError as error:
        raise _unwritable(destination, error) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publishable(folder: Path, private: set[Path]) -> None:
    """Ordinary permissions for everything under `folder` (folders searchable where readable) but the
    `private` files (owner only), and every byte of it on the disk."""
    file_mode = _file_mode()
    folder_mode = file_mode | (file_mode & 0o444) >> 2
    for root, _, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            path.chmod(0o600 if path in private else file_mode)
            _fsync(path)
        Path(root).chmod(folder_mode)
        _fsync(Path(root))


def fsync_folder(folder: Path) -> None:
    """Flush a folder's entries (renames, new links) to the disk."""
    _fsync(folder)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to the disk: a rename is only as durable as its data."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


TEMPORARY = re.compile(r"\.(\d+)\.[^/]*(?:_tmp[.\w]*|\.tmp)\Z")


def remove_stale(folder: Path, prefix: str) -> None:
    """Delete temporaries `prefix<pid>.*` in `folder` whose writing process no longer runs (killed runs)."""
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            found = TEMPORARY.match(entry.name[len(prefix) - 1 :]) if entry.name.startswith(prefix) else None
            if found and not _running(int(found.group(1))):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or not a pid we can ask about): leave its files alone
    return True


def check_writable(folder: str | Path) -> None:
    """Refuse before any work is done when `folder` could not be created or written (read-only, no
    permission): a file is created and removed in it, or in its nearest existing parent (nothing is left)."""
    folder = Path(folder).absolute()
    existing = next((p for p in (folder, *folder.parents) if os.path.lexists(p)), Path("/"))
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a folder", str(existing))
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise InputError(folder, f"cannot be written ({error.strerror or error})") from None


def write_text(destination: str | Path, text: str) -> None:
    with atomic_path(destination) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(destination: str | Path, payload: Any) -> None:
    write_text(destination, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def write_texts(folder: str | Path, texts: dict[str, str]) -> list[Path]:
    """Several files of one result, published together: all are written and flushed first, then renamed
    one after the other, so a failure while writing (full disk) leaves every earlier file as it was."""
    folder = Path(folder)
    with contextlib.ExitStack() as stack:
        staged = {name: stack.enter_context(atomic_path(folder / name)) for name in texts}
        for name, tmp in staged.items():
            try:
                tmp.write_text(texts[name], encoding="utf-8")
            except OSError as error:
                raise _unwritable(folder / name, error) from None
    return [folder / name for name in texts]
