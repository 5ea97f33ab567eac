"""DICOM image files, checked through pydicom before GDCM decodes their pixels.

GDCM trusts the header: a truncated RLE file with garbage segment offsets makes it allocate 4 GB, a
Rows value larger than the pixel data is padded with zeros, and a slice without Pixel Spacing, Image
Position or Rescale Intercept silently gets 1 mm, the origin or 0 HU offset (one CT slice 1024 HU too
bright). So each image file's header is checked here: pixel description and declared size (against
the voxel limit and the bytes the file holds), the encapsulated fragments and each codec's own frame
header, the image plane (position, orientation, spacing) and the rescale that CT and PET need.
The modalities crossdiff works with (CT, MR, PET) must carry the image plane, as the standard
requires of them (Type 1); other images without one are read with GDCM's defaults and a warning.
"""

from __future__ import annotations

import math
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.tag import Tag
from pydicom.valuerep import VR

from crossdiff.errors import InputError, warn_input
from crossdiff.file_checks import MAX_COORDINATE_MM, SPACING_RANGE_MM, check_dimensions

DEFER_BYTES = 1024  # values larger than this (the pixel data) are not read with the header
PIXEL_DATA = Tag(0x7FE0, 0x0010)
RLE = "1.2.840.10008.1.2.5"
DEFLATED = "1.2.840.10008.1.2.1.99"
NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", DEFLATED}
JPEG_LS = {"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}
JPEG_2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
             "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}
SAMPLES = {"MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "YBR_FULL": 3, "YBR_FULL_422": 3,
           "YBR_ICT": 3, "YBR_RCT": 3, "YBR_PARTIAL_420": 3}
BITS_ALLOCATED = (8, 16, 32, 64)
ORTHONORMAL_TOLERANCE = 1e-3
MAX_RESCALE = 1e6  # |slope| and |intercept| beyond this map any stored value outside every physical scale
UNDEFINED_LENGTH = 0xFFFFFFFF
VALID_VRS = frozenset(vr.value for vr in VR)


def read_dataset(path: Path) -> pydicom.Dataset:
    """The whole dataset of a file, pixel data deferred (read from the file only when checked)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # pydicom warns on every odd value; the checks decide
            dataset = pydicom.dcmread(path, force=True, defer_size=DEFER_BYTES)
    except Exception as error:  # pydicom raises many types on garbage; all mean 'not readable DICOM'
        raise InputError(path, f"is not a readable DICOM file ({type(error).__name__}: {error})") from None
    if any("End of file reached before delimiter" in str(warning.message) for warning in caught):
        raise InputError(path, "DICOM pixel data could not be read; the file is truncated or corrupt (it ends inside an "
                               "element of undefined length)")
    return dataset


def value(path: Path, header: pydicom.Dataset, keyword: str) -> Any:
    """A header value converted by pydicom, or None when absent or empty; a value pydicom cannot convert
    (a non-numeric Pixel Spacing, a US of the wrong length) is an InputError naming the tag."""
    if keyword not in header:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = header[keyword].value
    except Exception as error:  # conversion of a damaged value: any failure means it is unusable
        raise InputError(path, f"its {keyword} cannot be read ({type(error).__name__}: {error})") from None
    return None if result is None or result == "" else result


def numbers(path: Path, header: pydicom.Dataset, keyword: str, count: int) -> list[float] | None:
    """`count` finite numbers of a multi-valued tag, None when absent; anything else is an InputError."""
    raw = value(path, header, keyword)
    if raw is None:
        return None
    items = list(raw) if isinstance(raw, pydicom.multival.MultiValue | list | tuple) else [raw]
    try:
        result = [float(item) for item in items]
    except (TypeError, ValueError, OverflowError):
        result = []
    if len(result) != count or not all(math.isfinite(v) for v in result):
        raise InputError(path, f"its {keyword} is {_shown(raw)}: it must be {count} finite number(s)")
    return result


def whole(path: Path, header: pydicom.Dataset, keyword: str, low: int, high: int, default: int | None = None) -> int:
    raw = value(path, header, keyword)
    if raw is None and default is not None:
        return default
    try:
        result = int(raw) if not isinstance(raw, float) or raw.is_integer() else None
    except (TypeError, ValueError, OverflowError):
        result = None
    if result is None or not low <= result <= high:
        raise InputError(path, f"its {keyword} is {_shown(raw)}: it must be a whole number from {low} to {high}")
    return result


def _shown(raw: object) -> str:
    text = repr(raw)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------ one image


def check_image(path: Path, header: pydicom.Dataset, required_plane: bool, rescale: tuple[str, ...]) -> None:
    """Everything GDCM needs to decode `path` correctly. `required_plane`: the modality must carry Image
    Position, Orientation and Pixel Spacing; `rescale`: the Rescale tags it must carry (CT: slope and
    intercept, PET: slope)."""
    _check_element_bounds(path, header)
    rows, columns, frames, samples, bits = pixel_description(path, header)
    check_dimensions(path, [columns, rows, frames], "image")
    _check_pixel_data(path, header, rows, columns, frames, samples, bits)
    check_plane(path, header, required_plane)
    for keyword in ("SliceThickness", "SpacingBetweenSlices"):
        found = numbers(path, header, keyword, 1)
        if found is not None and not 0 <= found[0] <= SPACING_RANGE_MM[1]:
            raise InputError(path, f"its {keyword} is {found[0]:g} mm, which no slice has")
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        found = numbers(path, header, keyword, 1)
        if found is None and keyword in rescale:
            raise InputError(path, f"has no {keyword}: a {header.get('Modality', '')} slice needs it to be in physical "
                                   "units (without it this slice would be read on another scale than its neighbours)")
        if found is not None and not (abs(found[0]) <= MAX_RESCALE and (keyword != "RescaleSlope" or found[0] != 0)):
            raise InputError(path, f"its {keyword} is {found[0]:g}; a rescale must be non-zero and at most {MAX_RESCALE:g} "
                                   "in size")


def transfer_syntax(header: pydicom.Dataset) -> str:
    """The file meta's Transfer Syntax UID, '' when the file has no meta header."""
    meta = getattr(header, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "") if meta is not None else "")


def _check_element_bounds(path: Path, header: pydicom.Dataset) -> None:
    """Every top-level element must be one a stored image can hold and end inside the file: GDCM
    allocates the length an element declares before reading it (a garbage length after appended bytes
    made it reserve 2 GB for a 4 KB file), and where pydicom steps over damage that GDCM reads another
    way, elements of the command group (0000), the file meta group (0002) or an undefined VR show it."""
    size = path.stat().st_size
    deflated = transfer_syntax(header) == DEFLATED  # refused in _check_pixel_data; its offsets are not the file's
    for tag in header.keys():
        element = header.get_item(tag, keep_deferred=True)
        vr = getattr(element, "VR", None)
        if tag.group in (0x0000, 0x0002) or (vr is not None and vr not in VALID_VRS):
            raise InputError(path, f"holds DICOM element {tag} (VR {vr!r}), which no stored image has: the file is "
                                   "damaged (truncated or corrupt)")
        length, tell = getattr(element, "length", None), getattr(element, "value_tell", None)
        if length is None or tell is None or length == UNDEFINED_LENGTH:
            continue
        read = getattr(element, "value", None)
        short = read is not None and len(read) < length
        if short or (not deflated and tell + length > size):
            raise InputError(path, f"DICOM element {tag} declares {length:,} bytes that the file does not hold: the file is "
                                   "truncated or corrupt")


def pixel_description(path: Path, header: pydicom.Dataset) -> tuple[int, int, int, int, int]:
    """Rows, Columns, frames, samples per pixel and bits allocated, each checked against the others."""
    rows = whole(path, header, "Rows", 1, 65535)
    columns = whole(path, header, "Columns", 1, 65535)
    frames = whole(path, header, "NumberOfFrames", 1, 1 << 24, default=1)
    samples = whole(path, header, "SamplesPerPixel", 1, 3, default=1)
    bits = whole(path, header, "BitsAllocated", 1, 64)
    if bits not in BITS_ALLOCATED:
        allowed = ", ".join(map(str, BITS_ALLOCATED))
        raise InputError(path, f"its BitsAllocated is {bits}; crossdiff reads images of {allowed} bits")
    stored = whole(path, header, "BitsStored", 1, bits, default=bits)
    whole(path, header, "HighBit", 0, bits - 1, default=stored - 1)
    whole(path, header, "PixelRepresentation", 0, 1, default=0)
    photometric = str(value(path, header, "PhotometricInterpretation") or ("MONOCHROME2" if samples == 1 else "RGB"))
    if SAMPLES.get(photometric.strip().upper()) != samples:
        raise InputError(path, f"its PhotometricInterpretation {photometric!r} does not fit SamplesPerPixel {samples}")
    return rows, columns, frames, samples, bits


def check_plane(path: Path, header: pydicom.Dataset, required: bool) -> None:
    """Image Position, Orientation and Pixel Spacing: finite, plausible, orthonormal; required for CT/MR/PET."""
    if "PerFrameFunctionalGroupsSequence" in header or "SharedFunctionalGroupsSequence" in header:
        return  # enhanced multi-frame objects keep their plane per frame; GDCM reads those
    position = numbers(path, header, "ImagePositionPatient", 3)
    orientation = numbers(path, header, "ImageOrientationPatient", 6)
    spacing = numbers(path, header, "PixelSpacing", 2)
    low, high = SPACING_RANGE_MM
    if spacing is not None and not all(low <= s <= high for s in spacing):
        raise InputError(path, f"its PixelSpacing is {spacing} mm; each must lie in [{low:g}, {high:g}] mm")
    if position is not None and max(abs(p) for p in position) > MAX_COORDINATE_MM:
        raise InputError(path, f"its ImagePositionPatient {position} is not a position in a scanner")
    if orientation is not None:
        row, column = np.array(orientation[:3]), np.array(orientation[3:])
        if not (abs(row @ row - 1) < ORTHONORMAL_TOLERANCE and abs(column @ column - 1) < ORTHONORMAL_TOLERANCE
                and abs(row @ column) < ORTHONORMAL_TOLERANCE):
            raise InputError(path, f"its ImageOrientationPatient {orientation} is not two orthogonal unit vectors")
    absent = [name for name, found in (("ImagePositionPatient", position), ("ImageOrientationPatient", orientation),
                                       ("PixelSpacing", spacing)) if found is None]
    if absent and required:
        raise InputError(path, f"has no {', '.join(absent)}: a {header.get('Modality', '')} image must say where it lies "
                               "and how large its pixels are")
    if absent:
        warn_input(path, f"has no {', '.join(absent)}: read with GDCM's defaults (origin 0, axial, 1 mm pixels); "
                         "its position and size are not known")


# ---------------------------------------------------------------------------------- pixel data


def _check_pixel_data(path: Path, header: pydicom.Dataset, rows: int, columns: int, frames: int, samples: int,
                      bits: int) -> None:
    element = header.get_item(PIXEL_DATA, keep_deferred=True)
    if element is None:
        raise InputError(path, "has no pixel data")
    syntax = transfer_syntax(header)
    if syntax == DEFLATED:
        raise InputError(path, "is a deflated DICOM file (transfer syntax 1.2.840.10008.1.2.1.99), which crossdiff does "
                               "not read: its element lengths cannot be checked before GDCM inflates it; convert it "
                               "(e.g. dcmconv +te)")
    encapsulated = getattr(element, "is_undefined_length", False) or getattr(element, "length", 0) == 0xFFFFFFFF
    if syntax and (syntax not in NATIVE) != bool(encapsulated):
        raise InputError(path, f"its pixel data are {'compressed' if encapsulated else 'not compressed'}, but its "
                               f"transfer syntax {syntax} says otherwise")
    if not encapsulated:
        _check_native(path, header, element, rows * columns * frames * samples * bits // 8, syntax)
        return
    with path.open("rb") as stream:
        stream.seek(element.value_tell)
        fragments = _fragments(path, stream.read())
    if len(fragments) < frames:
        raise InputError(path, f"its compressed pixel data hold {len(fragments)} fragment(s) for {frames} frame(s) (truncated)")
    if syntax == RLE:
        for fragment in fragments[:frames]:
            _check_rle(path, fragment, samples * bits // 8)
    elif syntax in JPEG_LS or syntax.startswith("1.2.840.10008.1.2.4.5") or syntax.startswith("1.2.840.10008.1.2.4.7"):
        _check_codestream_size(path, _jpeg_frame_size(fragments[0]), rows, columns, "JPEG")
    elif syntax in JPEG_2000:
        _check_codestream_size(path, _j2k_size(fragments[0]), rows, columns, "JPEG 2000")


def _check_native(path: Path, header: pydicom.Dataset, element: Any, expected: int, syntax: str) -> None:
    """Uncompressed pixel data must be exactly the declared size (one pad byte allowed) and inside the file."""
    if str(header.get("PhotometricInterpretation", "")).strip().upper() == "YBR_FULL_422":
        expected = expected * 2 // 3  # two chroma samples per two pixels
    length = int(getattr(element, "length", None) if getattr(element, "value", None) is None else len(element.value))
    if length not in (expected, expected + expected % 2):
        raise InputError(path, f"its pixel data hold {length:,} bytes where Rows, Columns, frames and bits declare "
                               f"{expected:,}: the file is truncated or its header is damaged")
    tell = getattr(element, "value_tell", None)
    if tell is not None and tell + length > path.stat().st_size:
        raise InputError(path, f"DICOM pixel data could not be read; the file is truncated or corrupt "
                               f"({path.stat().st_size - tell:,} of {length:,} bytes)")


def _fragments(path: Path, data: bytes) -> list[bytes]:
    """The fragments after the basic offset table, each item's length checked against the data, up to
    the sequence delimiter (pydicom's generator would hand back a truncated fragment without a word)."""
    position, items = 0, []
    while True:
        if position + 8 > len(data):
            raise InputError(path, "DICOM pixel data could not be read; the file is truncated or corrupt "
                                   "(its compressed pixel data end without a sequence delimiter)")
        group, element, length = struct.unpack_from("<HHI", data, position)
        position += 8
        if (group, element) == (0xFFFE, 0xE0DD):
            return items[1:]
        if (group, element) != (0xFFFE, 0xE000) or length > len(data) - position:
            raise InputError(path, "DICOM pixel data could not be read; the file is truncated or corrupt "
                                   f"(item ({group:04X},{element:04X}) of {length:,} bytes at offset {position - 8})")
        items.append(data[position : position + length])
        position += length


def _check_rle(path: Path, fragment: bytes, segments: int) -> None:
    """The RLE header: one segment per byte of a pixel, offsets increasing inside the fragment. A damaged
    header is what made GDCM allocate gigabytes for a 7 KB file; decoding can then only fail cleanly."""
    if len(fragment) < 64:
        raise InputError(path, "its RLE pixel data are truncated (no segment header)")
    count, *offsets = struct.unpack("<16I", fragment[:64])
    used = offsets[:count]
    ordered = count == segments <= 15 and used[0] == 64 and all(a < b for a, b in zip(used, used[1:]))
    if not ordered or used[-1] >= len(fragment):
        raise InputError(path, f"its RLE pixel data are damaged (segment header: {count} segments at {used}; "
                               f"{segments} expected within {len(fragment)} bytes)")


def _check_codestream_size(path: Path, size: tuple[int, int] | None, rows: int, columns: int, codec: str) -> None:
    if size is None:
        raise InputError(path, f"its {codec} pixel data have no readable frame header (truncated or damaged)")
    if size != (columns, rows):
        raise InputError(path, f"its {codec} pixel data are {size[0]} x {size[1]} pixels, its header says "
                               f"{columns} x {rows}: the file is damaged")


def _jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first frame header (SOFn, or JPEG-LS SOF55) of a JPEG codestream."""
    position = 2 if data.startswith(b"\xff\xd8") else -1
    while 0 <= position and position + 9 <= len(data):
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7):
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            return width, height
        if marker == 0xDA:
            return None
        position += 2 + struct.unpack(">H", data[position + 2 : position + 4])[0]
    return None


def _j2k_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the SIZ segment of a JPEG 2000 codestream (bare, or inside a JP2 'jp2c' box)."""
    start = data.find(b"\xff\x4f\xff\x51")
    if start < 0 or start + 22 > len(data):
        return None
    xsiz, ysiz, x0, y0 = struct.unpack(">IIII", data[start + 8 : start + 24])
    return xsiz - x0, ysiz - y0
