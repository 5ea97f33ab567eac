"""Dataset manifests: which files form each case, and which split each case belongs to.

The manifest is the one place where "what is the data" is written down, so training, evaluation and
reports all see the same cases and the same splits. Paths below the manifest's folder are stored
relative to it, so a dataset moved together with its manifest stays valid. Modality keys are
lowercase canonical names (ct, mr, pet, cbct, t1, t1c, t2, flair, pd; a/b for unnamed pix2pix sides).
An image is one file or folder, or a list of 2-D slice files that form one case (a slice dataset
whose patient is in the file names). The optional top-level "modalities" section says how to read
each modality where the files leave it open ({"ct": {"units": "display"}}); `prepare` writes what it
decided there, with the reason, so the decision is visible and can be changed.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossdiff.atomic import write_json, write_text
from crossdiff.config_schema import read_json, read_text
from crossdiff.errors import CrossdiffError, InputError
from crossdiff.file_checks import path_name_problem

SPLITS = ("train", "val", "test")
MANIFEST_FORMAT = "crossdiff-manifest"
MANIFEST_VERSION = 1
LABEL_PREFIX = "label:"
CASE_FIELDS = ("split", "images", "mask", "labels")
MODALITY_KEY = re.compile(r"[a-z][a-z0-9_]*\Z")
CSV_LIST_SEPARATOR = "|"  # slice files of one case in one CSV cell ('|' is not allowed in Windows names)
READING_FIELDS = ("units", "colour", "key", "why")

ImageRef = Path | tuple[Path, ...]  # a file or folder, or the slice files of one case in stacking order


def ref_files(ref: ImageRef) -> list[Path]:
    """The files (or folder) an image entry names."""
    return list(ref) if isinstance(ref, tuple) else [ref]


@dataclass(frozen=True)
class Reading:
    """How to read one modality's files where they leave it open: `units` (crossdiff.units), `colour`
    ('refuse' or 'luminance', for colour images), `key` (the variable of a .npz/.mat); `why` records the
    reason `prepare` gave for its decision (documentation only)."""

    units: str | None = None
    colour: str = "refuse"
    key: str | None = None
    why: str | None = None

    def to_dict(self) -> dict[str, str]:
        return {name: value for name in READING_FIELDS if (value := getattr(self, name)) is not None and
                (name != "colour" or value != "refuse")}


@dataclass
class CaseEntry:
    """The files of one subject. `labels` are label maps (e.g. tumour masks) keyed by the image
    whose grid they share; `mask` is a body mask on the reference image's grid (as SynthRAD ships it).
    `reading` holds the manifest's per-modality reading settings (shared by every case)."""

    images: dict[str, ImageRef]
    mask: Path | None = None
    labels: dict[str, Path] = field(default_factory=dict)
    split: str = "train"
    reading: dict[str, Reading] = field(default_factory=dict, compare=False)

    def files(self) -> Iterator[tuple[str, Path]]:
        """Every file with the field it comes from, so checks can name both."""
        yield from ((f"images.{key}", path) for key, ref in self.images.items() for path in ref_files(ref))
        if self.mask is not None:
            yield "mask", self.mask
        yield from ((f"labels.{key}", path) for key, path in self.labels.items())

    def reading_of(self, key: str) -> Reading:
        return self.reading.get(key, Reading())


@dataclass
class Manifest:
    """Cases by id, in a stable order; unpaired datasets hold single-modality cases. `reading` (per
    modality key) is shared with every case entry, so code holding one entry reads its files right."""

    cases: dict[str, CaseEntry] = field(default_factory=dict)
    reading: dict[str, Reading] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for case in self.cases.values():
            case.reading = self.reading

    def modalities(self) -> list[str]:
        return sorted({key for case in self.cases.values() for key in case.images})

    def cases_with(self, *modalities: str) -> list[str]:
        return [cid for cid, case in self.cases.items() if all(m in case.images for m in modalities)]

    def split_cases(self, split: str) -> list[str]:
        _check_split_name(split)
        return [cid for cid, case in self.cases.items() if case.split == split]

    def is_paired(self, source: str, target: str) -> bool:
        """True when every case holding `source` or `target` holds both (and there is one);
        a partly paired dataset answers False: use `cases_with(source, target)` for its pairs."""
        either = [c for c in self.cases.values() if source in c.images or target in c.images]
        return bool(either) and all(source in c.images and target in c.images for c in either)


def _check_split_name(split: str) -> None:
    if split not in SPLITS:
        raise CrossdiffError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


# ---------------------------------------------------------------------------------------- saving


def save_manifest(manifest: Manifest, path: str | Path) -> None:
    """Write JSON, or CSV when `path` ends in .csv, atomically; refuses what load_manifest would."""
    path = Path(path)
    folder = absolute_path(path).parent
    document = _to_json(manifest, folder)
    _parse_cases(path, document["cases"], folder)
    if _is_csv(path):
        write_text(path, _to_csv(manifest, folder))
    else:
        write_json(path, document)


def _is_csv(path: Path) -> bool:
    return path.name.lower().endswith(".csv")


def absolute_path(path: str | Path) -> Path:
    """Absolute and normalised, without resolving symlinks (a symlinked dataset keeps its names)."""
    return Path(os.path.normpath(os.path.abspath(Path(path).expanduser())))


def _stored(path: Path, folder: Path) -> str:
    path = absolute_path(path)
    return path.relative_to(folder).as_posix() if path.is_relative_to(folder) else str(path)


def _to_json(manifest: Manifest, folder: Path) -> dict[str, Any]:
    def entry(case: CaseEntry) -> dict[str, Any]:
        return {
            "split": case.split,
            "images": {key: _stored_ref(ref, folder) for key, ref in case.images.items()},
            "mask": None if case.mask is None else _stored(case.mask, folder),
            "labels": {key: _stored(p, folder) for key, p in case.labels.items()},
        }

    cases = {cid: entry(case) for cid, case in manifest.cases.items()}
    document: dict[str, Any] = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION}
    if manifest.reading:
        document["modalities"] = {key: reading.to_dict() for key, reading in sorted(manifest.reading.items())}
    return document | {"cases": cases}


def _stored_ref(ref: ImageRef, folder: Path) -> str | list[str]:
    return [_stored(p, folder) for p in ref] if isinstance(ref, tuple) else _stored(ref, folder)


def _to_csv(manifest: Manifest, folder: Path) -> str:
    label_keys = sorted({key for case in manifest.cases.values() for key in case.labels})
    modalities = manifest.modalities()
    reading = [(f"{name}:{key}", value) for key, settings in sorted(manifest.reading.items())
               for name, value in settings.to_dict().items() if name != "why"]
    stream = io.StringIO()
    writer = csv.writer(stream, lineterminator="\n")
    header = ["case", "split", "mask", *modalities, *(LABEL_PREFIX + k for k in label_keys), *(c for c, _ in reading)]
    writer.writerow(header)
    for cid, case in manifest.cases.items():
        images = [_image_cell(case.images.get(key), folder) for key in modalities]
        labels = [_cell(case.labels.get(key), folder) for key in label_keys]
        writer.writerow([cid, case.split, _cell(case.mask, folder), *images, *labels, *(v for _, v in reading)])
    return stream.getvalue()


def _cell(path: Path | None, folder: Path) -> str:
    return "" if path is None else _stored(path, folder)


def _image_cell(ref: ImageRef | None, folder: Path) -> str:
    if isinstance(ref, tuple):
        return CSV_LIST_SEPARATOR.join(_stored(p, folder) for p in ref)
    return _cell(ref, folder)


# --------------------------------------------------------------------------------------- loading


def load_manifest(path: str | Path, check_files: bool = True) -> Manifest:
    """Read a JSON or CSV manifest; relative paths are taken from the manifest's folder.

    Refuses malformed structure with the case and field at fault and, with `check_files`, lists
    every missing file in one error, so a moved or half-copied dataset is fixed in one go.
    """
    path = Path(path)
    if not os.path.lexists(path):  # lexists, unlike Path.is_file, never raises (a name too long is 'not found')
        raise InputError(path, "manifest not found (make one with `crossdiff prepare DATA_DIR --out FILE`)")
    records, reading = _read_csv(path) if _is_csv(path) else _read_json(path)
    manifest = Manifest(_parse_cases(path, records, absolute_path(path).parent), _parse_reading(path, reading))
    if check_files:
        _check_files_exist(path, manifest)
    return manifest


def _read_json(path: Path) -> tuple[dict[str, Any], Any]:
    document = read_json(path, "manifest", object_pairs_hook=_refuse_duplicate_keys)
    if not isinstance(document, dict) or not isinstance(document.get("cases"), dict):
        raise InputError(path, 'manifest must be a JSON object with "cases": {case id: {...}}')
    if document.get("format", MANIFEST_FORMAT) != MANIFEST_FORMAT:
        raise InputError(path, f"not a crossdiff manifest (format {document['format']!r})")
    if document.get("version", MANIFEST_VERSION) != MANIFEST_VERSION:
        raise InputError(
            path, f"manifest version {document['version']!r} is not supported (expected {MANIFEST_VERSION})"
        )
    return document["cases"], document.get("modalities", {})


def _parse_reading(path: Path, section: Any) -> dict[str, Reading]:
    """The "modalities" section: {key: {units, colour, key, why}}, each value checked."""
    from crossdiff.readers import COLOUR_CHOICES
    from crossdiff.units import check_units

    if not isinstance(section, dict):
        raise InputError(path, f'"modalities" must map modality keys to reading settings, got {type(section).__name__}')
    reading = {}
    for key, settings in section.items():
        where = f"modalities.{key}"
        if not isinstance(settings, dict):
            raise InputError(path, f"{where}: expected an object like {{\"units\": \"HU\"}}, got {settings!r}")
        _refuse_unknown(path, where, settings, READING_FIELDS)
        if any(not isinstance(value, str) for value in settings.values()):
            raise InputError(path, f"{where}: every setting must be a string")
        try:
            units = check_units(settings["units"], where) if "units" in settings else None
        except CrossdiffError as error:
            raise InputError(path, str(error)) from None
        colour = settings.get("colour", "refuse")
        if colour not in COLOUR_CHOICES:
            raise InputError(path, f"{where}.colour: {colour!r} is not one of {', '.join(COLOUR_CHOICES)}")
        reading[key] = Reading(units, colour, settings.get("key"), settings.get("why"))
    return reading


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads keeps the last of two equal keys; a case listed twice is a mistake to report."""
    keys = [key for key, _ in pairs]
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        raise ValueError(f"key {duplicates[0]!r} appears more than once")
    return dict(pairs)


def _read_csv(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    """Turn CSV rows into the same records as the JSON form, so one validator serves both; reading
    settings come from `units:<key>` (`colour:<key>`, `key:<key>`) columns, one value per column."""
    text = read_text(path, "manifest")
    try:
        rows = list(csv.DictReader(io.StringIO(text)))
    except csv.Error as error:
        raise InputError(path, f"manifest is not a readable CSV ({error})") from None
    columns = list(rows[0]) if rows else []
    for required in ("case", "split"):
        if required not in columns:
            columns_help = "case, split, mask, <modality>..., label:<modality>..."
            raise InputError(path, f"CSV manifest has no '{required}' column (columns: {columns_help})")
    records: dict[str, dict[str, Any]] = {}
    for line, row in enumerate(rows, start=2):
        cid = (row.get("case") or "").strip()
        if not cid or cid in records:
            problem = "has no case id" if not cid else f"repeats case {cid!r}"
            raise InputError(path, f"line {line} {problem}")
        records[cid] = _csv_record(row)
    return records, _csv_reading(path, rows)


def _csv_reading(path: Path, rows: list[dict[str, str | None]]) -> dict[str, dict[str, str]]:
    reading: dict[str, dict[str, str]] = {}
    for column in rows[0] if rows else []:
        field_name, _, key = (column or "").partition(":")
        if field_name not in READING_FIELDS or not key:
            continue
        values = {(row.get(column) or "").strip() for row in rows} - {""}
        if len(values) > 1:
            raise InputError(path, f"column {column} must hold one value for every case, not {', '.join(sorted(values))}")
        if values:
            reading.setdefault(key, {})[field_name] = values.pop()
    return reading


def _csv_record(row: dict[str, str | None]) -> dict[str, Any]:
    cells = {column: (value or "").strip() for column, value in row.items() if column is not None}
    images: dict[str, Any] = {
        c: v.split(CSV_LIST_SEPARATOR) if CSV_LIST_SEPARATOR in v else v
        for c, v in cells.items()
        if v and c not in ("case", "split", "mask") and not c.startswith(LABEL_PREFIX) and ":" not in c
    }
    labels = {c[len(LABEL_PREFIX) :]: v for c, v in cells.items() if v and c.startswith(LABEL_PREFIX)}
    return {"split": cells["split"], "images": images, "mask": cells.get("mask") or None, "labels": labels}


def _parse_cases(path: Path, records: dict[str, Any], folder: Path) -> dict[str, CaseEntry]:
    if not records:
        raise InputError(path, "manifest lists no cases")
    return {cid: _parse_case(path, cid, record, folder) for cid, record in records.items()}


def _refuse_unknown(path: Path, where: str, record: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(record) - set(allowed))
    if unknown:
        raise InputError(path, f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")


def _parse_case(path: Path, cid: str, record: Any, folder: Path) -> CaseEntry:
    where = f"case {cid!r}"
    problem = path_name_problem(cid)
    if problem:
        raise InputError(path, f"{where}: the case id {problem}")
    if not isinstance(record, dict):
        raise InputError(path, f"{where}: expected an object with 'split' and 'images', got {type(record).__name__}")
    _refuse_unknown(path, where, record, CASE_FIELDS)
    if "images" not in record:
        raise InputError(path, f"{where}: missing 'images' (a mapping from modality to file)")
    split = record.get("split")
    if split not in SPLITS:
        found = "missing 'split'" if split is None else f"split {split!r} is unknown"
        raise InputError(path, f"{where}: {found}; use one of {', '.join(SPLITS)}")
    images = _parse_paths(path, f"{where} images", record["images"], folder, lists=True)
    if not images:
        raise InputError(path, f"{where}: 'images' is empty; a case needs at least one image")
    mask = record.get("mask")
    if mask is not None and not (isinstance(mask, str) and mask):
        raise InputError(path, f"{where}: 'mask' must be a file path or null, got {mask!r}")
    labels = _parse_paths(path, f"{where} labels", record.get("labels", {}), folder)
    return CaseEntry(images, None if mask is None else _resolve(mask, folder), labels, split)


def _parse_paths(path: Path, where: str, mapping: Any, folder: Path, lists: bool = False) -> dict[str, Any]:
    """Modality key -> file; with `lists`, a non-empty list of slice files is an image too."""
    if not isinstance(mapping, dict):
        raise InputError(path, f"{where}: expected a mapping from modality to file, got {type(mapping).__name__}")
    parsed: dict[str, Any] = {}
    for key, value in mapping.items():
        if not isinstance(key, str) or not MODALITY_KEY.match(key):
            raise InputError(path, f"{where}: key {key!r} must be lowercase letters, digits or '_' (e.g. ct, mr, t1c)")
        if lists and isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
            parsed[key] = tuple(_resolve(v, folder) for v in value)
        elif isinstance(value, str) and value:
            parsed[key] = _resolve(value, folder)
        else:
            expected = "a file path or a list of slice files" if lists else "a file path"
            raise InputError(path, f"{where}.{key}: expected {expected}, got {value!r}")
    return parsed


def _resolve(text: str, folder: Path) -> Path:
    path = Path(text)
    with contextlib.suppress(RuntimeError):  # '~user/...' of an unknown user stays as written
        path = path.expanduser()
    return absolute_path(path if path.is_absolute() else folder / path)


def _check_files_exist(path: Path, manifest: Manifest) -> None:
    missing = [
        f"case {cid!r} {name}: {file}"
        for cid, case in manifest.cases.items()
        for name, file in case.files()
        if not os.path.exists(file)
    ]
    if missing:
        raise InputError(
            path,
            f"{len(missing)} file(s) listed in the manifest do not exist (relative paths are taken from "
            f"{absolute_path(path).parent}):\n  " + "\n  ".join(missing),
        )


# ---------------------------------------------------------------------------------------- splits


CARVE_FROM = 4  # training cases needed before one is carved out for validation


def validation_cases(train: list[str], val: list[str], seed: int) -> tuple[list[str], list[str], str]:
    """The manifest's val cases; without any, one training case carved out (seeded) when there are at least
    CARVE_FROM, else the training cases themselves (monitoring only). Test cases are never used."""
    if val:
        return train, val, f"{len(val)} val case(s) of the manifest ({', '.join(val[:4])})"
    if len(train) >= CARVE_FROM:
        carved = [cid for cid, split in assign_splits(train, val=1 / len(train), test=0.0, seed=seed).items() if split == "val"]
        kept = [cid for cid in train if cid not in carved]
        return kept, carved, f"no val split: {', '.join(carved)} carved out of the training cases (seed {seed})"
    return train, train, (f"no val split and only {len(train)} training case(s): validation runs on the training cases "
                          "(it watches for collapse, it does not measure generalisation); test cases are never used")


def assign_splits(
    case_ids: Iterable[str],
    val: float,
    test: float,
    seed: int,
    fixed: dict[str, str] | None = None,
) -> dict[str, str]:
    """Split by case (never by slice, so no subject leaks across splits), reproducibly.

    Each case gets a rank from a hash of (seed, case id), so the result does not depend on input
    order, and adding a case moves at most one other. Counts are rounded half up, a fraction above zero gets at
    least one case, and at least one case always stays in training. `fixed` pins cases to a split
    and counts towards the fractions.
    """
    ids = list(case_ids)
    fixed = dict(fixed or {})
    _check_split_request(ids, val, test, fixed)
    taken = Counter(fixed.values())
    n_test = max(_split_count(test, len(ids)) - taken["test"], 0)
    n_val = max(_split_count(val, len(ids)) - taken["val"], 0)
    free = sorted((cid for cid in ids if cid not in fixed), key=lambda cid: _rank(seed, cid))
    if not any(s == "train" for s in fixed.values()):
        n_test, n_val = _keep_one_for_training(len(free), n_test, n_val)
    drawn = {cid: "test" for cid in free[:n_test]} | {cid: "val" for cid in free[n_test : n_test + n_val]}
    splits = {cid: fixed.get(cid) or drawn.get(cid, "train") for cid in sorted(ids)}
    if "train" not in splits.values():
        raise CrossdiffError("the fixed splits leave no case for training")
    return splits


def _check_split_request(ids: list[str], val: float, test: float, fixed: dict[str, str]) -> None:
    if not ids:
        raise CrossdiffError("no cases to split")
    if len(set(ids)) != len(ids):
        raise CrossdiffError("case ids must be unique to be split by case")
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise CrossdiffError(f"split fractions must be in [0, 1) with val + test < 1 (got val={val}, test={test})")
    unknown = sorted(set(fixed) - set(ids))
    if unknown:
        raise CrossdiffError(f"fixed splits name unknown case(s): {', '.join(unknown)}")
    for split in fixed.values():
        _check_split_name(split)


def _split_count(fraction: float, n: int) -> int:
    return max(1, math.floor(fraction * n + 0.5)) if fraction > 0 else 0


def _keep_one_for_training(n_free: int, n_test: int, n_val: int) -> tuple[int, int]:
    """Shrink val first, then test, until one free case is left for training."""
    excess = max(0, n_test + n_val - (n_free - 1))
    cut_val = min(excess, n_val)
    return max(0, n_test - (excess - cut_val)), n_val - cut_val


def _rank(seed: int, cid: str) -> str:
    return hashlib.sha256(f"{seed}\0{cid}".encode()).hexdigest()
