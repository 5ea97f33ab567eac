"""Mutators: from one seed and a seeded random generator, one broken or hostile input.

Byte-level mutations (bit flips, interesting bytes, truncation, deleted, repeated or inserted blocks)
apply to every format, inside the compression of compressed ones so they reach the header. Structure-
aware ones know each format: NIfTI header fields, MetaImage/NRRD header lines and data-file references,
PNG chunks with valid checksums, DICOM tags (pydicom) and series folders, JSON/YAML trees (types,
sizes, depth, alias bombs, Python tags), safetensors headers, training state and `--option` text.
A mutant is `expect`ed to be refused ('refuse') when it carries a value no correct image has
(pixel spacing 0, a CT slice without its rescale); otherwise anything clean is fine ('any').
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .corpus import Seed

INTERESTING_BYTES = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0x20, 0x0A, 0x2D)
HOSTILE_INTS = (0, -1, 1, 2, 7, 255, 32767, -32768, 65535, 2**31 - 1, -(2**31))
HOSTILE_FLOATS = (0.0, -1.0, math.nan, math.inf, -math.inf, 1e30, -1e30, 1e-30, 1e10)
HOSTILE_TOKENS = ("0", "-1", "nan", "inf", "1e30", "-1e30", "abc", "", "99999999999", "1 2", "x" * 300, "\x00", "1e-30",
                  "0 0 0", "-5 -5 -5", "3.5", "2147483648")
HOSTILE_IDS = ("../../..", "../escape", "/etc", "a/b", ".", "..", "", "x" * 300, "a\x00b", "line\nbreak", ".hidden",
               "C:\\evil", "~")
DATA_FILE_TARGETS = ("/dev/zero", "/dev/urandom", "FIFO", "../../../../etc/passwd", "missing.raw", ".", "SELF", "LIST",
                     "img%03d.raw 0 2 1", "SUBFOLDER", "/proc/self/mem")


@dataclass(frozen=True)
class Mutant:
    path: Path
    description: str
    expect: str = "any"  # 'refuse': a value no correct image has; accepting it without a warning is a failure


Mutator = Callable[[Seed, random.Random, Path], Mutant]


def mutate(seed: Seed, rng: random.Random, folder: Path, sentinel: Path) -> Mutant:
    """One mutant of `seed` written into the empty `folder`."""
    choices = MUTATORS[seed.format]
    if seed.format == "array" and seed.path.suffix != ".npy":
        choices = [(_bytes_of_file, 1.0)]  # the header mutator knows .npy only
    mutator = rng.choices([m for m, _ in choices], weights=[w for _, w in choices])[0]
    if mutator in PAYLOADS:  # these plant the command that would touch `sentinel` if it ever ran
        return mutator(seed, rng, folder, sentinel)  # type: ignore[call-arg]
    return mutator(seed, rng, folder)


# ---------------------------------------------------------------------------------------- bytes


def mutate_bytes(data: bytes, rng: random.Random, region: int | None = None) -> tuple[bytes, str]:
    """One byte-level change; with `region`, positions favour the first `region` bytes (the header)."""
    if not data:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))), "random bytes for an empty file"
    data = bytearray(data)
    limit = min(len(data), region) if region and rng.random() < 0.7 else len(data)
    at = rng.randrange(limit)
    kind = rng.choice(("flip", "interesting", "truncate", "delete", "repeat", "insert", "zero", "append", "int32"))
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            position = rng.randrange(limit)
            data[position] ^= 1 << rng.randrange(8)
        return bytes(data), f"flipped bits near byte {at}"
    if kind == "interesting":
        data[at] = rng.choice(INTERESTING_BYTES)
        return bytes(data), f"byte {at} set to {data[at]:#04x}"
    if kind == "truncate":
        cut = rng.randrange(len(data))
        return bytes(data[:cut]), f"truncated to {cut} of {len(data)} bytes"
    if kind == "delete":
        size = rng.randint(1, 256)
        del data[at : at + size]
        return bytes(data), f"deleted {size} bytes at {at}"
    if kind == "repeat":
        size = rng.randint(1, 512)
        data[at:at] = data[at : at + size]
        return bytes(data), f"repeated {size} bytes at {at}"
    if kind == "insert":
        size = rng.randint(1, 64)
        data[at:at] = bytes(rng.randrange(256) for _ in range(size))
        return bytes(data), f"inserted {size} random bytes at {at}"
    if kind == "zero":
        size = rng.randint(1, 4096)
        data[at : at + size] = bytes(len(data[at : at + size]))
        return bytes(data), f"zeroed {size} bytes at {at}"
    if kind == "int32":
        value = rng.choice(HOSTILE_INTS)
        data[at : at + 4] = struct.pack("<i", value)[: len(data) - at]
        return bytes(data), f"int32 {value} written at {at}"
    extra = bytes(rng.randrange(256) for _ in range(rng.randint(1, 2048)))
    return bytes(data) + extra, f"appended {len(extra)} random bytes"


def _bytes_of_file(seed: Seed, rng: random.Random, folder: Path, region: int = 2048) -> Mutant:
    """Byte mutation of a single file (inside its gzip layer, mostly, for .gz); a MetaImage or NRRD
    header keeps the other files of its folder (its data file)."""
    target = _copy_folder(seed, folder) if seed.format in ("metaimage", "nrrd") else folder / seed.path.name
    data = seed.path.read_bytes()
    target.unlink(missing_ok=True)
    if seed.path.name.endswith(".gz") and rng.random() < 0.8:
        changed, what = mutate_bytes(gzip.decompress(data), rng, region)
        target.write_bytes(gzip.compress(changed, compresslevel=1))
        return Mutant(target, f"inside gzip: {what}")
    changed, what = mutate_bytes(data, rng, region)
    target.write_bytes(changed)
    return Mutant(target, what)


# ---------------------------------------------------------------------------------------- NIfTI

# (name, offset, struct format, count): the NIfTI-1 header fields ITK reads
NIFTI_FIELDS = (("sizeof_hdr", 0, "i", 1), ("dim", 40, "h", 8), ("datatype", 70, "h", 1), ("bitpix", 72, "h", 1),
                ("pixdim", 76, "f", 8), ("vox_offset", 108, "f", 1), ("scl_slope", 112, "f", 1),
                ("scl_inter", 116, "f", 1), ("qform_code", 252, "h", 1), ("sform_code", 254, "h", 1),
                ("quatern", 256, "f", 3), ("qoffset", 268, "f", 3), ("srow", 280, "f", 12), ("magic", 344, "4s", 1))


def _nifti_field(seed: Seed, rng: random.Random, folder: Path) -> Mutant:
    raw = seed.path.read_bytes()
    compressed = seed.path.name.endswith(".gz")
    data = bytearray(gzip.decompress(raw) if compressed else raw)
    name, offset, kind, count = rng.choice(NIFTI_FIELDS)
    index = rng.randrange(count)
    at = offset + index * struct.calcsize(kind)
    dims = struct.unpack_from("<8h", data, 40)
    expect = "any"
    if kind == "4s":
        value: Any = rng.choice((b"ni1\0", b"n+2\0", b"\0\0\0\0", b"n+1x"))
    elif kind == "f":
        value = rng.choice(HOSTILE_FLOATS)
        old = struct.unpack_from("<f", data, at)[0]
        if name == "pixdim" and 1 <= index <= 3 and dims[index] > 1 and not (0 < value < 1e4) and value != old:
            expect = "refuse"
    else:
        value = rng.choice(HOSTILE_INTS)
    struct.pack_into("<" + kind, data, at, value if kind != "h" else max(-32768, min(32767, value)))
    target = folder / seed.path.name
    target.write_bytes(gzip.compress(bytes(data), compresslevel=1) if compressed else bytes(data))
    return Mutant(target, f"NIfTI {name}[{index}] = {value!r}", expect)


# ---------------------------------------------------------------------------------- MetaImage, NRRD


def _copy_folder(seed: Seed, folder: Path) -> Path:
    """The seed's folder (detached formats) as hard links, so only the mutated file is a new one."""
    shutil.copytree(seed.path.parent, folder / "case", copy_function=os.link)
    return folder / "case" / seed.path.name


def _split_header(data: bytes, fmt: str) -> tuple[list[bytes], bytes]:
    """Header lines and the bytes after them (inline data)."""
    if fmt == "metaimage":
        end = data.find(b"ElementDataFile")
        end = data.find(b"\n", end) + 1 if end >= 0 else len(data)
    else:
        end = data.find(b"\n\n")
        end = end + 2 if end >= 0 else len(data)
    return data[:end].splitlines(keepends=True), data[end:]


def _header_line(seed: Seed, rng: random.Random, folder: Path) -> Mutant:
    target = _copy_folder(seed, folder)
    data = target.read_bytes()
    target.unlink()
    lines, rest = _split_header(data, seed.format)
    separator = b" = " if seed.format == "metaimage" else b": "
    fields = [i for i, line in enumerate(lines) if separator.strip() in line and not line.startswith(b"#")]
    index = rng.choice(fields) if fields else 0
    key = lines[index].split(separator.strip(), 1)[0].strip() if fields else b""
    action = rng.choice(("value", "value", "value", "delete", "duplicate", "garbage", "extra-number", "data-file",
                         "encoding"))
    expect = "any"
    if action == "value":
        token = rng.choice(HOSTILE_TOKENS)
        lines[index] = key + separator + token.encode("latin-1", "replace") + b"\n"
        what = f"{key.decode()} set to {token[:20]!r}"
        if key.decode().lower() in ("elementspacing", "spacings") and token in ("0", "-1", "nan", "inf", "1e30", "-1e30",
                                                                                 "0 0 0", "-5 -5 -5", "1e-30"):
            expect = "refuse"
    elif action == "delete" and fields:
        del lines[index]
        what = f"line {key.decode()} deleted"
    elif action == "duplicate":
        lines.insert(index, lines[index])
        what = f"line {key.decode()} duplicated"
    elif action == "extra-number":
        lines[index] = lines[index].rstrip(b"\r\n") + rng.choice((b" 7", b" -1", b" nan", b",")) + b"\n"
        what = f"{key.decode()} given one more value"
    elif action == "data-file":
        what = _point_data_file(lines, seed.format, rng, target)
    elif action == "encoding" and seed.format == "nrrd":
        encoding = rng.choice(("ascii", "text", "hex", "gzip", "bzip2", "raw", "bogus", "zrl"))
        lines = [b"encoding: " + encoding.encode() + b"\n" if line.startswith(b"encoding:") else line for line in lines]
        what = f"encoding: {encoding}"
    elif action == "encoding":
        flag = rng.choice((b"True", b"False", b"maybe"))
        lines = [b"CompressedData = " + flag + b"\n" if line.startswith(b"CompressedData") else line for line in lines]
        what = f"CompressedData = {flag.decode()}"
    else:
        lines.insert(index, bytes(rng.randrange(32, 127) for _ in range(rng.randint(1, 80))) + b"\n")
        what = "a garbage header line inserted"
    if rng.random() < 0.2:
        rest, extra = mutate_bytes(rest, rng)
        what += f"; data: {extra}"
    target.write_bytes(b"".join(lines) + rest)
    return Mutant(target, f"{seed.format} header: {what}", expect)


def _point_data_file(lines: list[bytes], fmt: str, rng: random.Random, target: Path) -> str:
    """ElementDataFile / data file aimed at a device, a FIFO, a file outside the folder, a pattern..."""
    choice = rng.choice(DATA_FILE_TARGETS)
    name = choice
    if choice == "FIFO":
        name = "data.fifo"
        os.mkfifo(target.parent / name)
    elif choice == "SELF":
        name = target.name
    elif choice == "SUBFOLDER":
        name = "sub"
        (target.parent / name).mkdir()
    key = b"ElementDataFile = " if fmt == "metaimage" else b"data file: "
    kept = [line for line in lines if not line.startswith(key.strip(b" =:")) and not line.lower().startswith(b"datafile")]
    if fmt == "metaimage":
        kept.append(key + name.encode() + b"\n")
        lines[:] = kept
    else:
        blank = kept.pop() if kept and not kept[-1].strip() else b"\n"
        lines[:] = [*kept, key + name.encode() + b"\n", blank]
    return f"data file -> {choice}"


def _raw_data(seed: Seed, rng: random.Random, folder: Path) -> Mutant:
    """The detached data file of a MetaImage/NRRD: truncated, extended or damaged (the header itself
    for inline data)."""
    header = _copy_folder(seed, folder)
    target = rng.choice([p for p in header.parent.iterdir() if p.is_file()])
    data = target.read_bytes()
    target.unlink()
    changed, what = mutate_bytes(data, rng)
    target.write_bytes(changed)
    return Mutant(header, f"{seed.format} data file {target.name}: {what}")


# --------------------------------------------------------------------------------------- arrays


def _npy_header(seed: Seed, rng: random.Random, folder: Path) -> Mutant:
    """An .npy whose header dictionary declares another shape, type or order (the data left as they are)."""
    target = folder / seed.path.name
    data = seed.path.read_bytes()
    end = data.index(b"}") + 1
    header = data[:end]
    field = rng.choice(("shape", "descr", "fortran_order"))
    value = {"shape": rng.choice((b"(9999, 9999, 99)", b"(0,)", b"(-5, 3, 2)", b"(48, 27)", b"(1, 1, 1)", b"()")),
             "descr": rng.choice((b"'|O'", b"'<f8'", b"'>i2'", b"'<U4'", b"'bogus'")),
             "fortran_order": rng.choice((b"True", b"1", b"'yes'"))}[field]
    start = header.index(f"'{field}':".encode()) + len(field) + 3
    stop = header.index(b"), " if field == "shape" else b", ", start) + (1 if field == "shape" else 0)
    header = header[:start] + b" " + value + header[stop:]
    target.write_bytes(header + data[end:])
    return Mutant(target, f"npy header {field} = {value.decode()}")


# ------------------------------------------------------------------------------------------ PNG


def _png_chunk(seed: Seed, rng: random.Random, folder: Path) -> Mutant:
    """A PNG with one chunk changed and its CRC recomputed, so the change reaches libpng."""
    data = seed.path.read_bytes()
    chunks, position = [], 8
    while position + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        chunks.append([kind, data[position + 8 : position + 8 + length]])
        position += 12 + length
    action = rng.choice(("ihdr", "ihdr", "drop-iend", "cut-idat", "bomb", "bogus-chunk", "double-ihdr"))
    if action == "ihdr":
        width, height, depth, colour, compression, filtering, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
        field = rng.choice(("width", "height", "depth", "colour", "interlace", "compression"))
        value = rng.choice({"width": (0, 1, 65535, 2**31 - 1, width * 2), "height": (0, 1, 65535, 2**31 - 1, height + 1),
                            "depth": (0, 3, 5, 16, 255), "colour": (1, 5, 7, 255), "interlace": (1, 2),
                            "compression": (1, 255)}[field])
        values = dict(width=width, height=height, depth=depth, colour=colour, interlace=interlace, compression=compression)
        values[field] = value
        chunks[0][1] = struct.pack(">IIBBBBB", values["width"], values["height"], values["depth"], values["colour"],
                                   values["compression"], filtering, values["interlace"])
        what = f"IHDR {field} = {value}"
    elif action == "drop-iend":
        chunks = [c for c in chunks if c[0] != b"IEND"]
        what = "IEND removed"
    elif action == "cut-idat":
        idat = next(c for c in chunks if c[0] == b"IDAT")
        idat[1] = idat[1][: rng.randrange(len(idat[1]) + 1)]
        what = "IDAT cut short (CRC valid)"
    elif action == "bomb":
        chunks[0][1] = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
        chunks = [chunks[0], [b"IDAT", zlib.compress(bytes(30001 * 200), 9)], [b"IEND", b""]]
        what = "30000 x 30000 declared over a 200-row stream (decompression bomb)"
    elif action == "bogus-chunk":
        chunks.insert(1, [bytes(rng.choice(b"abcdefgIHDRT") for _ in range(4)), os.urandom(rng.randint(0, 64))])
        what = "unknown chunk inserted"
    else:
        chunks.insert(1, list(chunks[0]))
        what = "IHDR twice"
    target = folder / seed.path.name
    target.write_bytes(data[:8] + b"".join(struct.pack(">I", len(body)) + kind + body
                                           + struct.pack(">I", zlib.crc32(kind + body)) for kind, body in chunks))
    return Mutant(target, f"PNG {what}")


# ---------------------------------------------------------------------------------------- DICOM

PLANE_HOSTILE = {
    "PixelSpacing": ("0\\0", "-1\\-1", "nan\\nan", "abc\\def", "1e30\\1e30", "1", "", "0.5\\0"),
    "ImagePositionPatient": ("nan\\0\\0", "1e30\\0\\0", "a\\b\\c", "1\\2", "inf\\inf\\inf", ""),
    "ImageOrientationPatient": ("0\\0\\0\\0\\0\\0", "1\\0\\0\\1\\0\\0", "nan\\0\\0\\0\\1\\0", "2\\0\\0\\0\\2\\0", "1\\0\\0"),
}
OTHER_HOSTILE = {
    "Rows": (0, 1, 65535, "DOUBLE"), "Columns": (0, 1, 65535, "DOUBLE"), "BitsAllocated": (0, 1, 7, 12, 32, 64, 255),
    "BitsStored": (0, 17, 255), "HighBit": (0, 31, 255), "PixelRepresentation": (2, 255),
    "SamplesPerPixel": (0, 2, 3, 4), "NumberOfFrames": ("0", "-1", "999999999", "abc", "2"),
    "PhotometricInterpretation": ("RGB", "MONOCHROME1", "PALETTE COLOR", "BOGUS", ""),
    "RescaleSlope": ("0", "nan", "1e30", "abc", "-1"), "RescaleIntercept": ("nan", "1e30", "abc", "-1e30"),
    "SliceThickness": ("0", "-5", "nan", "1e30"), "Modality": ("CT", "MR", "PT", "XX", ""),
    "SpacingBetweenSlices": ("0", "-3", "nan", "1e30"), "InstanceNumber": ("abc", "-1", "99999999999"),
}
SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1.99",
            "1.2.3.4")
FAMILIES = ("CT", "MR", "PT")


def _dicom_tag(path: Path, rng: random.Random, target: Path) -> str | tuple[str, str]:
    """Remove or set one tag of `path` with pydicom, writing `target`; returns the description (and 'refuse'
    for values no correct image has)."""
    import pydicom
    from pydicom import config

    config.settings.writing_validation_mode = config.IGNORE
    config.settings.reading_validation_mode = config.IGNORE
    ds = pydicom.dcmread(path, force=True)
    family = str(ds.get("Modality", "")).upper() in FAMILIES
    action = rng.choice(("plane", "plane", "other", "other", "remove-rescale", "syntax", "pixels", "remove"))
    expect = "any"
    if action == "plane":
        keyword = rng.choice(tuple(PLANE_HOSTILE))
        value = rng.choice(PLANE_HOSTILE[keyword] + ("REMOVE",))
        if value == "REMOVE":
            if keyword in ds:
                del ds[keyword]
        else:
            ds[keyword] = _raw_element(ds, keyword, value)
        what = f"{keyword} = {value!r}"
        expect = "refuse" if family else "any"
    elif action == "other":
        keyword = rng.choice(tuple(OTHER_HOSTILE))
        value = rng.choice(OTHER_HOSTILE[keyword])
        if value == "DOUBLE":
            value = int(ds.get(keyword, 1)) * 2
        ds[keyword] = _raw_element(ds, keyword, value)
        what = f"{keyword} = {value!r}"
        if keyword in ("Rows", "Columns") and value not in (ds.get(keyword),):
            expect = "refuse"
        if keyword in ("RescaleSlope", "RescaleIntercept") and value not in ("-1",):
            expect = "refuse"  # not finite, zero, not a number or beyond any physical scale
    elif action == "remove-rescale":
        keyword = rng.choice(("RescaleIntercept", "RescaleSlope"))
        if keyword in ds:
            del ds[keyword]
        what = f"{keyword} removed"
        expect = "refuse" if str(ds.get("Modality", "")).upper() in ("CT", "PT") else "any"
    elif action == "syntax":
        syntax = rng.choice(SYNTAXES)
        ds.file_meta.TransferSyntaxUID = syntax
        what = f"TransferSyntaxUID = {syntax}"
    elif action == "pixels" and "PixelData" in ds:
        pixels = ds.PixelData
        cut = rng.choice((0, len(pixels) // 2, len(pixels) - 2, len(pixels) + 64))
        ds.PixelData = (pixels + bytes(64))[:cut]
        what = f"PixelData {len(pixels)} -> {cut} bytes"
        expect = "refuse"
    else:
        keyword = rng.choice(("SeriesInstanceUID", "Rows", "BitsAllocated", "PixelData", "SOPClassUID",
                              "PhotometricInterpretation", "SamplesPerPixel", "Modality", "TransferSyntaxUID"))
        holder = ds.file_meta if keyword == "TransferSyntaxUID" else ds
        if keyword in holder:
            del holder[keyword]
        what = f"{keyword} removed"
    try:
        ds.save_as(target, enforce_file_format=False)
    except Exception:  # noqa: BLE001 - pydicom cannot write this mutant: fall back to bytes
        changed, raw_what = mutate_bytes(path.read_bytes(), rng, 4096)
        target.write_bytes(changed)
        return raw_what
    return (what, expect)


def _raw_element(ds: Any, keyword: str, value: Any) -> Any:
    """An element holding `value` as bytes, written as it is (pydicom would refuse 'abc' as a number)."""
    import pydicom

    tag = pydicom.datadict.tag_for_keyword(keyword)
    vr = pydicom.datadict.dictionary_VR(keyword)
    order = "<" if getattr(ds, "is_little_endian", True) is not False else ">"
    if vr in ("US", "SS"):
        raw = struct.pack(order + "H", int(value) % 65536)
    else:
        raw = str(value).encode("latin-1", "replace")
        raw += b" " * (len(raw) % 2)
    return pydicom.dataelem.RawDataElement(tag, vr, len(raw), raw, 0, getattr(ds, "is_implicit_VR", False),
                                           order == "<")


def _dicom_file(seed: Seed, rng: random.Random, folder: Path) -> Mutant:
    target = folder / seed.path.name
    if rng.random() < 0.35:
        changed, what = mutate_bytes(seed.path.read_bytes(), rng, 4096)
        target.write_bytes(changed)
        return Mutant(target, f"DICOM bytes: {what}")
    described = _dicom_tag(seed.path, rng, target)
    what, expect = described if isinstance(described, tuple) else (described, "any")
    return Mutant(target, f"DICOM {what}", expect)


def _dicom_series(seed: Seed, rng: random.Random, folder: Path) -> Mutant:
    """A copy of the series folder (hard links) with one slice changed, or one file added or removed."""
    series = folder / seed.path.name
    shutil.copytree(seed.path, series, copy_function=os.link)
    files = sorted(series.glob("*.dcm"))
    index = rng.choice((0, len(files) // 2, len(files) - 1, rng.randrange(len(files))))
    chosen = files[index]
    action = rng.choice(("tag", "tag", "tag", "tag", "bytes", "delete", "duplicate", "junk", "fifo", "folder",
                         "other-series", "shift"))
    expect = "any"
    if action in ("tag", "bytes"):
        source = seed.path / chosen.name
        chosen.unlink()
        if action == "bytes":
            changed, what = mutate_bytes(source.read_bytes(), rng, 4096)
            chosen.write_bytes(changed)
        else:
            described = _dicom_tag(source, rng, chosen)
            what, expect = described if isinstance(described, tuple) else (described, "any")
        what = f"slice {index} ({chosen.name}): {what}"
    elif action == "delete":
        chosen.unlink()
        what = f"slice {index} deleted"
        expect = "refuse" if 0 < index < len(files) - 1 else "any"
    elif action in ("duplicate", "other-series", "shift"):
        import pydicom

        ds = pydicom.dcmread(chosen)
        if action == "duplicate":
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            chosen = series / f"copy_{chosen.name}"
            what = f"slice {index} duplicated"
            expect = "refuse"
        elif action == "other-series":
            ds.SeriesInstanceUID = pydicom.uid.generate_uid()
            chosen.unlink()
            what = f"slice {index} given another SeriesInstanceUID"
        else:
            position = [float(v) for v in ds.ImagePositionPatient]
            shift = rng.choice((0.5, -1.1, 0.001, 10.0))
            position[2] += shift
            ds.ImagePositionPatient = position
            chosen.unlink()
            what = f"slice {index} moved {shift} mm along z"
            expect = "refuse" if abs(shift) > 0.01 else "any"
        ds.save_as(chosen, enforce_file_format=False)
    elif action == "junk":
        (series / "junk.dcm").write_bytes(os.urandom(rng.randint(0, 4096)))
        what = "a random-bytes junk.dcm added"
    elif action == "fifo":
        os.mkfifo(series / "waiting.dcm")
        what = "a FIFO named waiting.dcm added"
    else:
        (series / "sub").mkdir()
        shutil.copy(chosen, series / "sub" / chosen.name)
        what = "a subfolder with a copy of a slice added"
    return Mutant(series, f"DICOM series: {what}", expect)


# ------------------------------------------------------------------------------- JSON, YAML trees


HOSTILE_VALUES: tuple[Any, ...] = (None, True, False, 0, -1, 10**20, -(10**20), 1e308, math.inf, math.nan, "", "abc",
                                   "x" * 100_000, [], {}, [1, 2, 3], {"unknown": 1}, -0.5, 1e-300, "../../..", "1e12")


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every (key path) into a JSON/YAML tree."""
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


def _get(node: Any, path: tuple) -> Any:
    for part in path:
        node = node[part]
    return node


def mutate_tree(document: Any, rng: random.Random, ids: tuple[str, ...] = ()) -> tuple[Any, str]:
    """One structural change: a value replaced by a hostile one, a key removed, renamed or added, a value
    wrapped, a case id made hostile (`ids`: the keys that are ids, e.g. case ids)."""
    paths = [p for p in _paths(document) if p]
    if not paths:
        return rng.choice(HOSTILE_VALUES), "document replaced"
    path = rng.choice(paths)
    parent = _get(document, path[:-1])
    key = path[-1]
    action = rng.choice(("value", "value", "value", "delete", "rename", "add", "wrap", "deep"))
    where = "/".join(map(str, path))[:120]
    if action == "value":
        value = rng.choice(HOSTILE_VALUES)
        parent[key] = value
        return document, f"{where} = {repr(value)[:40]}"
    if action == "delete":
        del parent[key]
        return document, f"{where} deleted"
    if action == "rename" and isinstance(parent, dict):
        new = rng.choice(HOSTILE_IDS + ("unknown_key", key.upper() if isinstance(key, str) else "x"))
        parent[new] = parent.pop(key)
        return document, f"key {where} renamed to {new[:40]!r}"
    if action == "add" and isinstance(parent, dict):
        parent[rng.choice(("bogus", "extra", "__class__", "stage", "size", "steps"))] = rng.choice(HOSTILE_VALUES)
        return document, f"unknown key added beside {where}"
    if action == "deep":
        nested: Any = parent[key]
        for _ in range(rng.choice((50, 200))):  # deeper: the text-level 'nesting' damage
            nested = [nested]
        parent[key] = nested
        return document, f"{where} nested deeply"
    parent[key] = [parent[key]]
    return document, f"{where} wrapped in a list"


def _unsafe(name: str) -> str:
    """'refuse' for an id that cannot be one file name inside an output folder."""
    from crossdiff.file_checks import path_name_problem

    return "refuse" if path_name_problem(name) else "any"


def _json_document(seed: Seed, rng: random.Random, folder: Path) -> Mutant:
    target = folder / seed.path.name
    document = json.loads(seed.path.read_text())
    if rng.random() < 0.25 and isinstance(document.get("cases"), dict):
        cases = document["cases"]
        old = rng.choice(list(cases))
        new = rng.choice(HOSTILE_IDS)
        cases[new] = cases.pop(old)
        target.write_text(json.dumps(document))
        return Mutant(target, f"case id {old!r} -> {new[:40]!r}", _unsafe(new))
    if rng.random() < 0.2:
        return _text_damage(seed, rng, target, "json")
    document, what = mutate_tree(document, rng)
    target.write_text(json.dumps(document))
    return Mutant(target, f"JSON {what}")


def _csv_document(seed: Seed, rng: random.Random, folder: Path) -> Mutant:
    target = folder / seed.path.name
    rows = [line.split(",") for line in seed.path.read_text().splitlines()]
    action = rng.choice(("id", "cell", "cell", "column", "row", "text"))
    if action == "text":
        return _text_damage(seed, rng, target, "csv")
    row = rng.randrange(1, len(rows)) if len(rows) > 1 else 0
    column = rng.randrange(len(rows[row]))
    if action == "id":
        rows[row][0] = rng.choice(HOSTILE_IDS).replace(",", ";").replace("\n", " ")
        what, expect = f"case id of row {row} = {rows[row][0][:40]!r}", _unsafe(rows[row][0].strip())
    elif action == "cell":
        rows[row][column] = rng.choice(("", "x" * 300, "\x00", '"', "../../etc/passwd", "~nobody/x", "a" * 5000))
        what, expect = f"cell {row},{column} = {rows[row][column][:20]!r}", "any"
    elif action == "column":
        rows[0][column] = rng.choice(("", "case", "label:", "CT", "split", "x" * 200))
        what, expect = f"column {column} renamed {rows[0][column][:20]!r}", "any"
    else:
        rows.insert(row, rows[row][: rng.randrange(len(rows[row]) + 1)])
        what, expect = f"row {row} repeated, cut short", "any"
    target.write_text("\n".join(",".join(r) for r in rows) + "\n")
    return Mutant(target, f"CSV {what}", expect)


def _yaml_document(seed: Seed, rng: random.Random, folder: Path) -> Mutant:
    import yaml

    target = folder / seed.path.name
    if rng.random() < 0.2:
        return _text_damage(seed, rng, target, "yaml")
    document = yaml.safe_load(seed.path.read_text())
    if rng.random() < 0.3 and "methods" in document:
        entry = rng.choice(document["methods"])
        if isinstance(entry, dict):
            entry["name"] = rng.choice(HOSTILE_IDS)
            target.write_text(yaml.safe_dump(document))
            return Mutant(target, f"method name {entry['name'][:40]!r}", _unsafe(entry["name"]))
    document, what = mutate_tree(document, rng)
    target.write_text(yaml.safe_dump(document, allow_unicode=True))
    return Mutant(target, f"YAML {what}")


def _text_damage(seed: Seed, rng: random.Random, target: Path, kind: str) -> Mutant:
    """Damage at the level of text: encoding, nesting, truncation, duplicated keys, alias bombs."""
    text = seed.path.read_bytes()
    action = rng.choice(("utf8", "nesting", "truncate", "bom", "bytes", "duplicate", "bomb", "empty", "huge"))
    if action == "utf8":
        at = rng.randrange(len(text))
        text = text[:at] + rng.choice((b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\x00")) + text[at:]
    elif action == "nesting":
        depth = rng.choice((1000, 100_000))
        text = (b"[" * depth + b"1" + b"]" * depth) if kind == "json" else (b"a:\n" + b"- " * depth + b"1\n")
    elif action == "truncate":
        text = text[: rng.randrange(len(text))]
    elif action == "bom":
        text = b"\xef\xbb\xbf" + text
    elif action == "duplicate" and kind == "json":
        text = text.replace(b'"cases": {', b'"cases": {"x": {}, "x": {},', 1)
    elif action == "bomb" and kind == "yaml":
        levels = [b"a: &a [x, x, x, x, x, x, x, x, x]\n"]
        for i in range(9):  # 'billion laughs': each level nine aliases of the one before
            name, before = chr(98 + i).encode(), chr(97 + i).encode()
            levels.append(b"%s: &%s [" % (name, name) + b", ".join([b"*" + before] * 9) + b"]\n")
        text = b"".join(levels) + b"method: *j\n"
    elif action == "empty":
        text = rng.choice((b"", b"\n", b"null", b"[]", b"42", b"'just text'"))
    elif action == "huge":
        text = text + b" " * (17 << 20)
    else:
        text, _ = mutate_bytes(text, rng)
    target.write_bytes(text)
    return Mutant(target, f"{kind} text: {action}")


def _payload_yaml(seed: Seed, rng: random.Random, folder: Path, sentinel: Path) -> Mutant:
    """YAML tags that would run a command under an unsafe loader."""
    target = folder / seed.path.name
    tag = rng.choice((f'!!python/object/apply:os.system ["touch {sentinel}"]',
                      f'!!python/object/new:subprocess.check_output [["touch", "{sentinel}"]]',
                      "!!python/name:os.system", f'!!python/object/apply:builtins.exec ["open(\'{sentinel}\', \'w\')"]'))
    import yaml

    text = seed.path.read_text()
    first = next(iter(yaml.safe_load(text)))
    target.write_text(f"{text}\n{rng.choice((first, 'extra'))}: {tag}\n")  # a repeated key: the last one counts
    return Mutant(target, "YAML with a Python tag that runs a command", "refuse")


# ------------------------------------------------------------------------------ models and runs


def _safetensors(path: Path, rng: random.Random) -> tuple[bytes, str]:
    """A safetensors file with its JSON header changed (shapes, dtypes, offsets) or its length field."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    if rng.random() < 0.25:
        value = rng.choice((0, 7, 2**63 - 1, length * 1000, len(data)))
        return struct.pack("<Q", value) + data[8:], f"header length = {value}"
    keys = [k for k in header if k != "__metadata__"]
    key = rng.choice(keys)
    field = rng.choice(("shape", "dtype", "data_offsets"))
    value = {"shape": rng.choice(([10**6, 10**6], [], [-1], [0], [2**31, 2**31, 16], "abc")),
             "dtype": rng.choice(("F64", "I8", "BOOL", "F8_E4M3", "Q4", "")),
             "data_offsets": rng.choice(([0, 10**12], [10, 0], [-5, 3], [0], "x"))}[field]
    header[key][field] = value
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data[8 + length :], f"{key}.{field} = {value!r}"


def _checkpoint(seed: Seed, rng: random.Random, folder: Path) -> Mutant:
    import yaml

    target = folder / seed.path.name
    shutil.copytree(seed.path, target, copy_function=os.link)
    choice = rng.random()
    if choice < 0.55:
        config = target / "config.yaml"
        document = yaml.safe_load(config.read_text())
        config.unlink()
        if rng.random() < 0.4:
            key = rng.choice(("data.size", "method.config.channels", "method.config.timesteps", "slices.size",
                              "model.spacing", "data.source_channels", "method.config.batch", "method.config.steps",
                              "model.scalings.target.high"))
            value = rng.choice(([100000, 100000], [4096, 4096, 4096, 4096], 10**9, [1, 1], [0, 0, 0], 10**6, -3,
                                "abc", [64, 64], 1e30))
            node = document
            *parents, last = key.split(".")
            for part in parents:
                node = node[part]
            node[last] = value
            what = f"config {key} = {value!r}"
        else:
            document, what = mutate_tree(document, rng)
            what = f"config {what}"
        config.write_text(yaml.safe_dump(document))
    elif choice < 0.85:
        weights = target / "model.safetensors"
        weights.unlink()
        if rng.random() < 0.6:
            data, what = _safetensors(seed.path / "model.safetensors", rng)
        else:
            data, what = mutate_bytes((seed.path / "model.safetensors").read_bytes(), rng, 4096)
        weights.write_bytes(data)
        what = f"weights {what}"
    else:
        victim = rng.choice(("config.yaml", "model.safetensors", "training-record.json"))
        (target / victim).unlink()
        if rng.random() < 0.5:
            os.mkfifo(target / victim)
            what = f"{victim} replaced by a FIFO"
        else:
            what = f"{victim} removed"
    return Mutant(target, f"checkpoint {what}")


def _run(seed: Seed, rng: random.Random, folder: Path) -> Mutant:
    """A 2-step run to resume: its state.json, weights, config or `latest` link changed."""
    import yaml

    target = folder / seed.path.name
    shutil.copytree(seed.path, target, symlinks=True)  # copied: resuming writes into it
    checkpoint = (target / "checkpoints" / "latest").resolve()
    choice = rng.random()
    if choice < 0.5:
        state_file = checkpoint / "state.json"
        state = json.loads(state_file.read_text())
        if rng.random() < 0.4:
            key = rng.choice(("step", "world_size", "scaler", "validation", "optimizers", "rng"))
            state[key] = rng.choice((10**12, 1e12, -1, "5", None, 0, [], {}, {"python": [1, 2], "numpy": "x"}))
            what, expect = f"state {key} = {state[key]!r}", ("refuse" if key == "step" else "any")
        else:
            state, what = mutate_tree(state, rng)
            what, expect = f"state {what}", "any"
        state_file.write_text(json.dumps(state))
        return Mutant(target, what, expect)
    if choice < 0.7:
        name = rng.choice(("model.safetensors", "training.safetensors"))
        data, what = _safetensors(checkpoint / name, rng) if rng.random() < 0.6 else mutate_bytes(
            (checkpoint / name).read_bytes(), rng, 4096)
        (checkpoint / name).write_bytes(data)
        return Mutant(target, f"{name} {what}")
    if choice < 0.85:
        link = target / "checkpoints" / "latest"
        link.unlink()
        aim = rng.choice(("/etc", "..", "../..", "missing", "latest", checkpoint.name + "/..", "/proc/self"))
        link.symlink_to(aim)
        return Mutant(target, f"latest -> {aim}", "refuse")
    config_file = checkpoint / "config.yaml"
    document, what = mutate_tree(yaml.safe_load(config_file.read_text()), rng)
    config_file.write_text(yaml.safe_dump(document))
    return Mutant(target, f"checkpoint config {what}")


def _fid(seed: Seed, rng: random.Random, folder: Path) -> Mutant:
    target = folder / seed.path.name
    if seed.hostile or rng.random() < 0.2:
        name = rng.choice((seed.path.name, "weights.pt2", "weights.pth", "weights.safetensors", "weights.bin"))
        target = folder / name
        shutil.copy(seed.path, target)
        return Mutant(target, f"{seed.path.name} as {name}", "refuse" if seed.hostile else "any")
    if seed.path.suffix == ".safetensors" and rng.random() < 0.6:
        data, what = _safetensors(seed.path, rng)
    else:
        data, what = mutate_bytes(seed.path.read_bytes(), rng, 4096)
    target.write_bytes(data)
    return Mutant(target, f"weights {what}")


def _option(seed: Seed, rng: random.Random, folder: Path) -> Mutant:
    target = folder / "option.txt"
    key, _, value = seed.path.read_text().partition("=")
    if rng.random() < 0.2:
        key = rng.choice(("", "a b", "../x", "steps\x00", "x" * 500, "1abc", "steps"))
    value = rng.choice(("[1,2", "{a: b}", "1e999", ".nan", "-1", "1e12", "abc", "", "x" * 2000, "[[[[[[1]]]]]]",
                        "0", "10**9", "true", "null", "!!binary aGVsbG8=", "2147483648", "-.inf", "[1, 2, 3]", value))
    target.write_text(f"{key}={value}")
    return Mutant(target, f"--option {key[:20]}={value[:30]}")


def _payload_option(seed: Seed, rng: random.Random, folder: Path, sentinel: Path) -> Mutant:
    target = folder / "option.txt"
    target.write_text(f'eta=!!python/object/apply:os.system ["touch {sentinel}"]')
    return Mutant(target, "--option with a Python tag that runs a command", "refuse")


PAYLOADS = (_payload_yaml, _payload_option)
MUTATORS: dict[str, list[tuple[Mutator, float]]] = {
    "nifti": [(_bytes_of_file, 0.5), (_nifti_field, 0.5)],
    "metaimage": [(_header_line, 0.6), (_raw_data, 0.15), (_bytes_of_file, 0.25)],
    "nrrd": [(_header_line, 0.6), (_raw_data, 0.15), (_bytes_of_file, 0.25)],
    "png": [(_png_chunk, 0.5), (_bytes_of_file, 0.5)],
    "jpeg": [(_bytes_of_file, 1.0)],
    "array": [(_bytes_of_file, 0.7), (_npy_header, 0.3)],
    "dicom-file": [(_dicom_file, 1.0)],
    "dicom-series": [(_dicom_series, 1.0)],
    "manifest.json": [(_json_document, 1.0)],
    "manifest.csv": [(_csv_document, 1.0)],
    "yaml": [(_yaml_document, 0.9), (_payload_yaml, 0.1)],
    "checkpoint": [(_checkpoint, 1.0)],
    "run": [(_run, 1.0)],
    "fid": [(_fid, 1.0)],
    "option": [(_option, 0.92), (_payload_option, 0.08)],
}
