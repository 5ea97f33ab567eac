"""Find the cases in a dataset folder, in whichever public layout it arrives.

Users bring data as it was published (SynthRAD, BraTS, pix2pix/CycleGAN folders, TCIA-style
modality folders, loose slices) rather than reshaping it for us. Each layout is one row of LAYOUTS:
how to recognise it and how to read its cases, so a new layout touches nothing else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from crossdiff.data.manifest import (
    MODALITY_KEY,
    SPLITS,
    CaseEntry,
    Manifest,
    absolute_path,
    assign_splits,
    save_manifest,
)
from crossdiff.errors import CrossdiffError, InputError
from crossdiff.readers import SLICE_SUFFIXES, VOLUME_SUFFIXES

IMAGE_SUFFIXES = VOLUME_SUFFIXES + SLICE_SUFFIXES
FORMATS = ("nifti", "dicom")


class Found(NamedTuple):
    """What a layout reader returns: the cases, and whether folder names fixed their splits."""

    cases: dict[str, CaseEntry]
    splits_from_folders: bool = False


@dataclass(frozen=True)
class Layout:
    name: str
    example: str
    detect: Callable[[Path], bool]
    read: Callable[[Path, str], Found]


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


def _case_folders(role_of: RoleOf) -> Callable[[Path, str], Found]:
    """A reader for layouts with one folder per case (at any depth), named after the case."""

    def read(root: Path, prefer: str) -> Found:
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


def _read_pix2pix(root: Path, prefer: str) -> Found:
    """Files with one stem in A and B form a paired case; a file on one side only, an unpaired one."""
    cases: dict[str, CaseEntry] = {}
    folders = _pix2pix_folders(root)
    for split, key, folder in folders:
        for stem, path in _images_in(folder):
            case = cases.setdefault(stem, CaseEntry({}, split=split or "train"))
            if case.split != (split or "train"):
                problem = (
                    f"case {stem!r} is both in {case.split} and in {split or 'train'}; a case belongs to one split"
                )
                raise InputError(path, problem)
            _add(case.images, key, path, folder)
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


def _read_modality_folders(root: Path, prefer: str) -> Found:
    """Tumour masks in `<MOD>/nifti/mask/` become labels on that modality's grid, not body masks."""
    cases: dict[str, CaseEntry] = {}
    for case_dir in _subfolders(root):
        folders = _modality_folders(case_dir)
        keys = _folder_keys([folder.name for folder in folders])
        case = CaseEntry({})
        for folder in folders:
            image = _modality_image(folder, prefer)
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


def _read_flat(root: Path, prefer: str) -> Found:
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


def scan(
    root: str | Path, layout: str | None = None, prefer: str = "nifti", names: dict[str, str] | None = None
) -> Manifest:
    """A manifest of every case under `root`; splits are 'train' unless the layout names them."""
    return _scan(root, layout, prefer, names)[0]


def _scan(root: str | Path, layout: str | None, prefer: str, names: dict[str, str] | None) -> tuple[Manifest, bool]:
    root = _dataset_root(root)
    if prefer not in FORMATS:
        raise CrossdiffError(f"prefer must be one of {', '.join(FORMATS)}, not {prefer!r}")
    chosen = _layout_named(layout) if layout else _detect(root)
    found = chosen.read(root, prefer)
    if not found.cases:
        raise InputError(root, f"no case with an image found as layout {chosen.name} ({chosen.example})")
    cases = dict(sorted(found.cases.items()))
    if names:
        _rename(cases, names, root)
    cases = {cid: _sorted_keys(case) for cid, case in cases.items()}
    _check_keys(cases, root)
    return Manifest(cases), found.splits_from_folders


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


def prepare_manifest(
    root: str | Path,
    out: str | Path,
    layout: str | None = None,
    prefer: str = "nifti",
    val: float = 0.0,
    test: float = 0.2,
    seed: int = 0,
    names: dict[str, str] | None = None,
    check_readable: bool = False,
) -> Manifest:
    """Scan `root`, split it by case, optionally read every file, and write the manifest to `out`.

    Splits named by the layout's folders (trainA/testA) are kept as they are and `val`/`test` are
    then not applied; otherwise cases are drawn with `assign_splits(val, test, seed)`.
    """
    manifest, splits_from_folders = _scan(root, layout, prefer, names)
    if not splits_from_folders:
        splits = assign_splits(manifest.cases, val=val, test=test, seed=seed)
        for cid, split in splits.items():
            manifest.cases[cid].split = split
    if check_readable:
        _check_readable(manifest)
    save_manifest(manifest, out)
    return manifest


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
