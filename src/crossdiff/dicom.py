"""DICOM series folders: find the series in a folder, read one as a Volume in physical units.

pydicom scans the headers (so one corrupt or foreign file is named instead of crashing GDCM's
scanner, and RTSTRUCT/SEG objects are told apart from images), orders the slices along the slice
normal and checks that they are evenly spaced, consistent and complete before the grid is trusted.
SimpleITK (GDCM) then decodes the pixels and applies Rescale Slope/Intercept per file, so CT comes
out in HU and PET in the units the file declares.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

from crossdiff.errors import InputError, error_summary, warn_input
from crossdiff.file_checks import check_geometry, is_regular_file, require_regular_file
from crossdiff.headers.dicom import check_image, numbers, read_dataset, value
from crossdiff.volumes import Volume

MODALITY_FAMILY = {"CT": "CT", "MR": "MR", "PT": "PET", "PET": "PET"}
PET_UNITS = {"GML": "SUVbw", "BQML": "Bq/ml", "CNTS": "counts"}
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# Objects that live beside images in a series folder but are not voxel images themselves.
NON_IMAGE_MODALITIES = frozenset({"RTSTRUCT", "SEG", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC"})
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# What the standard makes Type 1 for each modality crossdiff translates: the image plane, and the rescale
# that puts CT in HU and PET in its units (without it one slice would be on another scale than the rest).
RESCALE_REQUIRED = {"CT": ("RescaleSlope", "RescaleIntercept"), "PT": ("RescaleSlope", "RescaleIntercept"),
                    "PET": ("RescaleSlope", "RescaleIntercept")}
# Tags every slice of one series must agree on, or GDCM would read all slices with the first one's.
SERIES_CONSTANTS = ("PixelSpacing", "ImageOrientationPatient", "BitsAllocated", "BitsStored", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation", "Modality")


@dataclass(frozen=True)
class SeriesInfo:
    uid: str
    modality: str
    description: str
    files: tuple[str, ...]

    def summary(self) -> str:
        """UID, modality and size: no SeriesDescription, which exporters fill with patient identifiers
        (the sarcoma set's holds the patient ID), so messages never carry one."""
        return f"{self.uid} ({self.modality}, {len(self.files)} files)"


def has_dicom_marker(path: Path) -> bool:
    """True if the file carries the 'DICM' marker after the 128-byte preamble (DICOM Part 10)."""
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def contains_dicom(folder: Path) -> bool:
    """True if any file in `folder` (not below it) carries the DICOM 'DICM' preamble marker."""
    return any(item.is_file() and has_dicom_marker(item) for item in sorted(folder.iterdir()))


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """Every image series in `folder`, with the files of each sorted along the slice normal.

    Raises InputError naming the file if a file that claims to be DICOM (by its marker or its
    .dcm/.dicom/.ima name) cannot be parsed; other files (notes, thumbnails) are ignored.
    """
    return [info for info, _ in _group_series(Path(folder))]


def _group_series(folder: Path) -> list[tuple[SeriesInfo, list[pydicom.Dataset]]]:
    """Series of `folder` with their headers in slice order, so they are parsed only once."""
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    images, others = _scan(folder)
    for path, header in images:
        groups.setdefault(str(header.SeriesInstanceUID), []).append((path, header))
    for path, header in others:  # a member of an image series that is no image: a damaged slice, not a note
        modality = str(header.get("Modality", "")).upper()
        if str(header.SeriesInstanceUID) in groups and modality not in NON_IMAGE_MODALITIES:
            raise InputError(path, f"belongs to image series {header.SeriesInstanceUID} but is not a readable image "
                                   "(it lacks Rows or Columns): the file is damaged")
    series = []
    for uid, members in groups.items():
        members.sort(key=_slice_key)
        first = members[0][1]
        info = SeriesInfo(
            uid,
            str(first.get("Modality", "OT")),
            str(first.get("SeriesDescription", "")),
            tuple(str(path) for path, _ in members),
        )
        series.append((info, [header for _, header in members]))
    return series


def read_series_headers(folder: str | Path, series_uid: str | None = None) -> tuple[SeriesInfo, list[pydicom.Dataset]]:
    """One series of `folder` (the only one, or the one with `series_uid`) and its headers in slice order,
    checked like `read_dicom_series` checks them (one grid, evenly spaced), without the pixels."""
    folder = Path(folder)
    series, headers = _choose_series(folder, _group_series(folder), series_uid)
    _check_consistent(folder, series, headers)
    _check_even_spacing(folder, headers)
    return series, headers


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> Volume:
    """Read one series of `folder` (the only one, or the one with `series_uid`) as a Volume."""
    folder = Path(folder)
    series, headers = read_series_headers(folder, series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    # The pixel type must not come from the first slice alone: PET stores a different Rescale
    # Slope per slice, and an integer first slice would truncate every other slice to integers.
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise _unreadable_slice(folder, series, error) from None
    _check_decoded(folder, image, headers[0], len(series.files))
    family = MODALITY_FAMILY.get(series.modality)
    return Volume.from_sitk(image, family, _units(family, headers[0]), folder)


def read_dicom_file(path: str | Path) -> Volume:
    """Read one DICOM file on its own (a single slice, or a multi-frame volume) as a Volume.

    A file is read alone, not as part of the series its folder may hold: folders of test or export
    files often hold copies of one image that share a SeriesInstanceUID. Give the folder to read a series.
    """
    path = Path(path)
    header = _read_header(path, claimed=True)
    if header is None or not _is_image(header):
        kind = "no Modality" if header is None else str(header.get("Modality", "no Modality"))
        raise InputError(path, f"is a DICOM object without an image ({kind}); give an image file or series folder")
    _check_image(path, header)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("GDCMImageIO")
    reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as error:
        problem = f"DICOM pixel data could not be read; the file is truncated or corrupt ({error_summary(error, last=True)})"
        raise InputError(path, problem) from None
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    _check_decoded(path, image, header, int(value(path, header, "NumberOfFrames") or 1))
    family = MODALITY_FAMILY.get(str(header.get("Modality", "")))
    return Volume.from_sitk(image, family, _units(family, header), path)


def _scan(folder: Path) -> tuple[list[tuple[Path, pydicom.Dataset]], list[tuple[Path, pydicom.Dataset]]]:
    """(file, header) of every DICOM image file directly in `folder`, each checked, and of the other DICOM files."""
    images, others = [], []
    for path in sorted(folder.iterdir()):
        if not is_regular_file(path):
            continue
        header = _read_header(path)
        if header is not None and _is_image(header):
            _check_image(path, header)
            images.append((path, header))
        elif header is not None:
            others.append((path, header))
    return images, others


def _check_image(path: Path, header: pydicom.Dataset) -> None:
    modality = str(header.get("Modality", "")).upper()
    check_image(path, header, modality in MODALITY_FAMILY, RESCALE_REQUIRED.get(modality, ()))


def _check_decoded(path: Path, image: sitk.Image, header: pydicom.Dataset, slices: int) -> None:
    """What GDCM made must be the grid the headers declare: their size, and the pixel spacing, position and
    orientation checked in them (GDCM ignores Pixel Spacing when, say, a damaged SOP Class UID no longer
    names an image storage class: the image would come out at 1 mm). A CT, MR or PET image that disagrees
    is refused; another image is read with a warning, since GDCM decides for those which tags count."""
    expected = (int(header.Columns), int(header.Rows), slices)
    size = tuple(image.GetSize()) + (1,) * (3 - image.GetDimension())
    if size != expected:
        raise InputError(path, f"DICOM pixel data decode to {size}, the headers declare {expected}: the file is damaged")
    check_geometry(path, image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    stated = {"PixelSpacing": (_plane_numbers(header, "PixelSpacing", 2), np.array(image.GetSpacing()[1::-1])),
              "ImagePositionPatient": (_plane_numbers(header, "ImagePositionPatient", 3), np.array(image.GetOrigin())),
              "ImageOrientationPatient": (_plane_numbers(header, "ImageOrientationPatient", 6),
                                          np.array(image.GetDirection()).reshape(3, 3)[:, :2].T.reshape(-1))}
    for keyword, (declared, read) in stated.items():
        if declared is not None and not np.allclose(declared, read, rtol=1e-4, atol=1e-3):
            problem = (f"GDCM reads its {keyword} as {np.round(read, 4).tolist()}, the header says "
                       f"{np.round(declared, 4).tolist()} (SOP Class UID {header.get('SOPClassUID', 'absent')})")
            if str(header.get("Modality", "")).upper() in MODALITY_FAMILY:
                raise InputError(path, f"{problem}: the file is damaged")
            warn_input(path, f"{problem}; the image is read as GDCM does")


def _read_header(path: Path, claimed: bool = False) -> pydicom.Dataset | None:
    """The header of a DICOM file; None for files that do not claim to be DICOM.

    A file that claims to be DICOM (marker, suffix, or `claimed`) but cannot be parsed, or whose
    header stops before the series identifiers (a truncated copy), is an InputError naming it.
    """
    require_regular_file(path)
    claimed = claimed or has_dicom_marker(path) or path.name.lower().endswith(DICOM_SUFFIXES)
    if not claimed:
        return None
    header = read_dataset(path)
    if _is_dicomdir(header):
        return None
    if "SeriesInstanceUID" not in header:
        problem = "is not a readable DICOM file: its header is truncated or it is not DICOM (no Series Instance UID)"
        raise InputError(path, problem)
    return header


def _is_dicomdir(header: pydicom.Dataset) -> bool:
    meta = getattr(header, "file_meta", None)
    return meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS


def _is_image(header: pydicom.Dataset) -> bool:
    """Images have rows and columns; RTSTRUCT, SEG, plans and reports are not read as volumes."""
    modality = str(header.get("Modality", "")).upper()
    return modality not in NON_IMAGE_MODALITIES and "Rows" in header and "Columns" in header


def _normal(header: pydicom.Dataset) -> np.ndarray | None:
    orientation = _plane_numbers(header, "ImageOrientationPatient", 6)
    return None if orientation is None else np.cross(orientation[:3], orientation[3:])


def _plane_numbers(header: pydicom.Dataset, keyword: str, count: int) -> np.ndarray | None:
    """A checked image-plane tag (check_image refused malformed ones already) as an array, None when absent."""
    found = numbers(Path(str(header.filename)), header, keyword, count)
    return None if found is None else np.array(found)


def _slice_key(member: tuple[Path, pydicom.Dataset]) -> tuple[float, float, str]:
    """Position along the slice normal (as GDCM sorts), then InstanceNumber, then file name."""
    path, header = member
    normal = _normal(header)
    at = _plane_numbers(header, "ImagePositionPatient", 3)
    position = 0.0 if normal is None or at is None else float(np.dot(normal, at))
    try:
        number = float(header.get("InstanceNumber") or 0)
    except (TypeError, ValueError):  # a malformed InstanceNumber only loses its vote in the order
        number = 0.0
    return (position, number, path.name)


def _choose_series(
    folder: Path, found: list[tuple[SeriesInfo, list[pydicom.Dataset]]], series_uid: str | None
) -> tuple[SeriesInfo, list[pydicom.Dataset]]:
    if not found:
        raise InputError(folder, "holds no DICOM image series" + _non_image_note(folder))
    listing = "; ".join(info.summary() for info, _ in found)
    if series_uid is not None:
        chosen = [entry for entry in found if entry[0].uid == series_uid]
        if not chosen:
            raise InputError(folder, f"has no series {series_uid}; it holds: {listing}")
        return chosen[0]
    if len(found) > 1:
        raise InputError(folder, f"holds several DICOM series; pick one with --series UID: {listing}")
    return found[0]


def _non_image_note(folder: Path) -> str:
    """Name the non-image objects found, so an RTSTRUCT folder is not mistaken for a broken series."""
    kinds = set()
    for path in folder.iterdir():
        header = _read_header(path) if path.is_file() else None
        if header is not None and not _is_image(header):
            kinds.add(str(header.get("Modality", "unknown")))
    if not kinds:
        return ""
    note = f" (only {', '.join(sorted(kinds))} objects"
    if kinds & {"RTSTRUCT", "SEG"}:
        note += "; contours and segmentations must be converted to a voxel mask (e.g. NIfTI) to be used"
    return note + ")"


def _unreadable_slice(folder: Path, series: SeriesInfo, error: Exception) -> InputError:
    """GDCM says 'cannot read requested file' without naming it; find and name the culprit."""
    for name in series.files:
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.SetImageIO("GDCMImageIO")
        try:
            reader.Execute()
        except RuntimeError:
            problem = f"DICOM pixel data could not be read; the file is truncated or corrupt (series {series.uid})"
            return InputError(name, problem)
    return InputError(folder, f"DICOM series {series.uid} could not be read: {error_summary(error, last=True)}")


def _units(family: str | None, header: pydicom.Dataset) -> str | None:
    if family == "CT":
        return "HU"
    if family == "PET":
        return PET_UNITS.get(str(header.get("Units", "")).upper(), str(header.get("Units", "")) or None)
    if family == "MR":
        return "a.u."
    return None


def _check_consistent(folder: Path, series: SeriesInfo, headers: list[pydicom.Dataset]) -> None:
    """One grid needs one slice size, orientation, pixel spacing and pixel format, and every slice its
    position and the same rescale tags; scouts sharing a series UID, or a damaged slice, break that."""
    first = headers[0]
    for name, header in zip(series.files[1:], headers[1:]):
        for keyword in SERIES_CONSTANTS:
            if not _same(value(Path(name), header, keyword), value(Path(series.files[0]), first, keyword)):
                raise InputError(name, f"its {keyword} {_tag_text(header, keyword)} differs from "
                                       f"{_tag_text(first, keyword)} in {Path(series.files[0]).name}, the first slice of "
                                       f"series {series.uid}: one series must share it")
        for keyword in ("ImagePositionPatient", "RescaleSlope", "RescaleIntercept"):
            if (keyword in header) != (keyword in first):
                lacking = name if keyword not in header else series.files[0]
                raise InputError(lacking, f"has no {keyword}, unlike the other slices of series {series.uid}")
        if (header.Rows, header.Columns) != (first.Rows, first.Columns):
            raise InputError(
                folder,
                f"DICOM series {series.uid} mixes slice sizes: {Path(name).name} is {header.Columns}x{header.Rows}, "
                f"{Path(series.files[0]).name} is {first.Columns}x{first.Rows}",
            )
        normal, reference = _normal(header), _normal(first)
        if normal is not None and reference is not None and not np.allclose(normal, reference, atol=1e-3):
            raise InputError(
                folder,
                f"DICOM series {series.uid} mixes slice orientations ({Path(name).name} differs from the first slice)",
            )


def _same(one: object, other: object) -> bool:
    """Equal DICOM values (numbers within float rounding)."""
    if one is None or other is None:
        return one is other
    try:
        return bool(np.allclose(np.asarray(one, dtype=float), np.asarray(other, dtype=float), rtol=1e-6))
    except (TypeError, ValueError, OverflowError):
        return str(one).strip() == str(other).strip()


def _tag_text(header: pydicom.Dataset, keyword: str) -> str:
    found = value(Path(str(header.filename)), header, keyword)
    return "(absent)" if found is None else repr(str(found))[:40]


def _check_even_spacing(folder: Path, headers: list[pydicom.Dataset]) -> None:
    """A missing or duplicated slice would silently stretch the anatomy; refuse it instead."""
    if len(headers) < 3 or any("ImagePositionPatient" not in h for h in headers):
        return
    normal = _normal(headers[0])
    if normal is None:
        return
    positions = np.sort([float(np.dot(normal, _plane_numbers(h, "ImagePositionPatient", 3))) for h in headers])
    gaps = np.diff(positions)
    step = float(np.median(gaps))
    if step <= 0 or np.any(np.abs(gaps - step) > max(0.01 * step, 1e-3)):
        worst = int(np.argmax(np.abs(gaps - step)))
        raise InputError(
            folder,
            f"DICOM slices are not evenly spaced (gap of {gaps[worst]:.3g} mm after slice {worst + 1}, "
            f"typical {step:.3g} mm): a slice is missing or duplicated",
        )



def series_description(folder: Path) -> tuple[str, str] | None:
    """(Modality, SeriesDescription) of the first DICOM image directly in `folder`, or None if it has none:
    what names a series folder in a study whose folder names do not (layout 'series-folders')."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and (has_dicom_marker(path) or path.name.lower().endswith(DICOM_SUFFIXES)):
            header = _read_header(path)
            if header is not None and _is_image(header):
                return str(header.get("Modality", "")), str(header.get("SeriesDescription", ""))
    return None
