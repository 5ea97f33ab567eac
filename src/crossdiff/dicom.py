"""DICOM series folders: find the series in a folder, read one as a Volume in physical units.

SimpleITK (GDCM) sorts the slices by position along the slice normal and applies Rescale
Slope/Intercept, so CT comes out in HU; pydicom reads the header fields GDCM does not expose
(Modality, PET Units) and lets us check that the slices are evenly spaced before trusting the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from crossdiff.errors import InputError
from crossdiff.volumes import Volume

MODALITY_FAMILY = {"CT": "CT", "MR": "MR", "PT": "PET", "PET": "PET"}
PET_UNITS = {"GML": "SUVbw", "BQML": "Bq/ml", "CNTS": "counts"}


@dataclass(frozen=True)
class SeriesInfo:
    uid: str
    modality: str
    description: str
    files: tuple[str, ...]

    def summary(self) -> str:
        return f"{self.uid} ({self.modality}, {len(self.files)} files{', ' + self.description if self.description else ''})"


def contains_dicom(folder: Path) -> bool:
    """True if any file in `folder` (not below it) carries the DICOM 'DICM' preamble marker."""
    for item in sorted(folder.iterdir()):
        if item.is_file():
            with item.open("rb") as handle:
                handle.seek(128)
                if handle.read(4) == b"DICM":
                    return True
    return False


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """Every image series in `folder`, with the files of each sorted by slice position."""
    folder = Path(folder)
    reader = sitk.ImageSeriesReader()
    series = []
    for uid in reader.GetGDCMSeriesIDs(str(folder)):
        files = tuple(reader.GetGDCMSeriesFileNames(str(folder), uid))
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        modality = str(header.get("Modality", "OT"))
        if modality in ("RTSTRUCT", "SEG", "RTPLAN", "RTDOSE", "SR", "PR"):
            continue
        series.append(SeriesInfo(uid, modality, str(header.get("SeriesDescription", "")), files))
    return series


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> Volume:
    """Read one series of `folder` (the only one, or the one with `series_uid`) as a Volume."""
    folder = Path(folder)
    found = list_series(folder)
    if not found:
        raise InputError(folder, "holds no DICOM image series")
    if series_uid is not None:
        chosen = [s for s in found if s.uid == series_uid]
        if not chosen:
            raise InputError(folder, f"has no series {series_uid}; it holds: " + "; ".join(s.summary() for s in found))
        series = chosen[0]
    elif len(found) > 1:
        raise InputError(
            folder,
            "holds several DICOM series; pick one with --series UID: " + "; ".join(s.summary() for s in found),
        )
    else:
        series = found[0]
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in series.files]
    _check_even_spacing(folder, headers)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise InputError(folder, f"DICOM series {series.uid} could not be read: {_last_line(error)}") from None
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    family = MODALITY_FAMILY.get(series.modality)
    return Volume.from_sitk(image, family, _units(family, headers[0]), folder)


def _units(family: str | None, header: pydicom.Dataset) -> str | None:
    if family == "CT":
        return "HU"
    if family == "PET":
        return PET_UNITS.get(str(header.get("Units", "")).upper(), str(header.get("Units", "")) or None)
    if family == "MR":
        return "a.u."
    return None


def _check_even_spacing(folder: Path, headers: list[pydicom.Dataset]) -> None:
    """A missing or duplicated slice would silently stretch the anatomy; refuse it instead."""
    if len(headers) < 3 or any("ImagePositionPatient" not in h for h in headers):
        return
    orientation = np.array(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.sort([float(np.dot(normal, np.array(h.ImagePositionPatient, dtype=float))) for h in headers])
    gaps = np.diff(positions)
    step = float(np.median(gaps))
    if step <= 0 or np.any(np.abs(gaps - step) > max(0.01 * step, 1e-3)):
        worst = int(np.argmax(np.abs(gaps - step)))
        raise InputError(
            folder,
            f"DICOM slices are not evenly spaced (gap of {gaps[worst]:.3g} mm after slice {worst + 1}, "
            f"typical {step:.3g} mm): a slice is missing or duplicated",
        )


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
