"""Slice stacks stored as arrays: NumPy (.npy, .npz) and MATLAB (.mat, v7.3/HDF5 as SynDiff ships its
data, or older versions through SciPy).

Such files hold numbers without geometry: they are read as planar stacks on a unit grid, slices along
the first axis, and every guess (which variable, which axis order) is stated in the volume's evidence.
MATLAB stores arrays column-major: SciPy hands back MATLAB's own (rows, cols, slices) order, h5py the
reversed (slices, cols, rows) one; both are turned into (slices, rows, cols).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from crossdiff.errors import InputError
from crossdiff.headers.arrays import check_mat, check_npy, check_npz
from crossdiff.volumes import Geometry, Volume

ARRAY_SUFFIXES = (".npy", ".npz", ".mat")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
UNIT_GRID = "array files carry no geometry: unit pixels (1 x 1) and slices 1 apart are assumed"


def read_array_file(path: Path, key: str | None = None) -> Volume:
    """A 2-D array (one slice) or 3-D array (slices first) from `path`; `key` names the variable of a
    .npz/.mat holding several (one numeric array alone needs no name)."""
    name = path.name.lower()
    if name.endswith(".npy"):
        check_npy(path)
        array, order = _load_npy(path), "slices along the first axis"
        chosen = None
    elif name.endswith(".npz"):
        check_npz(path)
        chosen, array = _pick(path, _npz_arrays(path), key)
        order = "slices along the first axis"
    else:
        chosen, array, order = _read_mat(path, key)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise InputError(path, f"holds a {array.ndim}-D array (shape {array.shape}); expected a 2-D slice or a 3-D stack")
    if array.dtype.kind not in "uif" or array.size == 0:
        raise InputError(path, f"holds no numeric image (dtype {array.dtype}, shape {array.shape})")
    stack = np.ascontiguousarray(array, dtype=np.float32)
    evidence = {"spacing": UNIT_GRID, "slices": f"{stack.shape[0]} slice(s), {order}"}
    if chosen is not None:
        evidence["variable"] = chosen
    return Volume(stack, Geometry(stack.shape[::-1], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)), path=path,  # type: ignore[arg-type]
                  evidence=evidence, planar=True)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InputError(path, f"could not be read as a NumPy array ({error})") from None


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(path, f"could not be read as a NumPy archive ({error})") from None


def _read_mat(path: Path, key: str | None) -> tuple[str, np.ndarray, str]:
    with path.open("rb") as handle:
        head = handle.read(520)
    hdf5 = HDF5_SIGNATURE in head[:8] or HDF5_SIGNATURE in head[512:520]  # v7.3: HDF5 after a 512-byte header
    check_mat(path, hdf5)
    if hdf5:
        chosen, array = _pick(path, _hdf5_arrays(path), key)
        order = "MATLAB v7.3 (HDF5) array, axes reversed to (slices, rows, cols)"
        return chosen, np.transpose(array, (0, 2, 1)) if array.ndim == 3 else array.T, order
    chosen, array = _pick(path, _scipy_mat_arrays(path), key)
    order = "MATLAB array (rows, cols, slices) moved to (slices, rows, cols)"
    return chosen, np.moveaxis(array, -1, 0) if array.ndim == 3 else array, order


def _hdf5_arrays(path: Path) -> dict[str, np.ndarray]:
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return {name: np.asarray(item) for name, item in handle.items() if isinstance(item, h5py.Dataset)}
    except Exception as error:  # h5py raises many kinds on a damaged file (OSError, KeyError, ValueError, ...)
        raise InputError(path, f"could not be read as a MATLAB v7.3 (HDF5) file ({error})") from None


def _scipy_mat_arrays(path: Path) -> dict[str, np.ndarray]:
    from scipy.io import loadmat

    try:
        content = loadmat(path)
    except Exception as error:  # scipy raises many kinds on a damaged file; loadmat runs no code from it
        raise InputError(path, f"could not be read as a MATLAB file ({error})") from None
    return {name: value for name, value in content.items() if not name.startswith("__") and isinstance(value, np.ndarray)}


def _pick(path: Path, arrays: dict[str, np.ndarray], key: str | None) -> tuple[str, np.ndarray]:
    """The array named `key`, or the only image-like (numeric, 2-D or 3-D) one; ambiguity is the user's call."""
    if key is not None:
        if key not in arrays:
            raise InputError(path, f"holds no variable {key!r}; it holds {', '.join(sorted(arrays)) or 'none'}")
        return key, arrays[key]
    images = {name: a for name, a in arrays.items() if a.ndim in (2, 3) and a.dtype.kind in "uif" and a.size > 1}
    if len(images) != 1:
        listed = ", ".join(f"{name} {arrays[name].shape}" for name in sorted(arrays)) or "none"
        raise InputError(path, f"holds {len(images)} image-like arrays ({listed}); name one (--key NAME, or key: in the "
                               "manifest)")
    return next(iter(images.items()))
