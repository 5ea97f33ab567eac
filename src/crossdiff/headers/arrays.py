"""NumPy (.npy, .npz) and MATLAB (.mat) arrays, checked before their loaders allocate them.

`np.load` allocates the shape an .npy header declares before it finds that the file is shorter (a 128-
byte file can declare a terabyte), SciPy's `loadmat` inflates every compressed variable whole, and an
HDF5 dataset of any declared shape reads as fill values from a file of a few kilobytes. So the headers
are read first (numpy.lib.format, scipy.io.whosmat, h5py's dataset shapes) and every array is checked
against the voxel limit, and an .npy's data against the bytes the file (or archive member) holds.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import IO

from numpy.lib import format as npy_format

from crossdiff.errors import InputError
from crossdiff.file_checks import CHUNK, check_data_bytes, check_dimensions, require_regular_file

MAX_MEMBERS = 1000  # arrays in one .npz or .mat: a slice stack has one, a dataset a few


def check_npy(path: Path) -> None:
    """An .npy file: a numeric array of at most the voxel limit whose data fill the rest of the file exactly."""
    size = require_regular_file(path)
    with path.open("rb") as stream:
        _check_npy_stream(path, stream, size, "")


def check_npz(path: Path) -> None:
    """Every member of an .npz archive is an .npy passing `check_npy` (its declared size in the archive),
    and inflates without error (read in chunks: no member is held in memory here)."""
    require_regular_file(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = [info for info in archive.infolist() if not info.is_dir()]
            if len(members) > MAX_MEMBERS:
                raise InputError(path, f"holds {len(members)} arrays, more than the {MAX_MEMBERS} crossdiff reads")
            for info in members:
                with archive.open(info) as stream:
                    _check_npy_stream(path, stream, info.file_size, f" (array {info.filename})")
                    while stream.read(CHUNK):  # to the end: the compressed data and their checksum are checked too
                        pass
    except InputError:
        raise
    except Exception as error:  # zipfile raises many kinds on a damaged or unsupported archive; none runs code
        raise InputError(path, f"could not be read as a NumPy archive ({type(error).__name__}: {error})") from None


def _check_npy_stream(path: Path, stream: IO[bytes], size: int, where: str) -> None:
    try:
        version = npy_format.read_magic(stream)
        read_header = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise ValueError(f"format version {version} is not read")
        shape, _, dtype = read_header(stream)
    except Exception as error:  # numpy parses the header dictionary in Python: tokenize, ast and dtype errors
        raise InputError(path, f"could not be read as a NumPy array{where} ({type(error).__name__}: {error})") from None
    if dtype.hasobject or dtype.kind not in "biufc":
        raise InputError(path, f"holds no numeric array{where} (dtype {dtype})")
    check_dimensions(path, [max(int(n), 0) for n in shape] or [1], "array")
    check_data_bytes(path, size - stream.tell(), math.prod(shape) * dtype.itemsize, where.strip(" ()"))


def check_mat(path: Path, hdf5: bool) -> None:
    """Every variable of a MATLAB file within the voxel limit, read from the headers alone."""
    require_regular_file(path)
    try:
        shapes = _hdf5_shapes(path) if hdf5 else [shape for _, shape, _ in _whosmat(path)]
    except InputError:
        raise
    except Exception as error:  # scipy and h5py raise many kinds on a damaged file
        raise InputError(path, f"could not be read as a MATLAB file ({type(error).__name__}: {error})") from None
    if len(shapes) > MAX_MEMBERS:
        raise InputError(path, f"holds {len(shapes)} variables, more than the {MAX_MEMBERS} crossdiff reads")
    for shape in shapes:
        check_dimensions(path, [max(int(n), 1) for n in shape] or [1], "array")


def _whosmat(path: Path) -> list[tuple[str, tuple[int, ...], str]]:
    from scipy.io import whosmat

    return whosmat(str(path))


def _hdf5_shapes(path: Path) -> list[tuple[int, ...]]:
    import h5py

    shapes: list[tuple[int, ...]] = []
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda _, item: shapes.append(tuple(item.shape)) if isinstance(item, h5py.Dataset) else None)
    return shapes

