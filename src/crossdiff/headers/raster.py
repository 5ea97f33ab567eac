"""PNG and JPEG slices, checked before libpng or libjpeg (through ITK) decode them.

Both libraries allocate the size a header declares before they find out that the data are missing
(a 60-byte PNG can declare 65535 x 65535 pixels), and libjpeg fills a truncated file with grey without
failing. So the PNG chunk structure (lengths, CRCs, IHDR, the inflated IDAT size) and the JPEG frame
header and end marker are checked here first.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from pathlib import Path

from crossdiff.errors import InputError
from crossdiff.file_checks import check_dimensions, decoded_length, require_regular_file

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
MAX_FILE_BYTES = 1 << 30


def check_raster(path: Path) -> None:
    """Refuse a PNG or JPEG file that its decoder would misread, pad or over-allocate for."""
    size = require_regular_file(path)
    if size > MAX_FILE_BYTES:
        raise InputError(path, f"is {size:,} bytes, too large for a 2-D slice")
    data = path.read_bytes()
    if data.startswith(PNG_SIGNATURE):
        _check_png(path, data)
    elif data.startswith(b"\xff\xd8"):
        _check_jpeg(path, data)
    else:
        raise InputError(path, "could not be read as an image: it is neither PNG nor JPEG")


def _check_png(path: Path, data: bytes) -> None:
    position, header, compressed = len(PNG_SIGNATURE), None, []
    ended = False
    while position + 12 <= len(data) and not ended:
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        if length > len(data) - position - 12:
            raise InputError(path, f"could not be read: PNG chunk {kind!r} runs past the end of the file (truncated)")
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        if zlib.crc32(kind + body) != crc:
            raise InputError(path, f"could not be read: PNG chunk {kind!r} is corrupt (checksum mismatch)")
        if header is None and kind != b"IHDR":
            raise InputError(path, "could not be read: the PNG does not start with its IHDR chunk")
        if kind == b"IHDR":
            header = _png_header(path, body)
        elif kind == b"IDAT":
            compressed.append(body)
        ended = kind == b"IEND"
        position += 12 + length
    if not ended or header is None:
        raise InputError(path, "could not be read: the PNG ends before its IEND chunk (truncated)")
    expected = _png_data_bytes(*header)
    try:
        inflated = decoded_length(io.BytesIO(b"".join(compressed)), "zlib", expected)
    except ValueError as error:
        raise InputError(path, f"could not be read: the PNG image data are damaged ({error})") from None
    if inflated != expected:
        raise InputError(path, f"could not be read: the PNG image data hold {inflated:,} bytes, its header declares "
                               f"{expected:,} (truncated or damaged)")


def _png_header(path: Path, body: bytes) -> tuple[int, int, int, int, int]:
    if len(body) != 13:
        raise InputError(path, "could not be read: the PNG's IHDR chunk is damaged")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
    if colour not in PNG_CHANNELS or depth not in PNG_DEPTHS[colour] or interlace > 1:
        raise InputError(path, f"could not be read: the PNG header is damaged (bit depth {depth}, colour type {colour})")
    check_dimensions(path, [width, height])
    return width, height, depth, PNG_CHANNELS[colour], interlace


def _png_data_bytes(width: int, height: int, depth: int, channels: int, interlace: int) -> int:
    """Inflated size of the filtered scanlines: one filter byte per row, in each Adam7 pass when interlaced."""
    def rows(w: int, h: int) -> int:
        return 0 if w == 0 or h == 0 else h * (1 + math.ceil(w * channels * depth / 8))

    if not interlace:
        return rows(width, height)
    return sum(rows(max(0, math.ceil((width - x) / dx)), max(0, math.ceil((height - y) / dy)))
               for x, y, dx, dy in ADAM7)


def _check_jpeg(path: Path, data: bytes) -> None:
    """The frame header's size within the limit, and the end-of-image marker present (libjpeg pads a
    truncated file with grey instead of failing)."""
    position = 2
    size = None
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise InputError(path, "could not be read: the JPEG header is damaged")
        marker = data[position + 1]
        if marker == 0xDA:  # start of scan: entropy-coded data follow
            break
        (length,) = struct.unpack(">H", data[position + 2 : position + 4])
        if marker in JPEG_FRAMES and position + 9 <= len(data):
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            size = (width, height)
        position += 2 + length
    if size is None:
        raise InputError(path, "could not be read: the JPEG has no frame header (truncated or damaged)")
    check_dimensions(path, list(size))
    if not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise InputError(path, "could not be read: the JPEG ends before its end-of-image marker (truncated)")
