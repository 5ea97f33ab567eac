"""An independent reading of a mutant's geometry, for images crossdiff accepted with a geometry other
than its seed's: when a mutation rewrote a header field to another valid value (a digit of a NRRD
origin, a NIfTI offset), the new geometry is what the file says, and crossdiff must agree with a
reader that is not its own. Where they disagree, crossdiff defaulted or misread: 'silently changed'.

NIfTI through nibabel's affine, DICOM through pydicom's tags, MetaImage and NRRD by parsing their text
headers here (the conventions verified against SimpleITK on an oblique image), PNG/JPEG through Pillow.
Geometry is in ITK's LPS convention: size, spacing, origin (x, y, z), direction row-major.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS


def geometry(fmt: str, path: Path) -> dict[str, Any]:
    """The geometry the file's own header states, as a third-party reader sees it."""
    return READERS[fmt](path)


def _grid(size: Any, spacing: Any, origin: Any, direction: np.ndarray) -> dict[str, Any]:
    return {"size": [int(s) for s in size], "spacing": [float(s) for s in spacing], "origin": [float(o) for o in origin],
            "direction": [float(d) for d in np.asarray(direction, dtype=float).reshape(-1)]}


def _padded(values: list[float], count: int, fill: float) -> list[float]:
    return (list(values) + [fill] * count)[:count]


def _nifti(path: Path) -> dict[str, Any]:
    import logging

    import nibabel as nib

    logging.getLogger("nibabel").setLevel(logging.ERROR)  # its notes on repaired codes are not the suite's output
    image = nib.load(str(path))
    affine = LPS @ image.affine[:3, :3]
    spacing = np.linalg.norm(affine, axis=0)
    size = _padded(list(image.shape[:3]), 3, 1)
    return _grid(size, spacing, LPS @ image.affine[:3, 3], affine / spacing)


def _metaimage(path: Path) -> dict[str, Any]:
    fields = _text_fields(path, "=", b"ElementDataFile")
    n = int(fields["NDims"])
    spacing = _floats(fields.get("ElementSpacing") or fields.get("ElementSize"), [1.0] * n)
    origin = _floats(fields.get("Offset") or fields.get("Position") or fields.get("Origin"), [0.0] * n)
    matrix = _floats(fields.get("TransformMatrix") or fields.get("Rotation") or fields.get("Orientation"),
                     list(np.eye(n).reshape(-1)))
    direction = np.eye(3)
    direction[:n, :n] = np.array(matrix).reshape(n, n).T  # MetaImage stores the direction column by column
    return _grid(_padded([int(v) for v in fields["DimSize"].split()], 3, 1), _padded(spacing, 3, 1.0),
                 _padded(origin, 3, 0.0), direction)


def _nrrd(path: Path) -> dict[str, Any]:
    fields = {key.lower(): value for key, value in _text_fields(path, ":", None).items()}
    sizes = [int(v) for v in fields["sizes"].split()]
    vectors = [[float(x) for x in item.split(",")] for item in re.findall(r"\(([^()]*)\)", fields.get("space directions", ""))]
    spatial = [s for s, item in zip(sizes, re.findall(r"\([^()]*\)|none", fields.get("space directions", ""))) if item != "none"]
    if vectors:
        columns = np.array(vectors, dtype=float).T
        spacing = np.linalg.norm(columns, axis=0)
        direction = columns / spacing
    else:
        spacing, direction, spatial = np.ones(len(sizes)), np.eye(len(sizes)), sizes
    origin = [float(x) for x in re.findall(r"\(([^()]*)\)", fields.get("space origin", "(0,0,0)"))[0].split(",")]
    if fields.get("space", "").lower() in ("right-anterior-superior", "ras"):
        origin, direction = list(LPS @ np.array(origin)), LPS @ direction
    full = np.eye(3)
    full[: direction.shape[0], : direction.shape[1]] = direction
    return _grid(_padded(spatial, 3, 1), _padded(list(spacing), 3, 1.0), _padded(origin, 3, 0.0), full)


def _text_fields(path: Path, separator: str, last: bytes | None) -> dict[str, str]:
    fields: dict[str, str] = {}
    with path.open("rb") as handle:
        for raw in handle:
            if not raw.strip() or (last is None and raw.startswith(b"NRRD")):
                if not raw.strip():
                    break
                continue
            key, sep, value = raw.decode("latin-1").partition(separator)
            if sep and not key.startswith("#") and not value.startswith("="):
                fields[key.strip()] = value.strip()
            if last is not None and raw.startswith(last):
                break
    return fields


def _floats(text: str | None, default: list[float]) -> list[float]:
    return default if text is None else [float(v) for v in text.split()]


def _dicom_file(path: Path) -> dict[str, Any]:
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    frames = int(header.get("NumberOfFrames", 1) or 1)
    grid = _dicom_plane(header, frames)
    grid["spacing"][2] = None  # a single file's slice spacing is GDCM's choice among several tags
    return grid


def _dicom_plane(header: Any, slices: int) -> dict[str, Any]:
    orientation = np.array(header.get("ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
    row, column = orientation[:3], orientation[3:]
    direction = np.stack([row, column, np.cross(row, column)], axis=1)
    spacing = [float(v) for v in header.get("PixelSpacing", [1.0, 1.0])]
    origin = [float(v) for v in header.get("ImagePositionPatient", [0, 0, 0])]
    return _grid((int(header.Columns), int(header.Rows), slices), (spacing[1], spacing[0], 1.0), origin, direction)


def _dicom_series(folder: Path) -> dict[str, Any]:
    import pydicom

    headers = []
    for file in sorted(folder.iterdir()):
        if file.is_file() and not file.is_symlink():
            try:
                header = pydicom.dcmread(file, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - what is not DICOM is not part of the series
                continue
            if "Rows" in header and "ImagePositionPatient" in header:
                headers.append(header)
    grid = _dicom_plane(headers[0], len(headers))
    normal = np.array(grid["direction"]).reshape(3, 3)[:, 2]
    positions = sorted((float(np.dot(normal, np.array(h.ImagePositionPatient, float))), i) for i, h in enumerate(headers))
    first = headers[positions[0][1]]
    grid["origin"] = [float(v) for v in first.ImagePositionPatient]
    grid["spacing"][2] = float(np.median(np.diff([p for p, _ in positions]))) if len(positions) > 1 else None
    return grid


def _array(path: Path) -> dict[str, Any]:
    """Unit grid; the size from the array's own header, in the axis order each format stores."""
    name = path.name.lower()
    if name.endswith(".npy"):
        shape = list(np.load(path, mmap_mode="r").shape)
    elif name.endswith(".npz"):
        with np.load(path) as archive:
            shape = list(next(iter(archive.values())).shape)
    else:
        shape = _mat_shape(path)
    size = [shape[-1], shape[-2], shape[0] if len(shape) == 3 else 1]
    return _grid(size, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))


def _mat_shape(path: Path) -> list[int]:
    """MATLAB's (rows, cols, slices) as (slices, rows, cols); v7.3 (HDF5) stores it reversed."""
    try:
        import scipy.io

        rows, cols, *slices = scipy.io.whosmat(str(path))[0][1]
        return [*slices, rows, cols]
    except (ValueError, NotImplementedError):
        import h5py

        with h5py.File(path, "r") as handle:
            shape = next(item.shape for item in handle.values())
        return [shape[0], shape[2], shape[1]] if len(shape) == 3 else [shape[1], shape[0]]


def _raster(path: Path) -> dict[str, Any]:
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
    return {"size": [width, height, 1], "spacing": [None, None, None], "origin": [None] * 3, "direction": [None] * 9}


def agrees(observed: dict[str, Any], stated: dict[str, Any]) -> bool:
    """crossdiff's geometry equals the stated one (None: a value the oracle leaves to the reader)."""
    if observed["size"] != stated["size"]:
        return False
    for key in ("spacing", "origin", "direction"):
        for mine, theirs in zip(observed[key], stated[key]):
            if theirs is not None and not np.isclose(mine, theirs, rtol=1e-4, atol=1e-3):
                return False
    return True


READERS = {"nifti": _nifti, "metaimage": _metaimage, "nrrd": _nrrd, "dicom-file": _dicom_file,
           "dicom-series": _dicom_series, "png": _raster, "jpeg": _raster, "array": _array}
