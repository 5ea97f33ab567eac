"""What every file must pass before a C++ reader (ITK, GDCM, libpng, zlib) is handed it.

Those readers trust their input: a FIFO blocks them forever, a header that declares more voxels than
the file holds makes them allocate gigabytes or pad with zeros, a negative dimension crashes the
process. So crossdiff checks, in Python and without allocating the image, that a file is a regular
file, that its declared size is within `CROSSDIFF_MAX_VOXELS` and matches the bytes it holds, and that
the geometry a reader returns is physically plausible. The format checks (NIfTI, MetaImage, NRRD,
PNG/JPEG, DICOM) live in `crossdiff.headers` and use these helpers.
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import stat
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np

from crossdiff.errors import CrossdiffError, InputError

MAX_VOXELS_VARIABLE = "CROSSDIFF_MAX_VOXELS"
DEFAULT_MAX_VOXELS = 512 * 512 * 1024  # a 1 GiB float32 volume: larger than any CT or MR crossdiff is meant for
# Voxel sizes and positions outside these bounds are not an image of a patient: a damaged header.
SPACING_RANGE_MM = (1e-4, 1e4)
MAX_COORDINATE_MM = 1e6
DIRECTION_TOLERANCE = 1e-3  # how far direction cosines may stray from orthonormal (float rounding in headers)
CHUNK = 1 << 22


def file_status(path: Path) -> os.stat_result:
    """`os.stat` of an input, with every OS failure (missing, permission, name too long) as an InputError."""
    try:
        return path.stat()
    except FileNotFoundError:
        raise InputError(path, "does not exist") from None
    except OSError as error:
        raise InputError(path, f"cannot be read ({error.strerror or error})") from None


def require_regular_file(path: Path) -> int:
    """The size of `path`, which must be an ordinary file: a FIFO, socket or device would block or never end."""
    status = file_status(path)
    if stat.S_ISDIR(status.st_mode):
        raise InputError(path, "is a folder, where a file is expected")
    if not stat.S_ISREG(status.st_mode):
        raise InputError(path, f"is not a regular file (a {_kind(status.st_mode)}); crossdiff reads only ordinary files")
    return status.st_size


def is_regular_file(path: Path) -> bool:
    """True for an ordinary file (or a link to one); never opens it, so a FIFO cannot block."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
             (stat.S_ISBLK, "block device"))
    return next((name for test, name in kinds if test(mode)), "special file")


def max_voxels() -> int:
    """The largest image crossdiff reads, in voxels: CROSSDIFF_MAX_VOXELS, else DEFAULT_MAX_VOXELS."""
    text = os.environ.get(MAX_VOXELS_VARIABLE)
    if text is None:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise CrossdiffError(f"{MAX_VOXELS_VARIABLE} must be a whole number of voxels >= 1, not {text!r}")
    return value


def check_dimensions(path: Path, sizes: Sequence[int], what: str = "image") -> int:
    """The voxel count of positive `sizes`, refused when it exceeds the limit (before anything is allocated)."""
    if not sizes or any(size < 1 for size in sizes):
        raise InputError(path, f"the header declares an {what} of size {_shape(sizes)}: every size must be >= 1")
    voxels = math.prod(sizes)
    limit = max_voxels()
    if voxels > limit:
        raise InputError(path, f"the header declares an {what} of {_shape(sizes)} = {voxels:,} voxels, more than the "
                               f"limit of {limit:,} ({MAX_VOXELS_VARIABLE}); the header is damaged, or raise the limit")
    return voxels


def _shape(sizes: Sequence[int]) -> str:
    return " x ".join(str(size) for size in sizes) or "(none)"


def check_data_bytes(path: Path, available: int, declared: int, where: str = "") -> None:
    """The stored image data must be exactly what the header declares: less is a truncated file, more a
    header that lost dimensions (read as it is, it would give an image of the wrong shape)."""
    place = f" {where}" if where else ""
    if available < declared:
        raise InputError(path, f"could not be read: the image data{place} is truncated ({available:,} of {declared:,} bytes)")
    if available > declared:
        raise InputError(path, f"the image data{place} holds {available:,} bytes, more than the {declared:,} its header "
                               "declares: the header is damaged")


def decoded_length(stream: BinaryIO, codec: str, limit: int) -> int:
    """Bytes a compressed stream ('gzip', 'bzip2' or a bare 'zlib' stream) decodes to, counting at most
    `limit` + 1 of them in constant memory: a stream that decodes to more is stopped there, so a
    'compression bomb' costs no more than the image it claims to be. Corrupt or truncated: ValueError."""
    try:
        if codec == "zlib":
            return _zlib_length(stream, limit)
        reader = gzip.GzipFile(fileobj=stream) if codec == "gzip" else bz2.BZ2File(stream)
        total = 0
        while total <= limit and (chunk := reader.read(CHUNK)):
            total += len(chunk)
        return total
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"the compressed data is corrupt or truncated ({error})") from None


def _zlib_length(stream: BinaryIO, limit: int) -> int:
    decoder = zlib.decompressobj()
    total = 0
    while total <= limit and not decoder.eof:
        data = decoder.unconsumed_tail or stream.read(CHUNK)
        if not data:
            raise EOFError("the stream ends before its end marker")
        total += len(decoder.decompress(data, CHUNK))
    return total


def check_geometry(path: Path, spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]) -> None:
    """Refuse a grid no scanner makes (see `geometry_problem`): what a damaged header gives when a reader
    defaults or passes on whatever it finds."""
    problem = geometry_problem(spacing, origin, direction)
    if problem:
        raise InputError(path, f"{problem} (the header is damaged)")


def geometry_problem(spacing: Sequence[float], origin: Sequence[float], direction: Sequence[float]) -> str | None:
    """What is impossible about a grid: zero, negative, NaN or astronomic voxel sizes, an origin kilometres
    away, direction cosines that are not a rotation (possibly with a flip); None when it is plausible."""
    low, high = SPACING_RANGE_MM
    if not all(math.isfinite(s) and low <= s <= high for s in spacing):
        return f"has voxel size {_numbers(spacing)} mm; each must lie in [{low:g}, {high:g}] mm"
    if not all(math.isfinite(o) and abs(o) <= MAX_COORDINATE_MM for o in origin):
        return f"has origin {_numbers(origin)} mm, not a position in a scanner"
    values = np.asarray(direction, dtype=float)
    n = math.isqrt(values.size)
    if n * n != values.size or not np.isfinite(values).all():
        return f"has direction cosines {_numbers(direction)}, not a rotation"
    matrix = values.reshape(n, n)
    if not np.allclose(matrix @ matrix.T, np.eye(n), atol=DIRECTION_TOLERANCE):
        return f"has direction cosines {_numbers(direction)}, which are not orthonormal"
    return None


def _numbers(values: Iterable[float]) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def parse_numbers(text: str, count: int | None, kind: Callable[[str], float] = float) -> list[float] | None:
    """`count` numbers (any count when None) from whitespace-separated text, or None if it is not that."""
    try:
        values = [kind(part) for part in text.split()]
    except (ValueError, OverflowError):
        return None
    if count is not None and len(values) != count:
        return None
    return values


def data_file_beside(header: Path, name: str, field: str) -> Path:
    """The one data file a detached header (MetaImage, NRRD) names in `field`: a regular file inside the
    header's folder. File lists and patterns are refused (crossdiff reads images stored as one file)."""
    if name.upper().startswith("LIST") or "%" in name or len(name.split()) > 1:
        raise InputError(header, f"{field} {name!r} lists several files, which crossdiff does not read; save the image "
                                 "as one file")
    target = inside_folder(header.parent, name)
    if target is None:
        raise InputError(header, f"{field} {name!r} points outside the header's folder; crossdiff reads data files only "
                                 "beside their header")
    if not os.path.lexists(target):
        raise InputError(header, f"could not be read: its data file {name} is missing (expected at {target})")
    if not is_regular_file(target):
        raise InputError(header, f"its data file {name} is not a regular file")
    return target


def header_integer(path: Path, label: str, text: str, low: int, high: int) -> int:
    """One whole number from `low` to `high` written in a text header as `text` (InputError naming `label`)."""
    values = parse_numbers(text, 1, int)
    if values is None or not low <= values[0] <= high:
        raise InputError(path, f"{label} {text!r} must be a whole number from {low} to {high}")
    return int(values[0])


def inside_folder(folder: Path, name: str) -> Path | None:
    """`folder / name` when the name stays inside `folder` (not absolute, no '..' out of it), else None.

    Header formats that point to a separate data file (MetaImage, NRRD) must not send the reader to
    /dev/zero, a network mount or another user's files. The check is on the name as written: a data
    file that is itself a link (a dataset linked into place) is the user's own choice and is followed."""
    candidate = os.path.normpath(name) if name and "\0" not in name else ""
    if not candidate or os.path.isabs(candidate) or candidate == ".." or candidate.startswith(("../", "..\\")):
        return None
    return folder / candidate


MAX_NAME_LENGTH = 128


def path_name_problem(name: object) -> str | None:
    """Why `name` (a case id, a method's name in a benchmark) cannot be one folder or file name inside
    crossdiff's output folders, or None when it can: it must stay inside them ('../../..' would not)."""
    if not isinstance(name, str) or not name:
        return "must be a non-empty text"
    if len(name) > MAX_NAME_LENGTH:
        return f"is longer than {MAX_NAME_LENGTH} characters"
    if name.startswith(".") or any(ch in name for ch in "/\\") or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "must not start with '.' or hold '/', '\\' or control characters (it becomes a file name)"
    return None
