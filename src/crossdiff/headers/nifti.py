"""NIfTI-1/2 headers, checked through nibabel before ITK reads the file.

ITK's NIfTI reader pads a short file with garbage, silently turns NaN voxels into 0, and replaces a
zero or negative voxel size by 1 mm; nibabel parses the header in Python, so a damaged one is named
here instead: its declared size against the voxel limit and the bytes the file really holds (the whole
gzip stream is read, so its checksum is verified, but never more than the header declares), voxel sizes,
the orientation quaternion and affine, and NaN/Inf among float voxels.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np

from crossdiff.errors import InputError, warn_input
from crossdiff.file_checks import CHUNK, SPACING_RANGE_MM, check_data_bytes, check_dimensions

QUATERNION_TOLERANCE = 1e-4  # b^2 + c^2 + d^2 may exceed 1 by float rounding, not more
FORM_TOLERANCE_MM = 1e-3  # qform and sform of one image agree to float rounding when a tool wrote both


def check_nifti(path: Path) -> None:
    """Refuse a NIfTI file whose header or data cannot give a correct image (InputError naming it)."""
    image = _load(path)
    header = _raw_header(path, type(image.header))
    shape = tuple(int(n) for n in header.get_data_shape())
    check_dimensions(path, shape)
    _check_voxel_sizes(path, header, shape)
    _check_orientation(path, header)
    dtype = header.get_data_dtype()
    offset = int(image.dataobj.offset)
    declared = math.prod(shape) * dtype.itemsize
    compressed = path.name.lower().endswith(".gz")
    try:
        if not compressed and dtype.kind not in "fc":  # integers hold no NaN: the size is all there is to check
            available, nan, inf = path.stat().st_size, 0, 0
        else:
            with gzip.open(path, "rb") if compressed else path.open("rb") as stream:
                available, nan, inf = _scan_voxels(stream, offset, offset + declared, dtype)
    except (OSError, EOFError, ValueError, zlib.error) as error:
        raise InputError(path, f"could not be read: the file is corrupt or truncated ({error})") from None
    check_data_bytes(path, max(available - offset, 0), declared)
    if nan or inf:
        raise InputError(path, f"image contains non-finite values ({nan} NaN, {inf} Inf voxels)")


def _load(path: Path) -> nib.Nifti1Image:
    try:
        image = nib.load(str(path))
        image.dataobj.offset  # noqa: B018 - computing it validates vox_offset
    except Exception as error:  # nibabel raises many types on a damaged header; all mean 'not a readable NIfTI'
        raise InputError(path, f"could not be read: the file is corrupt or truncated ({type(error).__name__}: {error})") from None
    if not isinstance(image, nib.Nifti1Image | nib.Nifti2Image):
        raise InputError(path, f"is not a NIfTI image (nibabel reads it as {type(image).__name__})")
    return image


def _raw_header(path: Path, kind: type) -> nib.Nifti1Header:
    """The header exactly as stored: nibabel's image.header is a copy it may already have repaired
    (a zero voxel size replaced), and the repairs are what must be seen here."""
    try:
        with nib.openers.ImageOpener(str(path)) as stream:
            return kind.from_fileobj(stream, check=False)
    except Exception as error:  # as in _load: any failure of the parser means a damaged header
        raise InputError(path, f"could not be read: the header is damaged ({type(error).__name__}: {error})") from None


def _check_voxel_sizes(path: Path, header: nib.Nifti1Header, shape: tuple[int, ...]) -> None:
    """pixdim of every spatial axis that has more than one voxel: ITK would turn 0, negative or NaN into 1 mm."""
    low, high = SPACING_RANGE_MM
    pixdim = [float(v) for v in header["pixdim"][1 : 1 + min(len(shape), 3)]]
    for axis, (size, value) in enumerate(zip(shape, pixdim), start=1):
        if size > 1 and not (math.isfinite(value) and low <= value <= high):
            raise InputError(path, f"the header gives voxel size pixdim[{axis}] = {value:g} mm along an axis of {size} "
                                   f"voxels; it must lie in [{low:g}, {high:g}] mm (the header is damaged)")


def _check_orientation(path: Path, header: nib.Nifti1Header) -> None:
    """The quaternion and affine ITK builds the direction and origin from must be finite and valid."""
    qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
    qfac = float(header["pixdim"][0])
    if qform_code > 0 and qfac not in (-1.0, 0.0, 1.0):
        raise InputError(path, f"the header's qfac pixdim[0] = {qfac:g} must be 1 or -1 (0 counts as 1): it decides whether "
                               "the slice axis is flipped (the header is damaged)")
    if qform_code > 0:
        quaternion = np.array([header["quatern_b"], header["quatern_c"], header["quatern_d"]], dtype=float)
        offsets = np.array([header["qoffset_x"], header["qoffset_y"], header["qoffset_z"]], dtype=float)
        if not (np.isfinite(quaternion).all() and np.isfinite(offsets).all()):
            raise InputError(path, "the header's orientation (qform) holds NaN or Inf (the header is damaged)")
        if float(quaternion @ quaternion) > 1.0 + QUATERNION_TOLERANCE:
            raise InputError(path, f"the header's orientation quaternion {tuple(quaternion)} is not a rotation "
                                   "(b^2 + c^2 + d^2 > 1; the header is damaged)")
    if sform_code > 0:
        rows = np.array([header["srow_x"], header["srow_y"], header["srow_z"]], dtype=float)
        if not np.isfinite(rows).all() or abs(np.linalg.det(rows[:, :3])) == 0.0:
            raise InputError(path, "the header's affine (sform) is not finite and invertible (the header is damaged)")
    if qform_code <= 0 and sform_code <= 0:
        warn_input(path, "has no orientation (qform and sform codes 0): read with origin 0 and identity directions")
    elif qform_code > 0 and sform_code > 0:
        forms = header.copy()
        forms["pixdim"][0] = qfac or 1.0  # the standard's reading of qfac 0, which nibabel refuses
        gap = float(np.abs(forms.get_qform() - forms.get_sform()).max())
        if gap > FORM_TOLERANCE_MM:
            warn_input(path, f"its two orientations (qform and sform) disagree by up to {gap:.3g} mm; read with the one "
                             "ITK prefers: check which one is right")


def _scan_voxels(stream: BinaryIO, offset: int, end: int, dtype: np.dtype) -> tuple[int, int, int]:
    """Bytes in the stream, read to its end but never past `end` + one chunk (so a gzip stream is checked
    to its CRC and a 'bomb' costs no more than the image), and NaN/Inf among the voxels [offset, end)."""
    position, nan, inf, carry = 0, 0, 0, b""
    floating = dtype.kind in "fc"
    while position <= end and (chunk := stream.read(CHUNK)):
        start, stop = position, position + len(chunk)
        position = stop
        if not floating or stop <= offset or start >= end:
            continue
        data = carry + chunk[max(offset - start, 0) : min(end, stop) - start]
        usable = len(data) - len(data) % dtype.itemsize
        values, carry = np.frombuffer(data[:usable], dtype=dtype), data[usable:]
        nan += int(np.isnan(values).sum())
        inf += int(np.isinf(values).sum())
    return position, nan, inf
