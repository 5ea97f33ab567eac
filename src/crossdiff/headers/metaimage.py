"""MetaImage (.mha, .mhd) headers, checked before ITK's MetaIO reads the file.

MetaIO crashes the process on a negative NDims, allocates whatever DimSize declares, follows
ElementDataFile anywhere (a FIFO blocks it for ever, /dev/zero never ends), prints its parse errors to
the console and reports a short file as 'No such file or directory'. So the header is parsed here and
every field ITK would use is checked: its type and range, the declared size against the voxel limit,
and the stored bytes (inflated in constant memory when compressed) against the declared size.
Fields with a documented default (ElementSpacing 1, Offset 0, identity TransformMatrix) may be absent;
the reader then warns, since the default may not be where the patient was.
"""

from __future__ import annotations

import math
from pathlib import Path

from crossdiff.errors import InputError, warn_input
from crossdiff.file_checks import (
    check_data_bytes,
    check_dimensions,
    check_geometry,
    data_file_beside,
    decoded_length,
    header_integer,
    parse_numbers,
    require_regular_file,
)

ELEMENT_BYTES = {
    "MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4, "MET_UINT": 4,
    "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8, "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8,
}  # fmt: skip
REQUIRED = ("NDims", "DimSize", "ElementType", "ElementDataFile")
SPACING_KEYS = ("ElementSpacing", "ElementSize")
ORIGIN_KEYS = ("Offset", "Position", "Origin")
DIRECTION_KEYS = ("TransformMatrix", "Rotation", "Orientation")
MAX_HEADER_BYTES = 1 << 20
MAX_DIMENSIONS = 4  # a 3-D volume, or one with a trivial 4th axis (crossdiff refuses true 4-D later)
MAX_CHANNELS = 4


def check_metaimage(path: Path) -> None:
    """Refuse a MetaImage whose header or data cannot give a correct image (InputError naming it)."""
    fields, data_offset = read_header(path)
    dimensions = _integer(path, fields, "NDims", 1, MAX_DIMENSIONS)
    sizes = parse_numbers(fields["DimSize"], dimensions, int)
    if sizes is None:
        raise InputError(path, f"DimSize = {fields['DimSize']!r} must give {dimensions} whole numbers (NDims)")
    check_dimensions(path, [int(s) for s in sizes])
    element = fields["ElementType"].upper()
    if element not in ELEMENT_BYTES:
        raise InputError(path, f"ElementType {fields['ElementType']!r} is not one of {', '.join(ELEMENT_BYTES)}")
    channels = _integer(path, fields, "ElementNumberOfChannels", 1, MAX_CHANNELS) if "ElementNumberOfChannels" in fields else 1
    _check_geometry_fields(path, fields, dimensions)
    if fields.get("BinaryData", "True").lower() not in ("true", "1"):
        raise InputError(path, "stores its voxels as text (BinaryData = False), which crossdiff does not read; "
                               "save it as binary MetaImage")
    declared = math.prod(int(s) for s in sizes) * channels * ELEMENT_BYTES[element]
    _check_data(path, fields, data_offset, declared)


def read_header(path: Path) -> tuple[dict[str, str], int]:
    """The 'Key = Value' fields up to ElementDataFile (always the last) and where the data starts; a file
    without the required fields, or with a field twice, is not a MetaImage crossdiff reads."""
    require_regular_file(path)
    fields: dict[str, str] = {}
    offset = 0
    with path.open("rb") as handle:
        while raw := handle.readline(4096):
            offset += len(raw)
            key, sep, value = raw.decode("latin-1").partition("=")
            key = key.strip()
            if not sep or offset > MAX_HEADER_BYTES:
                break
            if key in fields:
                raise InputError(path, f"could not be read: the MetaImage header gives {key} twice")
            fields[key] = value.strip()
            if key == "ElementDataFile":
                break
    missing = [key for key in REQUIRED if key not in fields]
    if missing:
        raise InputError(path, f"could not be read: not a MetaImage file (header lacks {', '.join(missing)})")
    return fields, offset


def _integer(path: Path, fields: dict[str, str], key: str, low: int, high: int) -> int:
    return header_integer(path, f"{key} =", fields[key], low, high)


def _check_geometry_fields(path: Path, fields: dict[str, str], dimensions: int) -> None:
    """Spacing, origin and direction as ITK will read them: the right count of finite, plausible numbers."""
    found = {}
    for keys, count in ((SPACING_KEYS, dimensions), (ORIGIN_KEYS, dimensions), (DIRECTION_KEYS, dimensions**2)):
        key = next((k for k in keys if k in fields), None)
        if key is None:
            found[keys[0]] = None
            continue
        values = parse_numbers(fields[key], count)
        if values is None:
            raise InputError(path, f"{key} = {fields[key]!r} must give {count} numbers (the header is damaged)")
        found[keys[0]] = values
    identity = [float(i == j) for i in range(dimensions) for j in range(dimensions)]
    check_geometry(path, found["ElementSpacing"] or [1.0] * dimensions, found["Offset"] or [0.0] * dimensions,
                   found["TransformMatrix"] or identity)
    absent = [key for key, values in found.items() if values is None]
    if absent:
        defaults = {"ElementSpacing": "1 mm voxels", "Offset": "origin 0", "TransformMatrix": "identity directions"}
        warn_input(path, f"has no {', '.join(absent)}: read with {', '.join(defaults[k] for k in absent)} "
                         "(MetaImage's defaults; check that this is where the patient was)")


def _check_data(path: Path, fields: dict[str, str], data_offset: int, declared: int) -> None:
    """The stored voxels, inline (LOCAL) or in one data file beside the header, must be the declared bytes."""
    name = fields["ElementDataFile"]
    if name == "LOCAL":
        data_file, start = path, data_offset
    else:
        target = data_file_beside(path, name, "ElementDataFile =")
        header_size = _integer(path, fields, "HeaderSize", -1, 1 << 40) if "HeaderSize" in fields else 0
        size = target.stat().st_size
        if header_size == -1:  # MetaIO: the data are the last bytes of the file
            if size < declared and fields.get("CompressedData", "False").lower() != "true":
                check_data_bytes(path, size, declared, f"in {name}")
            return
        data_file, start = target, header_size
    if fields.get("CompressedData", "False").lower() == "true":
        with data_file.open("rb") as stream:
            stream.seek(start)
            try:
                available = decoded_length(stream, "zlib", declared)
            except ValueError as error:
                raise InputError(path, f"could not be read: {error}") from None
    else:
        available = max(data_file.stat().st_size - start, 0)
    check_data_bytes(path, available, declared, "" if data_file == path else f"in {name}")
