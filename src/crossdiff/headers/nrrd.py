"""NRRD (.nrrd, .nhdr) headers, checked before ITK's NrrdIO reads the file.

NrrdIO crashes the process when a header claims 'encoding: ascii' over binary data, allocates whatever
'sizes' declares and follows 'data file' anywhere. So the header is parsed here (the NRRD0001-5 format:
'field: value' lines up to a blank line) and checked: dimension, type, sizes against the voxel limit,
encoding and endianness, the voxel size and orientation ITK will build, and the stored data against the
declared size (inflated in constant memory when compressed, scanned for text encodings).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import BinaryIO

from crossdiff.errors import InputError, warn_input
from crossdiff.file_checks import (
    CHUNK,
    check_data_bytes,
    check_dimensions,
    check_geometry,
    data_file_beside,
    decoded_length,
    header_integer,
    parse_numbers,
    require_regular_file,
)

TYPE_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                     "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}
ENCODINGS = {"raw": "raw", "txt": "text", "text": "text", "ascii": "text", "hex": "hex", "gz": "gzip",
             "gzip": "gzip", "bz2": "bzip2", "bzip2": "bzip2"}
ALIASES = {"datafile": "data file", "lineskip": "line skip", "byteskip": "byte skip"}
MAX_HEADER_BYTES = 1 << 20
MAX_DIMENSIONS = 4
VECTOR = re.compile(r"\(([^()]*)\)|none")
VECTORS = re.compile(r"\s*(?:(?:\([^()]*\)|none)\s*)+")


def check_nrrd(path: Path) -> None:
    """Refuse a NRRD file whose header or data cannot give a correct image (InputError naming it)."""
    fields, data_offset = read_header(path)
    dimension = _whole(path, fields, "dimension", 1, MAX_DIMENSIONS)
    sizes = parse_numbers(fields["sizes"], dimension, int)
    if sizes is None:
        raise InputError(path, f"sizes: {fields['sizes']!r} must give {dimension} whole numbers (dimension)")
    voxels = check_dimensions(path, [int(s) for s in sizes])
    kind = fields["type"].lower()
    if kind not in TYPE_BYTES:
        raise InputError(path, f"type: {fields['type']!r} is not a voxel type crossdiff reads")
    encoding = ENCODINGS.get(fields["encoding"].lower())
    if encoding is None:
        raise InputError(path, f"encoding: {fields['encoding']!r} is not one of {', '.join(ENCODINGS)}")
    if TYPE_BYTES[kind] > 1 and encoding in ("raw", "gzip", "bzip2") and fields.get("endian") not in ("little", "big"):
        raise InputError(path, f"endian: must be 'little' or 'big' for {kind} voxels, not {fields.get('endian')!r}")
    _check_geometry_fields(path, fields, dimension)
    data_file, start = _data_location(path, fields, data_offset)
    declared = voxels * TYPE_BYTES[kind]
    _check_data(path, data_file, start, encoding, declared, voxels)


def read_header(path: Path) -> tuple[dict[str, str], int]:
    """Fields (lower-case names) up to the blank line that ends the header, and where the data start."""
    require_regular_file(path)
    fields: dict[str, str] = {}
    with path.open("rb") as handle:
        magic = handle.readline(64)
        if not re.fullmatch(rb"NRRD000[1-5]\r?\n", magic):
            raise InputError(path, "could not be read: not a NRRD file (it does not start with NRRD0001-NRRD0005)")
        offset = len(magic)
        while (raw := handle.readline(4096)) and raw.strip():
            offset += len(raw)
            if offset > MAX_HEADER_BYTES:
                raise InputError(path, "could not be read: the NRRD header does not end within 1 MB")
            line = raw.decode("latin-1").rstrip("\r\n")
            if line.startswith("#") or _is_key_value(line):
                continue  # comments and 'key:=value' pairs carry no image information
            name, sep, value = line.partition(": ")
            if not sep:
                raise InputError(path, f"could not be read: the NRRD header line {line[:60]!r} is not 'field: value'")
            name = ALIASES.get(name.strip().lower(), name.strip().lower())
            if name in fields:
                raise InputError(path, f"could not be read: the NRRD header gives '{name}' twice")
            fields[name] = value.strip()
        offset += len(raw)
    missing = [key for key in ("type", "dimension", "sizes", "encoding") if key not in fields]
    if missing:
        raise InputError(path, f"could not be read: the NRRD header lacks {', '.join(missing)}")
    return fields, offset


def _is_key_value(line: str) -> bool:
    field, key_value = line.find(": "), line.find(":=")
    return key_value >= 0 and (field < 0 or key_value < field)


def _whole(path: Path, fields: dict[str, str], key: str, low: int, high: int) -> int:
    return header_integer(path, f"{key}:", fields[key], low, high)


def _check_geometry_fields(path: Path, fields: dict[str, str], dimension: int) -> None:
    """The voxel size, origin and directions ITK builds from 'space directions' (or 'spacings') and 'space origin'."""
    if "space directions" in fields:
        spacing, direction = _space_directions(path, fields["space directions"], dimension)
    elif "spacings" in fields:
        values = parse_numbers(fields["spacings"].lower().replace("nan", "0"), dimension)
        if values is None:
            raise InputError(path, f"spacings: {fields['spacings']!r} must give {dimension} numbers")
        spacing = [v for v in values if v != 0] or [1.0]
        direction = [float(i == j) for i in range(len(spacing)) for j in range(len(spacing))]
    else:
        spacing, direction = [1.0], [1.0]
    origin = [0.0] * len(spacing)
    if "space origin" in fields:
        parsed = VECTOR.fullmatch(fields["space origin"].strip())
        values = parse_numbers(parsed.group(1).replace(",", " "), None) if parsed and parsed.group(1) else None
        if values is None:
            raise InputError(path, f"space origin: {fields['space origin']!r} must be a vector of numbers")
        origin = values
    check_geometry(path, spacing, origin, direction)
    absent = [name for name, there in (("voxel size", "space directions" in fields or "spacings" in fields),
                                       ("origin", "space origin" in fields)) if not there]
    if absent:
        warn_input(path, f"gives no {' and no '.join(absent)}: read with "
                         f"{', '.join({'voxel size': '1 mm voxels', 'origin': 'origin 0'}[a] for a in absent)} "
                         "(NRRD's defaults; check that this is where the patient was)")


def _space_directions(path: Path, text: str, dimension: int) -> tuple[list[float], list[float]]:
    """Voxel sizes (vector lengths) and unit directions of the spatial axes; 'none' marks a non-spatial one."""
    if not VECTORS.fullmatch(text):
        raise InputError(path, f"space directions: {text!r} must list one '(x,y,z)' vector or 'none' per axis")
    items = [match.group(1) for match in VECTOR.finditer(text)]
    vectors = [parse_numbers(item.replace(",", " "), None) for item in items if item is not None]
    if len(items) != dimension or not vectors or any(v is None or len(v) != len(vectors) for v in vectors):
        raise InputError(path, f"space directions: {text!r} must give {dimension} vectors (or none), one number per "
                               "spatial axis each")
    spacing = [math.sqrt(sum(x * x for x in v)) for v in vectors]  # type: ignore[union-attr]
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(path, f"space directions: {text!r} holds a zero or non-finite vector")
    return spacing, [x / s for v, s in zip(vectors, spacing) for x in v]  # type: ignore[union-attr]


def _data_location(path: Path, fields: dict[str, str], data_offset: int) -> tuple[Path, int]:
    """The file holding the voxels and where they start: after the header, or a 'data file' beside it."""
    for key in ("line skip", "byte skip"):
        if fields.get(key, "0").strip() != "0":
            raise InputError(path, f"{key}: {fields[key]!r} is not supported by crossdiff; save the image without it")
    name = fields.get("data file")
    if name is None:
        if path.name.lower().endswith(".nhdr"):
            raise InputError(path, "is a detached NRRD header without 'data file:'")
        return path, data_offset
    return data_file_beside(path, name, "data file:"), 0


def _check_data(path: Path, data_file: Path, start: int, encoding: str, declared: int, voxels: int) -> None:
    where = "" if data_file == path else f"in {data_file.name}"
    with data_file.open("rb") as stream:
        stream.seek(start)
        try:
            if encoding == "raw":
                available = max(data_file.stat().st_size - start, 0)
            elif encoding in ("gzip", "bzip2"):
                available = decoded_length(stream, encoding, declared)
            else:
                units = _count_text(stream, encoding, 2 * declared if encoding == "hex" else voxels)
                expected = 2 * declared if encoding == "hex" else voxels
                if units != expected:
                    what = "hex digits" if encoding == "hex" else "values"
                    raise InputError(path, f"could not be read: its {encoding} data {where} hold {units:,} {what}, "
                                           f"its header declares {expected:,}")
                return
        except ValueError as error:
            raise InputError(path, f"could not be read: {error}") from None
    check_data_bytes(path, available, declared, where)


def _count_text(stream: BinaryIO, encoding: str, limit: int) -> int:
    """Values of 'text' data (hex digits of 'hex' data), read in chunks; any other byte means the data are
    not text (NrrdIO crashes on those)."""
    allowed = b"0123456789abcdefABCDEF \t\r\n" if encoding == "hex" else b"0123456789+-.eEinfaINFA \t\r\n,"
    count, carry = 0, b""
    while count <= limit and (chunk := stream.read(CHUNK)):
        if chunk.translate(None, allowed):
            raise ValueError(f"the header declares {encoding} encoding, but the data are not {encoding} (binary bytes)")
        if encoding == "hex":
            count += len(chunk.translate(None, b" \t\r\n"))
            continue
        tokens = (carry + chunk).replace(b",", b" ").split()
        carry = tokens.pop() if tokens and not chunk[-1:].isspace() else b""
        count += len(tokens)
    return count + (1 if carry else 0)
