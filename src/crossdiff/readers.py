"""Read any image a user hands us (NIfTI, MHA/MHD, NRRD, DICOM folder, PNG/JPEG slices) as a Volume.

Every reader ends in the same checks, so a bad file is refused here, once, with its name and the
problem, instead of surfacing later as a NaN loss or a misplaced synthetic CT.
"""

from __future__ import annotations

import re
import stat
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from crossdiff.array_files import ARRAY_SUFFIXES, read_array_file
from crossdiff.dicom import (
    DICOM_SUFFIXES,
    contains_dicom,
    has_dicom_marker,
    read_dicom_file,
    read_dicom_series,
)
from crossdiff.errors import CrossdiffError, InputError, InputWarning, error_summary
from crossdiff.file_checks import check_geometry, file_status, require_regular_file
from crossdiff.headers.metaimage import check_metaimage
from crossdiff.headers.nifti import check_nifti
from crossdiff.headers.nrrd import check_nrrd
from crossdiff.headers.raster import check_raster
from crossdiff.native_output import native_output_silenced
from crossdiff.units import check_units, decide_units
from crossdiff.volumes import Geometry, Volume

sitk.ProcessObject_SetGlobalWarningDisplay(False)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
SLICE_SUFFIXES = (".png", ".jpg", ".jpeg")
KNOWN_SUFFIXES = VOLUME_SUFFIXES + SLICE_SUFFIXES + ARRAY_SUFFIXES
MODALITY_WORDS = {
    "CT": ("ct", "sct", "cbct"),
    "PET": ("pet", "pt", "suv", "fdg"),
    "MR": ("mr", "mri", "t1", "t1n", "t1c", "t1w", "t2", "t2w", "t2f", "flair", "pd", "adc", "dwi"),
}
NAME_LEVELS = 4  # the file name and the three folders above it: further out, names describe collections
COLOUR_CHOICES = ("refuse", "luminance")
# Grey exported through a colour-managed editor keeps R, G and B within a few levels of each other;
# a colour map differs by a large part of the range (the paired PNG set: up to 6 of 255). Up to 4% of
# the maximum counts as grey.
GREY_TOLERANCE = 0.04
UNIT_PIXELS = "image files carry no pixel spacing: unit pixels (1 x 1) and slices 1 apart are assumed"


MODALITIES = ("CT", "MR", "PET")
ImageSource = str | Path | Sequence[str | Path]


def read_volume(
    path: ImageSource,
    modality: str | None = None,
    series_uid: str | None = None,
    units: str | None = None,
    colour: str = "refuse",
    key: str | None = None,
) -> Volume:
    """Read an image file or a folder (DICOM series, or PNG/JPEG slices stacked in name order), or a
    list of slice files (stacked in natural name order).

    A single DICOM file is read on its own (one slice, or a multi-frame volume); give its folder
    to read the whole series, and `series_uid` when that folder holds several.

    `modality` ('CT', 'MR', 'PET', any case) overrides what the file says or its name suggests; another
    name is an error, since the modality picks the background value, the body-mask method and the units.
    `units` overrides the units crossdiff decides from the file (crossdiff.units). `colour` says what to
    do with a colour image whose channels differ: 'refuse' (the default: a pseudo-colour PET is not a
    grey image) or 'luminance' (ITU-R 601 luma). `key` names the array of a .npz/.mat file holding
    several. Every decision is kept with its reason in `Volume.evidence`.
    Raises InputError naming the file for anything unreadable, 4-D, non-finite or empty.
    """
    if modality is not None and modality.upper() not in MODALITIES:
        raise CrossdiffError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    if colour not in COLOUR_CHOICES:
        raise CrossdiffError(f"unknown colour handling {colour!r}; use one of {', '.join(COLOUR_CHOICES)}")
    volume, kind = _read_raw(path, series_uid, colour, key)
    declared = volume.units if kind == "dicom" else None
    if modality:
        volume.modality, volume.evidence["modality"] = modality.upper(), f"given as {modality.upper()}"
    elif kind == "dicom" and volume.modality:
        volume.evidence["modality"] = f"DICOM Modality tag ({volume.modality})"
    else:
        volume.modality, volume.evidence["modality"] = guess_modality(volume)
    if units is not None:
        volume.units, volume.evidence["units"] = check_units(units), f"{check_units(units)}, as set by the user"
    else:
        decision = decide_units(volume.array, volume.modality, kind, declared)
        volume.units, volume.evidence["units"] = decision.units, decision.reason
        if decision.warning:
            volume.warnings.append(f"units: {decision.reason}")
    check_contents(volume)
    return volume


def read_output(path: str | Path) -> Volume:
    """A volume crossdiff wrote itself (a translation, an uncertainty map), read back without the content
    check meant for inputs: a constant map is a result here (draws that agree everywhere, a collapsed
    model), which a report must show rather than refuse. Unreadable, non-finite or voxel-less files are
    still an InputError."""
    volume, _ = _read_raw(path, None, "refuse", None)
    _check_finite_and_nonempty(volume)
    return volume


def read_mask(path: str | Path, reference: Volume | None = None) -> Volume:
    """Read a binary mask (any label > 0 is foreground); if `reference` is given, it must share its grid."""
    mask, _ = _read_raw(path, None, "refuse", None)
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


def read_labels(path: str | Path, reference: Volume | None = None) -> Volume:
    """Read a label map (or any image) keeping its values: for resampling with nearest interpolation."""
    volume, _ = _read_raw(path, None, "refuse", None)
    _check_finite_and_nonempty(volume)
    return volume


def _read_raw(source: ImageSource, series_uid: str | None, colour: str, key: str | None) -> tuple[Volume, str]:
    """The image and the kind of file it came from ('dicom', 'slices', 'volume' or 'array'). Every file is
    checked before a C++ reader opens it (crossdiff.headers), and the grid read must be plausible; what the
    readers print is kept off the console, and what the checks warn about is kept in `Volume.warnings`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InputWarning)
        volume, kind = _read_checked(source, series_uid, colour, key)
    for warning in caught:  # issued again for the console, and kept with the volume for info and reports
        if issubclass(warning.category, InputWarning):
            volume.warnings.append(warning.message.problem)  # type: ignore[union-attr]
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return volume, kind


def _read_checked(source: ImageSource, series_uid: str | None, colour: str, key: str | None) -> tuple[Volume, str]:
    if not isinstance(source, (str, Path)):
        files = [Path(item) for item in source]
        if not files:
            raise InputError(None, "an empty list of slice files was given")
        for file in files:
            require_regular_file(file)
            check_raster(file)
        with native_output_silenced():
            volume = _stack_slices(files[0].parent, sorted(files, key=natural_key), colour)
        return volume, "slices"
    path = Path(source)
    name = path.name.lower()
    is_folder = stat.S_ISDIR(file_status(path).st_mode)
    if not is_folder:
        require_regular_file(path)  # before anything opens it: a FIFO would block for ever
    with native_output_silenced():
        if is_folder:
            volume, kind = _read_folder(path, series_uid, colour)
        elif name.endswith(DICOM_SUFFIXES) or (not name.endswith(KNOWN_SUFFIXES) and has_dicom_marker(path)):
            volume, kind = read_dicom_file(path), "dicom"
        elif name.endswith(SLICE_SUFFIXES):
            check_raster(path)
            volume, kind = _stack_slices(path, [path], colour), "slices"
        elif name.endswith(ARRAY_SUFFIXES):
            volume, kind = read_array_file(path, key), "array"
        elif name.endswith(VOLUME_SUFFIXES):
            volume, kind = _read_file(path), "volume"
        else:
            raise InputError(
                path,
                "is not a supported image; give NIfTI (.nii, .nii.gz), MHA/MHD, NRRD, PNG/JPEG, NumPy (.npy, .npz), "
                "MATLAB (.mat), or a folder holding one DICOM series or PNG/JPEG slices",
            )
    geometry = volume.geometry
    check_geometry(path, geometry.spacing, geometry.origin, geometry.direction)
    volume.path = path
    return volume, kind


def guess_modality(volume: Volume) -> tuple[str | None, str]:
    """CT / MR / PET from the innermost name that tells one (the file, then its folders), else from the
    intensities; with the reason. A name naming two modalities ('CT-MRI', a collection of pairs) says
    nothing about this file, so an inner folder ('MRI') wins over an outer one ('CT-MRI')."""
    for name in _names_inward_out(volume):
        words = set(re.split(r"[^a-z0-9]+", name.lower().replace(".nii.gz", "")))
        families = [family for family, names in MODALITY_WORDS.items() if words & set(names)]
        if len(families) == 1:
            return families[0], f"guessed from the name {name!r}"
    finite = volume.array[np.isfinite(volume.array)]
    if finite.size == 0:
        return None, "no name tells it and the image holds no finite value"
    low, high = float(np.percentile(finite, 1)), float(finite.max())
    if low <= -500 and high > 200:
        return "CT", "guessed from the intensities (air near -1000, as in HU)"
    if finite.min() >= 0 and high <= 60 and volume.array.dtype.kind == "f":
        return "PET", "guessed from the intensities (0 to 60, as SUV)"
    return "MR", "guessed from the intensities (no name tells it; not HU, not SUV)"


def _names_inward_out(volume: Volume) -> list[str]:
    """The first slice's file name (for a stack), then the path's components from the inside out."""
    names = [volume.evidence["first file"]] if "first file" in volume.evidence else []
    if volume.path is not None:
        names += [part for part in reversed(Path(volume.path).parts)][:NAME_LEVELS]
    return names[:NAME_LEVELS]


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


def _read_folder(folder: Path, series_uid: str | None, colour: str) -> tuple[Volume, str]:
    if contains_dicom(folder) or any(f.name.lower().endswith(DICOM_SUFFIXES) for f in folder.iterdir()):
        return read_dicom_series(folder, series_uid), "dicom"
    slices = sorted(
        (f for f in folder.iterdir() if f.name.lower().endswith(SLICE_SUFFIXES)), key=natural_key
    )
    for file in slices:
        check_raster(file)
    if slices:
        return _stack_slices(folder, slices, colour), "slices"
    subfolders = sorted(f.name for f in folder.iterdir() if f.is_dir() and not f.name.startswith("."))
    listed = ", ".join(subfolders[:6]) + (", ..." if len(subfolders) > 6 else "")
    hint = f"; it has subfolders ({listed}): give one of them" if subfolders else ""
    raise InputError(folder, f"folder holds neither a DICOM series nor PNG/JPEG slices{hint}")


def natural_key(path: Path) -> list[object]:
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


def _as_3d_scalar(path: Path, image: sitk.Image, colour: str = "refuse", notes: set[str] | None = None) -> sitk.Image:
    """Collapse trivial 4th dimensions and grey RGB(A); refuse true 4-D (time series, vector fields).
    How colour channels were read is added to `notes`."""
    if image.GetNumberOfComponentsPerPixel() > 1:
        image, note = _to_grey(path, image, colour)
        if notes is not None:
            notes.add(note)
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


def _to_grey(path: Path, image: sitk.Image, colour: str) -> tuple[sitk.Image, str]:
    """Grey stored as RGB or RGBA (equal channels, alpha ignored) is read as one channel. A true colour
    image (a pseudo-colour PET, a photo) is refused unless `colour` is 'luminance': turning a colour map
    into luma gives numbers that are not the tracer's, so that must be the user's explicit choice."""
    components = image.GetNumberOfComponentsPerPixel()
    if components not in (2, 3, 4):
        raise InputError(path, f"has {components} values per voxel; expected a grey-level image")
    if components == 2:  # grey + alpha
        return sitk.Cast(sitk.VectorIndexSelectionCast(image, 0), sitk.sitkFloat32), "grey with alpha: alpha ignored"
    channels = [sitk.Cast(sitk.VectorIndexSelectionCast(image, i), sitk.sitkFloat32) for i in range(3)]
    red, green, blue = (sitk.GetArrayViewFromImage(c) for c in channels)
    if np.array_equal(red, green) and np.array_equal(green, blue):
        return channels[0], "grey stored as RGB(A) (equal channels): read as one channel"
    spread = float(max(np.abs(red - green).max(), np.abs(green - blue).max(), np.abs(red - blue).max()))
    if spread <= GREY_TOLERANCE * max(float(red.max()), 1.0):
        mean = (channels[0] + channels[1] + channels[2]) / 3.0
        return mean, f"grey stored as RGB(A), channels within {spread:g} of each other: read as their mean"
    if colour != "luminance":
        raise InputError(
            path,
            "is a colour image (its red, green and blue differ): crossdiff reads grey levels; convert it to grey "
            "yourself, or ask for luminance explicitly (--colour luminance, or colour: luminance for this "
            "modality in the manifest) knowing that a colour map's luma is not the original quantity",
        )
    luma = 0.299 * channels[0] + 0.587 * channels[1] + 0.114 * channels[2]
    return luma, "colour converted to luminance (ITU-R 601), as asked: not the original quantity"


def _stack_slices(where: Path, files: list[Path], colour: str = "refuse") -> Volume:
    """One PNG/JPEG is a 1-slice volume; several are stacked in natural name order on a unit grid (image
    files carry no spacing; a PNG's print resolution is not one), said so in the evidence."""
    arrays = []
    notes: set[str] = set()
    for file in files:
        try:
            image = sitk.ReadImage(str(file))
        except RuntimeError as error:
            raise InputError(file, f"could not be read as an image ({_reason(error)})") from None
        image = _as_3d_scalar(file, image, colour, notes)
        if image.GetSize()[2] != 1:
            raise InputError(file, "is not a 2-D slice")
        array = sitk.GetArrayFromImage(image)[0].astype(np.float32)
        if arrays and array.shape != arrays[0].shape:
            raise InputError(file, f"slice size {array.shape[::-1]} differs from {files[0].name} {arrays[0].shape[::-1]}")
        arrays.append(array)
    stacked = np.stack(arrays)
    evidence = {"first file": files[0].name, "spacing": UNIT_PIXELS, "slices": f"{len(files)} file(s) in natural name order"}
    if notes:
        evidence["colour"] = "; ".join(sorted(notes))
    geometry = Geometry(stacked.shape[::-1], (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))  # type: ignore[arg-type]
    return Volume(stacked, geometry, path=where, evidence=evidence, planar=True)
