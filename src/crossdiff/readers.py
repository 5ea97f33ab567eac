"""Read any image a user hands us (NIfTI, MHA/MHD, NRRD, DICOM folder, PNG/JPEG slices) as a Volume.

Every reader ends in the same checks, so a bad file is refused here, once, with its name and the
problem, instead of surfacing later as a NaN loss or a misplaced synthetic CT.
"""

from __future__ import annotations

import gzip
import re
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from crossdiff.dicom import contains_dicom, read_dicom_series
from crossdiff.errors import InputError
from crossdiff.volumes import Geometry, Volume

sitk.ProcessObject_SetGlobalWarningDisplay(False)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
MODALITY_WORDS = {
    "CT": ("ct", "sct", "cbct"),
    "PET": ("pet", "pt", "suv", "fdg"),
    "MR": ("mr", "mri", "t1", "t1n", "t1c", "t1w", "t2", "t2w", "t2f", "flair", "pd", "mr_t1"),
}


def read_volume(path: str | Path, modality: str | None = None, series_uid: str | None = None) -> Volume:
    """Read an image file or a folder (DICOM series, or PNG/JPEG slices stacked in name order).

    `modality` ('CT', 'MR', 'PET') overrides what the file says or its name suggests.
    Raises InputError naming the file for anything unreadable, 4-D, non-finite or empty.
    """
    volume = _read_raw(Path(path), series_uid)
    volume.modality = modality or volume.modality or guess_modality(volume)
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
    if not path.exists():
        raise InputError(path, "does not exist")
    name = path.name.lower()
    if path.is_dir():
        volume = _read_folder(path, series_uid)
    elif name.endswith(DICOM_SUFFIXES):
        volume = read_dicom_series(path.parent, series_uid)
    elif name.endswith(SLICE_SUFFIXES):
        volume = _stack_slices(path, [path])
    elif name.endswith(VOLUME_SUFFIXES):
        volume = _read_file(path)
    else:
        raise InputError(
            path,
            "is not a supported image; give NIfTI (.nii, .nii.gz), MHA/MHD, NRRD, PNG/JPEG, "
            "or a folder holding one DICOM series or PNG/JPEG slices",
        )
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
    if slices:
        return _stack_slices(folder, slices)
    raise InputError(folder, "folder holds neither a DICOM series nor PNG/JPEG slices")


def _natural_key(path: Path) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _read_file(path: Path) -> Volume:
    _check_complete(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputError(path, f"could not be read: the file is corrupt, truncated or not an image ({_reason(error)})") from None
    return Volume.from_sitk(_as_3d_scalar(path, image))


def _reason(error: Exception) -> str:
    text = str(error)
    if "Unable to determine ImageIO reader" in text:
        return "no image reader recognises its contents"
    lines = [line.strip() for line in text.splitlines() if line.strip() and "sitk::ERROR" not in line]
    return lines[-1] if lines else "unknown reader error"


def _check_complete(path: Path) -> None:
    """SimpleITK reads a truncated NIfTI without complaint (padding with garbage); nibabel does not."""
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        image = nib.load(str(path))
        if not name.endswith(".gz"):
            np.asanyarray(image.dataobj[..., -1:])
        else:
            with gzip.open(path, "rb") as stream:
                while stream.read(1 << 22):
                    pass
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as error:
        raise InputError(path, f"could not be read: the file is corrupt or truncated ({error})") from None


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
