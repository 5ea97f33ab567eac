"""The one image type of crossdiff: a voxel array with its physical geometry.

Arrays are stored the way SimpleITK hands them over, indexed (z, y, x); geometry is in ITK's
patient coordinates (LPS, millimetres) with size, spacing and origin in (x, y, z) order. Keeping the
geometry beside the array is what lets every output land in its input's exact physical space.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from crossdiff.atomic import atomic_path
from crossdiff.errors import InputError, error_summary

WRITABLE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".nrrd")
NIFTI_HEADER_BYTES = 352  # NIfTI-1 header plus the 4-byte extension flag, before the voxels

# Which fill value a voxel gets when it falls outside the image during resampling. Only CT in
# Hounsfield units has a negative floor (air); a display-windowed or arbitrary-unit CT is black at 0.
BACKGROUND = {"CT": -1024.0, "MR": 0.0, "PET": 0.0}


def background_value(modality: str | None, units: str | None) -> float:
    """The value that stands for 'nothing here': -1024 for CT in HU (or of unknown units), else 0."""
    if modality == "CT" and units not in (None, "HU"):
        return 0.0
    return BACKGROUND.get(modality or "", 0.0)

INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}


@dataclass(frozen=True)
class Geometry:
    """A voxel grid in physical space: size, spacing and origin in (x, y, z); direction row-major 3x3."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(
            size=tuple(int(s) for s in image.GetSize()),  # type: ignore[arg-type]
            spacing=tuple(float(s) for s in image.GetSpacing()),  # type: ignore[arg-type]
            origin=tuple(float(o) for o in image.GetOrigin()),  # type: ignore[arg-type]
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def with_spacing(self, spacing: tuple[float, float, float]) -> Geometry:
        """The same origin, orientation and extent sampled at `spacing` (x, y, z)."""
        size = tuple(max(1, int(round(n * old / new))) for n, old, new in zip(self.size, self.spacing, spacing))
        return Geometry(size, tuple(float(s) for s in spacing), self.origin, self.direction)  # type: ignore[arg-type]

    @property
    def shape(self) -> tuple[int, int, int]:
        """The numpy shape (z, y, x) of an array on this grid."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def orientation(self) -> str:
        """Three letters naming where each axis points, in ITK's convention (identity is 'LPS')."""
        return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(self.direction)

    @property
    def obliquity_degrees(self) -> float:
        """Largest angle between an image axis and the patient axis it runs closest to (0 when aligned)."""
        columns = np.abs(np.array(self.direction).reshape(3, 3))
        cosines = np.clip(columns.max(axis=0), -1.0, 1.0)
        return float(np.degrees(np.arccos(cosines)).max())

    def describe_orientation(self) -> str:
        """The axis code, and how oblique the grid is when it is: the code alone hides a tilt."""
        angle = self.obliquity_degrees
        if angle < 0.01:
            return self.orientation
        return f"oblique ({angle:.1f} degrees from the patient axes; nearest code {self.orientation})"

    def matches(self, other: Geometry, atol: float = 1e-3) -> bool:
        """Same grid up to `atol` mm (spacing, origin) and `atol` in direction cosines."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    def describe_difference(self, other: Geometry) -> str:
        parts = []
        for name in ("size", "spacing", "origin", "direction"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if not np.allclose(mine, theirs, atol=1e-3):
                parts.append(f"{name} {_fmt(mine)} vs {_fmt(theirs)}")
        return "; ".join(parts) or "none"


def _fmt(values: tuple) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


@dataclass
class Volume:
    """A 3-D image: `array` indexed (z, y, x), its `geometry`, and what it shows.

    `modality` is the family that decides intensity handling ('CT', 'MR', 'PET' or None when
    unknown); `units` names the intensity scale ('HU', 'SUVbw', 'display', 'a.u.', ...; see
    crossdiff.units); `path` is where it was read from, so later errors can name the file.
    `evidence` says, per decision the reader made ('modality', 'units', 'spacing', ...), why: `info`
    and `prepare` print it, so no guess stays silent; `warnings` are the decisions a user must check.
    `planar` marks 2-D images stacked without a known distance between them (PNG slices): metrics then
    work slice by slice (2-D SSIM) instead of treating the stack as a volume.
    """

    array: np.ndarray
    geometry: Geometry
    modality: str | None = None
    units: str | None = None
    path: Path | None = field(default=None, compare=False)
    evidence: dict[str, str] = field(default_factory=dict, compare=False)
    warnings: list[str] = field(default_factory=list, compare=False)
    planar: bool = False

    def __post_init__(self) -> None:
        if self.array.shape != self.geometry.shape:
            raise ValueError(f"array shape {self.array.shape} does not match grid {self.geometry.shape}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.array.shape  # type: ignore[return-value]

    @property
    def background(self) -> float:
        """Value that stands for 'nothing here' in this modality (air in CT is -1024 HU)."""
        return background_value(self.modality, self.units)

    def with_array(self, array: np.ndarray, **changes: object) -> Volume:
        """A new volume on the same grid, e.g. the normalised or translated version of this one."""
        return replace(self, array=array, **changes)  # type: ignore[arg-type]

    def to_sitk(self) -> sitk.Image:
        return self.geometry.apply_to(sitk.GetImageFromArray(np.ascontiguousarray(self.array)))

    @classmethod
    def from_sitk(
        cls, image: sitk.Image, modality: str | None = None, units: str | None = None, path: Path | None = None
    ) -> Volume:
        return cls(sitk.GetArrayFromImage(image), Geometry.of(image), modality, units, path)


def write_volume(volume: Volume, path: str | Path) -> Path:
    """Write NIfTI or MHA/NRRD with the geometry preserved; atomically, so a failure leaves nothing.

    The data is written to a hidden sibling, checked to be complete, and only then moved over `path`;
    an existing file at `path` survives any failure. Raises InputError naming `path` if it fails.
    """
    path = Path(path)
    suffix = _writable_suffix(path)
    try:
        with atomic_path(path) as tmp:
            _write_staged(volume, tmp, suffix)
    except (OSError, RuntimeError) as error:
        raise InputError(path, f"could not be written ({error_summary(error, last=isinstance(error, RuntimeError))})") from None
    return path


PNG_SUFFIX = ".png"


def write_png(volume: Volume, path: str | Path, window: tuple[float, float]) -> list[Path]:
    """Write 8-bit grey PNG: `path` itself for a one-slice volume, else `<stem>-000.png`, ... beside it.

    Grey level = round(255 * clip((value - low) / (high - low), 0, 1)) with `window` = (low, high): PNG
    holds no physical units and no geometry, so callers must say which window they used. Every file is
    written atomically; nothing is written unless the window is valid.
    """
    from PIL import Image

    path = Path(path)
    low, high = window
    if not high > low:
        raise InputError(path, f"the PNG window must have low < high, not {low:g}, {high:g}")
    levels = np.round(255.0 * np.clip((volume.array.astype(np.float64) - low) / (high - low), 0.0, 1.0)).astype(np.uint8)
    if len(levels) == 1:
        targets = [path]
    else:
        targets = [path.with_name(f"{path.name[: -len(PNG_SUFFIX)]}-{i:03d}{PNG_SUFFIX}") for i in range(len(levels))]
    try:
        for plane, target in zip(levels, targets):
            with atomic_path(target) as tmp:
                Image.fromarray(plane).save(tmp, format="PNG")
    except OSError as error:
        raise InputError(path, f"could not be written ({error})") from None
    return targets


def _writable_suffix(path: Path) -> str:
    """The format's canonical lower-case suffix: ITK picks its writer by suffix and knows no '.NII.GZ'."""
    for suffix in WRITABLE_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return suffix
    raise InputError(path, f"cannot write this format; use one of {', '.join(WRITABLE_SUFFIXES)}")


def _write_staged(volume: Volume, tmp: Path, suffix: str) -> None:
    """Write to the temporary path and verify it: ITK's NIfTI writer reports a short write (full
    disk, quota) only on stderr and returns normally, so the size is checked before the rename."""
    sitk.WriteImage(volume.to_sitk(), str(tmp), useCompression=suffix in (".nii.gz", ".mha", ".nrrd"))
    if suffix.startswith(".nii"):
        _check_nifti_written(tmp, volume.array.nbytes)


def _check_nifti_written(path: Path, data_bytes: int) -> None:
    if path.name.endswith(".gz"):
        written = 0
        try:
            with gzip.open(path, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    written += len(chunk)
        except (EOFError, zlib.error, gzip.BadGzipFile) as error:
            raise OSError(f"the compressed stream is incomplete: {error}") from None
    else:
        written = path.stat().st_size
    if written < NIFTI_HEADER_BYTES + data_bytes:
        raise OSError(f"only {written} of {NIFTI_HEADER_BYTES + data_bytes} bytes were written; is the disk full?")




def resample_to(
    volume: Volume,
    reference: Geometry | Volume,
    interpolation: str = "linear",
    default_value: float | None = None,
    transform: sitk.Transform | None = None,
) -> Volume:
    """Resample `volume` onto the reference grid through physical space (optionally through `transform`,
    which maps reference points to `volume` points, as SimpleITK registration returns it).

    Voxels the source does not cover get `default_value`, by default the modality's background
    (-1024 HU for CT, 0 otherwise). Use 'nearest' for masks and label maps.
    """
    grid = reference.geometry if isinstance(reference, Volume) else reference
    if interpolation not in INTERPOLATORS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose from {sorted(INTERPOLATORS)}")
    if transform is None and grid == volume.geometry:
        return _same_grid_copy(volume, interpolation)
    fill = volume.background if default_value is None else default_value
    reference_image = grid.apply_to(sitk.Image(list(grid.size), sitk.sitkUInt8))
    moving = volume.to_sitk()
    if interpolation != "nearest" and moving.GetPixelID() != sitk.sitkFloat32:
        moving = sitk.Cast(moving, sitk.sitkFloat32)
    resampled = sitk.Resample(
        moving,
        reference_image,
        transform or sitk.Transform(),
        INTERPOLATORS[interpolation],
        float(fill),
        moving.GetPixelID(),
    )
    return volume.with_array(sitk.GetArrayFromImage(resampled), geometry=Geometry.of(resampled))


def _same_grid_copy(volume: Volume, interpolation: str) -> Volume:
    """Onto its own grid a volume is itself; interpolating would only add rounding noise and time."""
    array = volume.array
    if interpolation != "nearest" and array.dtype != np.float32:
        array = array.astype(np.float32)
    return volume.with_array(array.copy())


def coverage(volume: Volume, reference: Geometry | Volume, transform: sitk.Transform | None = None) -> np.ndarray:
    """Boolean array on the reference grid: True where `volume` has data (its field of view)."""
    ones = volume.with_array(np.ones(volume.shape, dtype=np.uint8))
    return resample_to(ones, reference, "nearest", 0, transform).array.astype(bool)
