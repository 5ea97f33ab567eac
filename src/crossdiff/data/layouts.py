"""Find the cases in a dataset folder, in whichever public layout it arrives.

Users bring data as it was published (SynthRAD, BraTS, pix2pix/CycleGAN folders, TCIA-style
modality folders, loose slices) rather than reshaping it for us. Each layout is one row of LAYOUTS:
how to recognise it and how to read its cases, so a new layout touches nothing else.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from crossdiff.data.manifest import (
    MODALITY_KEY,
    SPLITS,
    CaseEntry,
    Manifest,
    Reading,
    absolute_path,
    assign_splits,
    ref_files,
    save_manifest,
)
from crossdiff.dicom import has_dicom_marker, series_description
from crossdiff.errors import CrossdiffError, InputError
from crossdiff.readers import SLICE_SUFFIXES, VOLUME_SUFFIXES, natural_key

IMAGE_SUFFIXES = VOLUME_SUFFIXES + SLICE_SUFFIXES
FORMATS = ("nifti", "dicom")


class Found(NamedTuple):
    """What a layout reader returns: the cases, whether folder names fixed their splits, and what the
    user should know about how cases were formed."""

    cases: dict[str, CaseEntry]
    splits_from_folders: bool = False
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Options:
    """What a user may tell a layout reader: the preferred format where a case has both, and the rule
    that finds the case (patient) in a slice file's name."""

    prefer: str = "nifti"
    case_pattern: re.Pattern[str] | None = None


@dataclass(frozen=True)
class Layout:
    name: str
    example: str
    detect: Callable[[Path], bool]
    read: Callable[[Path, Options], Found]


# ------------------------------------------------------------------------------- shared helpers


def _stem(path: Path, suffixes: tuple[str, ...]) -> str | None:
    """The name without its image suffix; None for what is not an image (notes, a .mha's .raw)."""
    lower = path.name.lower()
    matches = [s for s in suffixes if lower.endswith(s)]
    if path.name.startswith(".") or not matches or not path.is_file():
        return None
    return path.name[: -len(max(matches, key=len))]


def _images_in(folder: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> list[tuple[str, Path]]:
    """(stem, path) of the image files directly in `folder`, in name order."""
    if not folder.is_dir():
        return []
    named = ((_stem(path, suffixes), path) for path in sorted(folder.iterdir()))
    return [(stem, path) for stem, path in named if stem]


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _walk(root: Path) -> Iterator[Path]:
    """Every folder at any depth, root first: challenge archives nest cases under task folders."""
    for folder, children, _ in os.walk(root, followlinks=True):
        children[:] = sorted(c for c in children if not c.startswith("."))
        yield Path(folder)


def _add(files: dict[str, Path], key: str, path: Path, where: Path) -> None:
    """Refuse a second file for one modality instead of silently keeping either."""
    if key in files:
        raise InputError(
            where,
            f"two files for {key!r}: {files[key].name} and {path.name}; keep one of them, "
            "or name the other so its modality differs",
        )
    files[key] = path


def _add_case(cases: dict[str, CaseEntry], cid: str, case: CaseEntry, where: Path) -> None:
    if cid in cases:
        raise InputError(where, f"case id {cid!r} is used by two folders; case ids must be unique, rename one")
    cases[cid] = case


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ------------------------------------------------------------- case folders: SynthRAD and BraTS

Role = tuple[str, str]  # ('image' | 'mask' | 'label', key)
RoleOf = Callable[[str, str], Role | None]  # (file stem, case folder name) -> role


def _synthrad_role(stem: str, case: str) -> Role | None:
    key = stem.lower()
    if key in ("ct", "mr", "cbct"):
        return "image", key
    return ("mask", "mask") if key == "mask" else None


BRATS_CONTRASTS = {
    **{name: "t1" for name in ("t1n", "t1", "t1w")},
    **{name: "t1c" for name in ("t1c", "t1ce", "t1gd")},
    **{name: "t2" for name in ("t2w", "t2")},
    **{name: "flair" for name in ("t2f", "flair")},
    "pd": "pd",
}
_BRATS_WORDS = sorted([*BRATS_CONTRASTS, "seg"], key=len, reverse=True)
_BRATS_NAME = re.compile(rf"(?:(?P<case>.+)[-_])?(?P<word>{'|'.join(_BRATS_WORDS)})", re.IGNORECASE)


def _brats_role(stem: str, case: str) -> Role | None:
    """`<case>-t1n`, `<case>_t1ce`, plain `t2w` or `flair`. A prefix other than the folder's name
    (sub-01_t1 beside sub-02_t1) means a flat folder of several subjects, not a BraTS case."""
    match = _BRATS_NAME.fullmatch(stem)
    if match is None or (match["case"] or case).lower() != case.lower():
        return None
    word = match["word"].lower()
    return ("label", "seg") if word == "seg" else ("image", BRATS_CONTRASTS[word])


def _case_in(folder: Path, role_of: RoleOf) -> CaseEntry | None:
    slots: dict[str, dict[str, Path]] = {"image": {}, "mask": {}, "label": {}}
    for stem, path in _images_in(folder, VOLUME_SUFFIXES):
        role = role_of(stem, folder.name)
        if role is not None:
            _add(slots[role[0]], role[1], path, folder)
    if not slots["image"]:
        return None
    return CaseEntry(slots["image"], slots["mask"].get("mask"), slots["label"])


def _case_folders(role_of: RoleOf) -> Callable[[Path, Options], Found]:
    """A reader for layouts with one folder per case (at any depth), named after the case."""

    def read(root: Path, options: Options) -> Found:
        cases: dict[str, CaseEntry] = {}
        for folder in _walk(root):
            case = _case_in(folder, role_of)
            if case is not None:
                _add_case(cases, folder.name, case, folder)
        return Found(cases)

    return read


def _detect_synthrad(root: Path) -> bool:
    cases = (_case_in(folder, _synthrad_role) for folder in _walk(root))
    return any(case and "ct" in case.images and len(case.images) > 1 for case in cases)


def _detect_brats(root: Path) -> bool:
    return any(_case_in(folder, _brats_role) for folder in _walk(root))


# ---------------------------------------------------------------------- pix2pix / CycleGAN


def _pix2pix_folders(root: Path) -> list[tuple[str | None, str, Path]]:
    """(split named by the folder or None, modality key, folder) for trainA.., A/train.., A/."""
    found: list[tuple[str | None, str, Path]] = []
    for side in "AB":
        found += [(split, side.lower(), root / f"{split}{side}") for split in SPLITS]
        found += [(split, side.lower(), root / side / split) for split in SPLITS]
        found.append((None, side.lower(), root / side))
    return [(split, key, folder) for split, key, folder in found if folder.is_dir()]


def _detect_pix2pix(root: Path) -> bool:
    both_sides = (root / "A").is_dir() and (root / "B").is_dir()
    return both_sides or any((root / f"{split}{side}").is_dir() for split in SPLITS for side in "AB")


def _read_pix2pix(root: Path, options: Options) -> Found:
    """Files with one stem in A and B form a paired image; a file on one side only, an unpaired one.
    With a case pattern, the images of one patient (by the pattern) form one case, stacked as slices."""
    cases: dict[str, CaseEntry] = {}
    folders = _pix2pix_folders(root)
    grouped: dict[str, dict[str, list[Path]]] = {}
    splits: dict[str, str] = {}
    for split, key, folder in folders:
        for stem, path in _images_in(folder):
            cid = _case_of(stem, path, options.case_pattern)
            if splits.setdefault(cid, split or "train") != (split or "train"):
                problem = f"case {cid!r} is both in {splits[cid]} and in {split or 'train'}; a case belongs to one split"
                raise InputError(path, problem)
            grouped.setdefault(cid, {}).setdefault(key, []).append(path)
    for cid, files in grouped.items():
        case = CaseEntry({}, split=splits[cid])
        for key, paths in files.items():
            if options.case_pattern is None and len(paths) > 1:
                raise InputError(paths[1], f"two files for {key!r} in case {cid!r}")
            case.images[key] = paths[0] if len(paths) == 1 else tuple(sorted(paths, key=natural_key))
        cases[cid] = case
    return Found(cases, any(split is not None for split, _, _ in folders))


# ------------------------------------------------ modality folders (TCIA-style, e.g. sarcoma)

FOLDER_MODALITIES = {"ct": "ct", "cbct": "cbct", "pet": "pet", "pt": "pet"}


def _modality_folders(case: Path) -> list[Path]:
    return [d for d in _subfolders(case) if any((d / fmt / "image").is_dir() for fmt in FORMATS)]


def _detect_modality_folders(root: Path) -> bool:
    return any(_modality_folders(case) for case in _subfolders(root))


def _folder_keys(names: list[str]) -> dict[str, str]:
    """CT -> ct, PET/PT -> pet; MR folders -> 'mr' when there is one, else their own names (mr_t1, mr_t2)."""
    keys = {name: _key(name) for name in names}
    mr = [name for name, key in keys.items() if key.startswith("mr")]
    return {name: FOLDER_MODALITIES.get(key, "mr" if mr == [name] else key) for name, key in keys.items()}


def _single_volume(folder: Path) -> Path | None:
    files = [path for _, path in _images_in(folder, VOLUME_SUFFIXES)]
    if len(files) > 1:
        raise InputError(folder, f"holds {len(files)} volumes ({', '.join(f.name for f in files)}); expected one")
    return files[0] if files else None


def _dicom_folder(folder: Path) -> Path | None:
    has_files = folder.is_dir() and any(p.is_file() and not p.name.startswith(".") for p in folder.iterdir())
    return folder if has_files else None


def _modality_image(folder: Path, prefer: str) -> Path | None:
    """The preferred format when present, else the other one (a NIfTI-only or DICOM-only export)."""
    sources = {"nifti": _single_volume(folder / "nifti" / "image"), "dicom": _dicom_folder(folder / "dicom" / "image")}
    return sources[prefer] or next((p for p in sources.values() if p), None)


def _read_modality_folders(root: Path, options: Options) -> Found:
    """Tumour masks in `<MOD>/nifti/mask/` become labels on that modality's grid, not body masks."""
    cases: dict[str, CaseEntry] = {}
    for case_dir in _subfolders(root):
        folders = _modality_folders(case_dir)
        keys = _folder_keys([folder.name for folder in folders])
        case = CaseEntry({})
        for folder in folders:
            image = _modality_image(folder, options.prefer)
            if image is None:
                continue
            _add(case.images, keys[folder.name], image, case_dir)
            label = _single_volume(folder / "nifti" / "mask")
            if label is not None:
                case.labels[keys[folder.name]] = label
        if case.images:
            cases[case_dir.name] = case
    return Found(cases)


# ------------------------------------------------------------------ flat folder of named files

NAME_WORDS = {
    **BRATS_CONTRASTS,
    **{name: "pd" for name in ("protondensity", "pdw")},
    **{name: "mr" for name in ("mr", "mri")},
    **{name: name for name in ("ct", "cbct", "pet")},
}
_TOKEN = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")  # BrainT1Slice -> Brain, T, 1, Slice


def _name_words(stem: str) -> list[tuple[str, int, int]]:
    """(modality, start, end) of each modality word in a file name, longest word first at each place."""
    tokens = list(_TOKEN.finditer(stem))
    words, i = [], 0
    while i < len(tokens):
        for n in (3, 2, 1):
            run = tokens[i : i + n]
            word = "".join(t.group().lower() for t in run)
            if len(run) == n and word in NAME_WORDS:
                words.append((NAME_WORDS[word], run[0].start(), run[-1].end()))
                i += n - 1
                break
        i += 1
    return words


def _modality_from_name(stem: str) -> tuple[str, str] | None:
    """(modality, the name without its modality word) when the name tells one modality, else None.
    A generic 'mr' next to a contrast (mr_t1) gives way to the contrast."""
    words = _name_words(stem)
    keys = {key for key, _, _ in words}
    if len(keys) > 1:
        keys.discard("mr")
    if len(keys) != 1:
        return None
    kept = stem
    for _, start, end in reversed(words):
        kept = f"{kept[:start]}_{kept[end:]}"
    return keys.pop(), re.sub(r"([-_. ])[-_. ]+", r"\1", kept).strip("-_. ")


def _detect_flat(root: Path) -> bool:
    return bool(_images_in(root))


def _read_flat(root: Path, options: Options) -> Found:
    """Files whose names differ only by the modality word form one case (BrainT1Slice + BrainProtonDensitySlice)."""
    cases: dict[str, CaseEntry] = {}
    for stem, path in _images_in(root):
        named = _modality_from_name(stem)
        if named is None:
            problem = "cannot tell one modality from this file name (name one of T1, T2, FLAIR, PD, CT, PET, ...)"
            raise InputError(path, f"{problem}; {recognised_layouts()}")
        key, cid = named
        _add(cases.setdefault(cid or root.name, CaseEntry({})).images, key, path, root)
    return Found(cases)


# --------------------------------------------------------- slice datasets: one folder per modality

# A slice number at the end of a name: "_slice_045", "-12", " (3)", "z7".
_TRAILING_NUMBER = re.compile(r"[-_. ]*(?:slice|slc|sl|img|image|z)?[-_. ]*\(?\d+\)?\Z", re.IGNORECASE)
HASHED_BYTES = 32 << 20  # files compared byte for byte across cases (slices, small volumes)
_WRAPPERS = 3  # levels of single-child folders (PNG/, images/) skipped below a modality folder


def default_case_of(stem: str) -> str | None:
    """The patient a slice file name tells by crossdiff's default rule: the name without its trailing
    slice number, when what is left still holds a number of its own ('pat01_slice003' -> 'pat01',
    'BraTS-GLI-00001-000_45' -> 'BraTS-GLI-00001-000'); None when it does not ('slice_12', '7')."""
    rest = _TRAILING_NUMBER.sub("", stem).strip("-_. ")
    return rest if rest != stem and re.search(r"\d", rest) else None


def _case_of(stem: str, path: Path, pattern: re.Pattern[str] | None) -> str:
    """The case of a slice file: by the user's pattern (group 'case', else the first group, else the
    whole match) when given, else the file is its own case."""
    if pattern is None:
        return stem
    match = pattern.search(stem)
    if match is None:
        raise InputError(path, f"its name {stem!r} does not match --case-pattern {pattern.pattern!r}")
    groups = match.groupdict()
    cid = groups.get("case") or (match.group(1) if match.groups() else match.group(0))
    if not cid:
        raise InputError(path, f"--case-pattern {pattern.pattern!r} gives an empty case id for {stem!r}")
    return cid


def _folder_modality(name: str) -> str | None:
    """The modality key a folder name tells ('CT' -> ct, 'T1-MRI' -> t1, 'MRI' -> mr), else None."""
    named = _modality_from_name(name)
    return named[0] if named is not None else None


def _unwrap(folder: Path) -> Path:
    """Below a modality folder, skip folders that only hold one folder (CT/PNG/ -> CT/PNG/<patients>)."""
    for _ in range(_WRAPPERS):
        children = _subfolders(folder)
        if len(children) != 1 or _images_in(folder):
            break
        folder = children[0]
    return folder


def _slice_modality_folders(root: Path) -> dict[str, Path]:
    """Modality key -> folder holding its patients' slices, when every subfolder of root names one
    modality and at least two do."""
    found = {}
    for folder in _subfolders(root):
        key = _folder_modality(folder.name)
        if key is None or key in found:
            return {}
        found[key] = _unwrap(folder)
    return found if len(found) >= 2 else {}


def _detect_modality_slices(root: Path) -> bool:
    folders = _slice_modality_folders(root)
    return bool(folders) and all(_images_in(f, SLICE_SUFFIXES) or any(_images_in(c, SLICE_SUFFIXES) for c in _subfolders(f))
                                 for f in folders.values())


def _read_modality_slices(root: Path, options: Options) -> Found:
    """Cases from `<MODALITY>/[PNG/]<patient>/<slices>` (one stack per patient and modality) or from
    `<MODALITY>/<patient-prefixed slices>` grouped by the case pattern (default: `default_case_of`).
    The slices of one case must be the same levels in every modality: the same count, and the same
    names once the modality word is taken out ('CT_PNG (3)' and 'T1_PNG (3)')."""
    grouped: dict[str, dict[str, list[Path]]] = {}
    for key, folder in _slice_modality_folders(root).items():
        for patient in _subfolders(folder):
            files = [path for _, path in _images_in(patient, SLICE_SUFFIXES)]
            if files:
                grouped.setdefault(patient.name, {})[key] = files
        for stem, path in _images_in(folder, SLICE_SUFFIXES):
            cid = _case_of(stem, path, options.case_pattern) if options.case_pattern else default_case_of(stem) or stem
            grouped.setdefault(cid, {}).setdefault(key, []).append(path)
    cases = {}
    for cid, by_key in grouped.items():
        ordered = {key: sorted(files, key=natural_key) for key, files in by_key.items()}
        _check_same_levels(cid, ordered)
        cases[cid] = CaseEntry({key: _stack_ref(files) for key, files in ordered.items()})
    return Found(cases)


def _stack_ref(files: list[Path]) -> Path | tuple[Path, ...]:
    """A patient folder holding just these slices is named by the folder; otherwise by its files."""
    folder = files[0].parent
    if all(f.parent == folder for f in files) and len(_images_in(folder, SLICE_SUFFIXES)) == len(files):
        return folder
    return tuple(files)


def _check_same_levels(cid: str, by_key: dict[str, list[Path]]) -> None:
    counts = {key: len(files) for key, files in by_key.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{key} {n}" for key, n in counts.items())
        raise InputError(next(iter(by_key.values()))[0].parent, f"case {cid!r} has different numbers of slices per modality "
                                                                f"({listed})")
    keys = list(by_key)
    for index, files in enumerate(zip(*by_key.values())):
        levels = {_level_name(f.name) for f in files}
        if len(levels) > 1:
            names = ", ".join(f"{key}: {f.name}" for key, f in zip(keys, files))
            raise InputError(files[0], f"slice {index + 1} of case {cid!r} is not one level in every modality ({names})")


def _level_name(name: str) -> str:
    """A slice file's name without its modality word and suffix: what must agree across modalities."""
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix else name
    named = _modality_from_name(stem)
    return (named[1] if named else stem).lower()


# ------------------------------------------------------- DICOM studies: one folder per series


def _series_folders(case: Path) -> list[Path]:
    return [d for d in _subfolders(case) if any(p.is_file() and has_dicom_marker(p) for p in sorted(d.iterdir())[:5])]


def _detect_series_folders(root: Path) -> bool:
    return any(len(_series_folders(case)) >= 2 for case in _subfolders(root))


def _series_key(folder: Path) -> str:
    """The modality key of a series folder: from its name (t2_image -> t2), else its SeriesDescription,
    else its DICOM Modality; refused when none tells one."""
    named = _folder_modality(folder.name)
    if named:
        return named
    label = series_description(folder)
    if label is not None:
        modality, description = label
        return _folder_modality(description) or FOLDER_MODALITIES.get(modality.lower(), "mr" if modality == "MR" else "")
    raise InputError(folder, "cannot tell this series' modality: neither its folder name nor its SeriesDescription "
                             "names one (rename the folder, e.g. t2_image, ct)")


def _read_series_folders(root: Path, options: Options) -> Found:
    cases: dict[str, CaseEntry] = {}
    notes = []
    for case_dir in _subfolders(root):
        folders = _series_folders(case_dir)
        if not folders:
            continue
        case = CaseEntry({})
        for folder in folders:
            key = _series_key(folder)
            if not key:
                raise InputError(folder, "cannot tell this series' modality from its name, description or Modality tag")
            _add(case.images, key, folder, case_dir)
            notes.append(f"{case_dir.name}/{folder.name} -> {key}")
        cases[case_dir.name] = case
    return Found(cases, notes=tuple(notes[:6]) + (("...",) if len(notes) > 6 else ()))


# ------------------------------------------------------------ cases that look like one patient


def same_patient_notes(cases: dict[str, CaseEntry]) -> list[str]:
    """Warnings for case ids that look like slices of one patient ('pat01_003', 'pat01_004') and for
    cases holding byte-identical files: a split by case would put one patient on both sides."""
    notes = []
    by_root: dict[str, list[str]] = {}
    for cid in cases:
        root = default_case_of(cid)
        if root is not None:
            by_root.setdefault(root, []).append(cid)
    for root, ids in sorted(by_root.items()):
        if len(ids) > 1:
            notes.append(f"cases {', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''} ({len(ids)}) look like slices of one "
                         f"patient {root!r}: a split by case may put that patient on both sides; group them with "
                         r"--case-pattern (e.g. '(?P<case>.+)_\d+$')")
    owners: dict[str, str] = {}
    for cid, case in cases.items():
        for _, path in case.files():
            if path.is_file() and path.stat().st_size <= HASHED_BYTES:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                if digest in owners and owners[digest] != cid:
                    notes.append(f"cases {owners[digest]!r} and {cid!r} hold an identical file ({path.name}): the same "
                                 "patient twice, or a copied image")
                owners.setdefault(digest, cid)
    return notes


# ------------------------------------------------------------------------------------- the table

# Detection tries these in order; the first that matches reads the dataset.
LAYOUTS = (
    Layout(
        "synthrad",
        "<case>/mr.nii.gz (or cbct) + ct.nii.gz [+ mask.nii.gz], at any depth, .mha too (SynthRAD 2023/2025)",
        _detect_synthrad,
        _case_folders(_synthrad_role),
    ),
    Layout(
        "pix2pix",
        "A/ + B/, or trainA/ trainB/ [valA/ valB/ testA/ testB/], images paired by file name",
        _detect_pix2pix,
        _read_pix2pix,
    ),
    Layout(
        "modality-folders",
        "<case>/<CT|MR_T1|PET>/nifti/image/image.nii.gz or <case>/<CT|...>/dicom/image/*.dcm, "
        "tumour masks in .../nifti/mask/",
        _detect_modality_folders,
        _read_modality_folders,
    ),
    Layout(
        "series-folders",
        "<case>/<series folder>/*.dcm per series, named by contrast (t2_image/, adc_image/) or by its "
        "SeriesDescription",
        _detect_series_folders,
        _read_series_folders,
    ),
    Layout(
        "modality-slices",
        "<MODALITY>/[PNG/]<patient>/<slices> (CT/, T1-MRI/, T2-MRI/), or <MODALITY>/<patient-prefixed slices> "
        "(--case-pattern), slice k the same level in every modality",
        _detect_modality_slices,
        _read_modality_slices,
    ),
    Layout(
        "brats",
        "<case>/<case>-t1n.nii.gz (BraTS 2023), <case>/<case>_t1.nii.gz (BraTS 2021), "
        "or <case>/t1.nii.gz, t1c, t2, flair [, seg]",
        _detect_brats,
        _case_folders(_brats_role),
    ),
    Layout(
        "flat",
        "one folder of slices or volumes named by modality, e.g. BrainT1Slice.png + "
        "BrainProtonDensitySlice.png, or sub01_ct.nii.gz + sub01_mr.nii.gz",
        _detect_flat,
        _read_flat,
    ),
)


def recognised_layouts() -> str:
    return "recognised layouts:\n" + "\n".join(f"  {layout.name}: {layout.example}" for layout in LAYOUTS)


def _layout_named(name: str) -> Layout:
    for layout in LAYOUTS:
        if layout.name == name:
            return layout
    raise CrossdiffError(f"unknown layout {name!r}; {recognised_layouts()}")


def _detect(root: Path) -> Layout:
    for layout in LAYOUTS:
        if layout.detect(root):
            return layout
    raise InputError(root, f"no dataset layout recognised here; {recognised_layouts()}")


def _dataset_root(root: str | Path) -> Path:
    root = absolute_path(root)
    if not root.is_dir():
        raise InputError(root, "is not a folder; give the dataset's top folder")
    return root


# ----------------------------------------------------------------------------------- public API


def detect_layout(root: str | Path) -> str:
    """The name of the first layout in LAYOUTS that `root` matches; InputError listing them if none."""
    return _detect(_dataset_root(root)).name


@dataclass
class Scan:
    """What scanning a dataset found: the manifest, the layout used, whether folders fixed the splits,
    and notes for the user (how cases were formed, cases that look like one patient)."""

    manifest: Manifest
    layout: str
    splits_from_folders: bool
    notes: list[str]


def scan(
    root: str | Path, layout: str | None = None, prefer: str = "nifti", names: dict[str, str] | None = None,
    case_pattern: str | None = None,
) -> Manifest:
    """A manifest of every case under `root`; splits are 'train' unless the layout names them."""
    return scan_dataset(root, layout, prefer, names, case_pattern).manifest


def scan_dataset(
    root: str | Path, layout: str | None = None, prefer: str = "nifti", names: dict[str, str] | None = None,
    case_pattern: str | None = None,
) -> Scan:
    root = _dataset_root(root)
    if prefer not in FORMATS:
        raise CrossdiffError(f"prefer must be one of {', '.join(FORMATS)}, not {prefer!r}")
    options = Options(prefer, _compiled(case_pattern))
    chosen = _layout_named(layout) if layout else _detect(root)
    found = chosen.read(root, options)
    if not found.cases:
        raise InputError(root, f"no case with an image found as layout {chosen.name} ({chosen.example})")
    cases = dict(sorted(found.cases.items()))
    if names:
        _rename(cases, names, root)
    cases = {cid: _sorted_keys(case) for cid, case in cases.items()}
    _check_keys(cases, root)
    notes = list(found.notes) + same_patient_notes(cases)
    return Scan(Manifest(cases), chosen.name, found.splits_from_folders, notes)


def _compiled(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern)
    except re.error as error:
        raise CrossdiffError(f"--case-pattern {pattern!r} is not a valid regular expression ({error})") from None


def _sorted_keys(case: CaseEntry) -> CaseEntry:
    """Modalities in name order, so manifests of one dataset read alike whatever the file order."""
    return CaseEntry(dict(sorted(case.images.items())), case.mask, dict(sorted(case.labels.items())), case.split)


def _rename(cases: dict[str, CaseEntry], names: dict[str, str], root: Path) -> None:
    present = {key for case in cases.values() for key in case.images}
    unknown = sorted(set(names) - present)
    if unknown:
        raise InputError(
            root, f"cannot rename {', '.join(unknown)}: the dataset's modalities are {', '.join(sorted(present))}"
        )
    for case in cases.values():
        case.images = _renamed(case.images, names, root)
        case.labels = _renamed(case.labels, names, root)


def _renamed(files: dict[str, Path], names: dict[str, str], root: Path) -> dict[str, Path]:
    renamed = {names.get(key, key): path for key, path in files.items()}
    if len(renamed) != len(files):
        raise InputError(root, f"renaming {names} gives two modalities of one case the same name")
    return renamed


def _check_keys(cases: dict[str, CaseEntry], root: Path) -> None:
    bad = sorted(
        {key for case in cases.values() for key in [*case.images, *case.labels] if not MODALITY_KEY.match(key)}
    )
    if bad:
        rule = "lowercase letters, digits and '_', starting with a letter"
        raise InputError(root, f"modality name(s) {', '.join(bad)} are not {rule}; rename them with names={{...}}")


def prepare_manifest(root: str | Path, out: str | Path, **options: Any) -> Manifest:
    """`prepare_dataset`, returning just the manifest it wrote."""
    return prepare_dataset(root, out, **options).manifest


def prepare_dataset(
    root: str | Path,
    out: str | Path,
    layout: str | None = None,
    prefer: str = "nifti",
    val: float = 0.0,
    test: float = 0.2,
    seed: int = 0,
    names: dict[str, str] | None = None,
    check_readable: bool = False,
    case_pattern: str | None = None,
    units: dict[str, str] | None = None,
) -> Prepared:
    """Scan `root`, split it by case, decide how each modality is read, optionally read every file,
    and write the manifest to `out`.

    Splits named by the layout's folders (trainA/testA) are kept; `val` then carves validation cases
    out of their training cases (by case) and `test` is not applied, which the notes say. Reading
    decisions (units, from one file of each modality; `units` overrides them) go into the manifest's
    "modalities" section with their reasons.
    """
    found = scan_dataset(root, layout, prefer, names, case_pattern)
    manifest, notes = found.manifest, list(found.notes)
    if found.splits_from_folders:
        fixed = {cid: case.split for cid, case in manifest.cases.items() if case.split != "train"}
        if test:
            notes.append(f"the folders name the splits: --test {test:g} is not applied")
        if val:
            splits = assign_splits(manifest.cases, val=val, test=0.0, seed=seed, fixed=fixed)
            carved = sorted(cid for cid, split in splits.items() if split == "val" and cid not in fixed)
            notes.append(f"--val {val:g}: {len(carved)} training case(s) moved to validation ({', '.join(carved[:5])})")
            for cid, split in splits.items():
                manifest.cases[cid].split = split
    else:
        splits = assign_splits(manifest.cases, val=val, test=test, seed=seed)
        for cid, split in splits.items():
            manifest.cases[cid].split = split
    decisions = decide_reading(manifest, units or {})
    manifest = Manifest(manifest.cases, {key: decision.reading for key, decision in decisions.items()})
    if check_readable:
        _check_readable(manifest)
    save_manifest(manifest, out)
    return Prepared(manifest, found.layout, decisions, notes)


@dataclass(frozen=True)
class ModalityDecision:
    """How `prepare` will have a modality read: family, units with the reason, from which file."""

    family: str | None
    reading: Reading
    example: Path
    warning: bool


@dataclass
class Prepared:
    manifest: Manifest
    layout: str
    decisions: dict[str, ModalityDecision]
    notes: list[str]


def decide_reading(manifest: Manifest, units: dict[str, str]) -> dict[str, ModalityDecision]:
    """Read one file of each modality (the first case holding it) to decide its units, or take the
    user's `units`; the decision is written into the manifest so training and evaluation use it."""
    from crossdiff.data.cases import family_of
    from crossdiff.readers import read_volume
    from crossdiff.units import check_units

    unknown = sorted(set(units) - set(manifest.modalities()))
    if unknown:
        raise CrossdiffError(f"--units names {', '.join(unknown)}, not modalities of this dataset "
                             f"({', '.join(manifest.modalities())})")
    decisions = {}
    for key in manifest.modalities():
        cid = manifest.cases_with(key)[0]
        ref = manifest.cases[cid].images[key]
        example = ref_files(ref)[0]
        if key in units:
            chosen = check_units(units[key], f"--units {key}")
            decisions[key] = ModalityDecision(family_of(key), Reading(chosen, why=f"{chosen}, as given "
                                                                                  "(--units)"), example, False)
            continue
        volume = read_volume(ref, modality=family_of(key))
        why = f"{volume.evidence.get('units', '')} (read from case {cid}); modality {volume.evidence.get('modality', '')}"
        decisions[key] = ModalityDecision(volume.modality, Reading(volume.units, why=why), example, bool(volume.warnings))
    return decisions


def _check_readable(manifest: Manifest) -> None:
    """Read every file now, so a broken one is found while preparing rather than hours into training;
    one error lists every case at fault."""
    from crossdiff.data.cases import (
        check_case,  # here: it pulls in registration, which scanning never needs
    )

    problems = []
    for cid, case in manifest.cases.items():
        try:
            check_case(cid, case)
        except InputError as error:
            problems.append(f"case {cid!r}: {error}")
    if problems:
        raise InputError(None, f"{len(problems)} case(s) have a file that cannot be used:\n  " + "\n  ".join(problems))
