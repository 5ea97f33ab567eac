"""Read any image a user hands us (NIfTI, MHA/MHD, NRRD, DICOM folder, PNG/JPEG slices) as a Volume.

Every reader ends in the same checks, so a bad file is refused here, once, with its name and the
problem, instead of surfacing later as a NaN loss or a misplaced synthetic CT.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from crossdiff.dicom import (
    DICOM_SUFFIXES,
    contains_dicom,
    has_dicom_marker,
    read_dicom_file,
    read_dicom_series,
)
from crossdiff.errors import CrossdiffError, InputError, error_summary
from crossdiff.file_checks import check_geometry, file_status, require_regular_file
from crossdiff.headers.metaimage import check_metaimage
from crossdiff.headers.nifti import check_nifti
from crossdiff.headers.nrrd import check_nrrd
from crossdiff.headers.raster import check_raster
from crossdiff.native_output import native_output_silenced
from crossdiff.volumes import Geometry, Volume

sitk.ProcessObject_SetGlobalWarningDisplay(False)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")
KNOWN_SUFFIXES = VOLUME_SUFFIXES + SLICE_SUFFIXES
MODALITY_WORDS = {
    "CT": ("ct", "sct", "cbct"),
    "PET": ("pet", "pt", "suv", "fdg"),
    "MR": ("mr", "mri", "t1", "t1n", "t1c", "t1w", "t2", "t2w", "t2f", "flair", "pd", "mr_t1"),
}


MODALITIES = ("CT", "MR", "PET")


def read_volume(path: str | Path, modality: str | None = None, series_uid: str | None = None) -> Volume:
    """Read an image file or a folder (DICOM series, or PNG/JPEG slices stacked in name order).

    A single DICOM file is read on its own (one slice, or a multi-frame volume); give its folder
    to read the whole series, and `series_uid` when that folder holds several.

    `modality` ('CT', 'MR', 'PET', any case) overrides what the file says or its name suggests; another
    name is an error, since the modality picks the background value, the body-mask method and the units.
    Raises InputError naming the file for anything unreadable, 4-D, non-finite or empty.
    """
    if modality is not None and modality.upper() not in MODALITIES:
        raise CrossdiffError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    volume = _read_raw(Path(path), series_uid)
    volume.modality = (modality.upper() if modality else None) or volume.modality or guess_modality(volume)
    if volume.units is None:
        volume.units = {"CT": "HU", "PET": "SUVbw", "MR": "a.u."}.get(volume.modality or "")
    check_contents(volume)
    return volume


def read_mask(path: str | Path, reference: Volume | None = None) -> Volume:
    """Read a binary mask (any label > 0 is foreground); if `reference` is given, it must share its grid."""
    mask = _read_raw(Path(path), None)
    _check_finite_and_nonempty(mask)
    mask = mask.with_array((mask.array > 0).astype(np.uint8), modality="mask", units=None)
    if not mask.array.any():
        raise InputError(path, "mask is empty: it has no foreground voxel")
    if reference is not None and not mask.geometry.matches(reference.geometry):
        name = reference.path or "the image"
        raise InputError(
            path,
            f"mask does not match {name}: {mask.geometry.describe_difference(reference.geometry)}; "
            "resample it onto the image grid first",
        )
    return mask


def _read_raw(path: Path, series_uid: str | None) -> Volume:
    name = path.name.lower()
    is_folder = stat.S_ISDIR(file_status(path).st_mode)
    if not is_folder:
        require_regular_file(path)  # before anything opens it: a FIFO would block for ever
    with native_output_silenced():
        if is_folder:
            volume = _read_folder(path, series_uid)
        elif name.endswith(DICOM_SUFFIXES) or (not name.endswith(KNOWN_SUFFIXES) and has_dicom_marker(path)):
            volume = read_dicom_file(path)
        elif name.endswith(SLICE_SUFFIXES):
            check_raster(path)
            volume = _stack_slices(path, [path])
        elif name.endswith(VOLUME_SUFFIXES):
            volume = _read_file(path)
        else:
            raise InputError(
                path,
                "is not a supported image; give NIfTI (.nii, .nii.gz), MHA/MHD, NRRD, PNG/JPEG, "
                "or a folder holding one DICOM series or PNG/JPEG slices",
            )
    geometry = volume.geometry
    check_geometry(path, geometry.spacing, geometry.origin, geometry.direction)
    volume.path = path
    return volume


def guess_modality(volume: Volume) -> str | None:
    """Guess CT / MR / PET from the file name, then from the intensities (HU air, SUV range)."""
    if volume.path is not None:
        words = re.split(r"[^a-z0-9]+", str(volume.path).lower().replace(".nii.gz", ""))
        for family, names in MODALITY_WORDS.items():
            if any(word in names for word in words[-4:]):
                return family
    finite = volume.array[np.isfinite(volume.array)]
    if finite.size == 0:
        return None
    low, high = float(np.percentile(finite, 1)), float(finite.max())
    if low <= -500 and high > 200:
        return "CT"
    if finite.min() >= 0 and high <= 60 and volume.array.dtype.kind == "f":
        return "PET"
    return "MR"


def check_contents(volume: Volume) -> None:
    """Refuse volumes that would poison training or inference: NaN/Inf, no voxels, or no content."""
    _check_finite_and_nonempty(volume)
    array = volume.array
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise InputError(volume.path, f"image is empty: every voxel has the same value ({low:g})")


def _check_finite_and_nonempty(volume: Volume) -> None:
    array = volume.array
    if array.size == 0:
        raise InputError(volume.path, "image is empty: it has no voxels")
    bad = ~np.isfinite(array)
    if bad.any():
        nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        raise InputError(volume.path, f"image contains non-finite values ({nan} NaN, {inf} Inf voxels)")


def _read_folder(folder: Path, series_uid: str | None) -> Volume:
    if contains_dicom(folder) or any(f.name.lower().endswith(DICOM_SUFFIXES) for f in folder.iterdir()):
        return read_dicom_series(folder, series_uid)
    slices = sorted(
        (f for f in folder.iterdir() if f.name.lower().endswith(SLICE_SUFFIXES)), key=_natural_key
    )
    for file in slices:
        check_raster(file)
    if slices:
        return _stack_slices(folder, slices)
    subfolders = sorted(f.name for f in folder.iterdir() if f.is_dir() and not f.name.startswith("."))
    listed = ", ".join(subfolders[:6]) + (", ..." if len(subfolders) > 6 else "")
    hint = f"; it has subfolders ({listed}): give one of them" if subfolders else ""
    raise InputError(folder, f"folder holds neither a DICOM series nor PNG/JPEG slices{hint}")


def _natural_key(path: Path) -> list[object]:
    """'slice2' before 'slice10', whatever the case of the letters."""
    return [int(part) if part.isdecimal() else part.lower() for part in re.split(r"(\d+)", path.name)]


def _read_file(path: Path) -> Volume:
    _check_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(_image_io(path))
    try:
        image = reader.Execute()
    except RuntimeError as error:
        problem = f"could not be read: the file is corrupt, truncated or not an image ({_reason(error)})"
        raise InputError(path, problem) from None
    return Volume.from_sitk(_as_3d_scalar(path, image))


def _image_io(path: Path) -> str:
    """Name the ImageIO from the suffix ourselves: ITK matches suffixes case-sensitively ('.MHA' fails)."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "NiftiImageIO"
    if name.endswith((".mha", ".mhd")):
        return "MetaImageIO"
    return "NrrdImageIO"


def _reason(error: Exception) -> str:
    text = str(error)
    if "Unable to determine ImageIO reader" in text:
        return "no image reader recognises its contents"
    return error_summary(error, last=True)


def _check_header(path: Path) -> None:
    """The format's own checks (crossdiff.headers) before ITK reads the file: ITK pads short files, crashes
    on some damaged headers, allocates whatever a header declares and prints to the console."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        check_nifti(path)
    elif name.endswith((".mha", ".mhd")):
        check_metaimage(path)
    else:
        check_nrrd(path)


def _as_3d_scalar(path: Path, image: sitk.Image) -> sitk.Image:
    """Collapse trivial 4th dimensions and grey RGB; refuse true 4-D (time series, vector fields)."""
    if image.GetNumberOfComponentsPerPixel() > 1:
        image = _to_grey(path, image)
    if image.GetDimension() == 4:
        size = image.GetSize()
        if size[3] != 1:
            raise InputError(
                path,
                f"is 4-D (size {'x'.join(map(str, size))}); crossdiff expects one 3-D volume or 2-D slice: "
                "split the series and pass one volume",
            )
        image = image[:, :, :, 0]
    if image.GetDimension() == 2:
        image = sitk.JoinSeries(image)
    if image.GetDimension() != 3:
        raise InputError(path, f"has {image.GetDimension()} dimensions; expected a 3-D volume or a 2-D slice")
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkUInt8):
        image = sitk.Cast(image, sitk.sitkFloat32)
    return image


def _to_grey(path: Path, image: sitk.Image) -> sitk.Image:
    components = image.GetNumberOfComponentsPerPixel()
    if components not in (3, 4):
        raise InputError(path, f"has {components} values per voxel; expected a grey-level image")
    channels = [sitk.Cast(sitk.VectorIndexSelectionCast(image, i), sitk.sitkFloat32) for i in range(3)]
    red, green, blue = (sitk.GetArrayViewFromImage(c) for c in channels)
    if np.array_equal(red, green) and np.array_equal(green, blue):
        return channels[0]
    return 0.299 * channels[0] + 0.587 * channels[1] + 0.114 * channels[2]


def _stack_slices(where: Path, files: list[Path]) -> Volume:
    """One PNG/JPEG is a 1-slice volume; several are stacked in natural name order (1 mm grid)."""
    arrays = []
    for file in files:
        try:
            image = sitk.ReadImage(str(file))
        except RuntimeError as error:
            raise InputError(file, f"could not be read as an image ({_reason(error)})") from None
        image = _as_3d_scalar(file, image)
        if image.GetSize()[2] != 1:
            raise InputError(file, "is not a 2-D slice")
        array = sitk.GetArrayFromImage(image)[0].astype(np.float32)
        if arrays and array.shape != arrays[0].shape:
            raise InputError(file, f"slice size {array.shape[::-1]} differs from {files[0].name} {arrays[0].shape[::-1]}")
        arrays.append(array)
    stacked = np.stack(arrays)
    spacing = tuple(float(s) for s in sitk.ReadImage(str(files[0])).GetSpacing()[:2]) + (1.0,)
    return Volume(stacked, Geometry(stacked.shape[::-1], spacing, (0.0, 0.0, 0.0)), path=where)  # type: ignore[arg-type]
