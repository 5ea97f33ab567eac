"""`crossdiff study create`: pick cases and slices, and write a blinded study folder.

For each picked slice the real target and every method's output of that slice become items; each item
gets a random id (not derived from anything a reader could recompute), the items are shuffled, and
only `key.json` says which is which. Inputs are a benchmark results folder or folders matched by name.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crossdiff.atomic import atomic_directory, write_json, write_text
from crossdiff.errors import InputError
from crossdiff.evaluation.pairing import image_files
from crossdiff.masks import body_mask
from crossdiff.readers import read_mask, read_volume
from crossdiff.study.images import case_windows, display_windows, write_png
from crossdiff.study.layout import (
    DEFAULT_QUESTIONS,
    FORMAT,
    IMAGES,
    KEY_FILE,
    REAL,
    STUDY_FILE,
    TOKEN_FILE,
    Question,
    Study,
)
from crossdiff.volumes import Volume

MIN_BODY_FRACTION = 0.5  # slices showing at least half the largest body cross-section of the case


@dataclass(frozen=True)
class StudyInputs:
    """Real target images and each method's output of the same cases, matched by case name."""

    references: dict[str, Path]
    methods: dict[str, dict[str, Path]]
    masks: dict[str, Path] | None = None
    origin: Path | None = None  # the folder the references came from, named in errors


@dataclass(frozen=True)
class StudySettings:
    cases: int = 4
    slices: int = 5
    seed: int = 0
    modality: str = "auto"  # auto, ct or mr
    title: str = "Reader study"
    questions: Sequence[Question] = field(default_factory=lambda: list(DEFAULT_QUESTIONS))


@dataclass(frozen=True)
class _Case:
    name: str
    images: dict[str, Volume]  # REAL and each method
    slices: list[int]
    windows: dict[str, tuple[float, float]]


def inputs_from_run(run: Path) -> StudyInputs:
    """A `crossdiff benchmark` results folder: cases/reference, cases/mask and translations/METHOD."""
    cases = run / "cases"
    if not (cases / "reference").is_dir():
        targets = sorted(p.name for p in run.iterdir() if (p / "cases" / "reference").is_dir()) if run.is_dir() else []
        hint = f"; it holds one benchmark per target: give {run / targets[0]}" if targets else ""
        raise InputError(run, f"is not a benchmark results folder (no cases/reference){hint}")
    translations = run / "translations"
    methods = sorted(p for p in translations.iterdir() if p.is_dir()) if translations.is_dir() else []
    if not methods:
        raise InputError(run, "has no translations/METHOD folder: the benchmark translated nothing yet")
    masks = image_files(cases / "mask") if (cases / "mask").is_dir() else None
    return _inputs(cases / "reference", {p.name: p for p in methods}, masks)


def inputs_from_folders(reference: Path, methods: Mapping[str, Path], mask: Path | None = None) -> StudyInputs:
    """A folder of real images and a folder per method (files matched by name, like `crossdiff evaluate`)."""
    for path in (reference, *methods.values(), *([mask] if mask else [])):
        if not path.is_dir():
            raise InputError(path, "is not a folder (give folders of images matched by file name)")
    masks = None
    if mask is not None:
        masks = image_files(mask)
        if masks is None:
            raise InputError(mask, "holds no image file (NIfTI, MHA/MHD, NRRD)")
    return _inputs(reference, dict(methods), masks)


def _inputs(reference: Path, methods: dict[str, Path], masks: dict[str, Path] | None) -> StudyInputs:
    if not methods:
        raise InputError(reference, "a study needs at least one method's output beside the real images (--method NAME=DIR)")
    if REAL in methods:
        raise InputError(methods[REAL], f"{REAL!r} names the real images in a study; rename this method")
    references = image_files(reference)
    if references is None:
        raise InputError(reference, "holds no image file (NIfTI, MHA/MHD, NRRD)")
    outputs = {}
    for name, folder in methods.items():
        files = image_files(folder)
        if files is None:
            raise InputError(folder, f"holds no image file for method {name}")
        outputs[name] = files
    return StudyInputs(references, outputs, masks, reference)


def create_study(inputs: StudyInputs, out: Path, settings: StudySettings = StudySettings()) -> Study:
    """Pick `settings.cases` cases among those every method translated and `settings.slices` slices of each
    (seeded), write every item's PNGs, the study description, the key and the access token into `out`
    (all or nothing). An existing `out` is never overwritten: its scores would stop matching its images."""
    out = Path(out)
    if out.exists():
        raise InputError(out, "already exists; a study is never overwritten (its scores belong to its images): "
                              "choose another --out")
    rng = np.random.default_rng(settings.seed)
    cases = [_read_case(name, inputs, settings, rng) for name in _pick_cases(inputs, settings.cases, rng)]
    kinds = {case.name: _is_ct(case) for case in cases}
    if len(set(kinds.values())) > 1:
        raise InputError(inputs.origin, "the picked cases mix CT and other modalities; pass --modality ct or mr")
    ct = next(iter(kinds.values()))
    entries = [(case, z, source) for case in cases for z in case.slices for source in case.images]
    ids = _unique_ids(len(entries))
    order = rng.permutation(len(entries))
    windows = display_windows(ct)
    study = Study(out, settings.title, settings.seed, "CT" if ct else "MR", tuple(settings.questions), windows,
                  tuple(ids[i] for i in order))
    with atomic_directory(out, private=(TOKEN_FILE,)) as folder:
        for item, (case, z, source) in zip(ids, entries):
            volume = case.images[source]
            aspect = volume.geometry.spacing[1] / volume.geometry.spacing[0]
            for window in windows:
                write_png(folder / IMAGES / f"{item}.{window.name}.png", volume.array[z], case.windows[window.name], aspect)
        write_json(folder / STUDY_FILE, study.description())
        write_json(folder / KEY_FILE, _key(inputs, cases, ids, entries))
        write_text(folder / TOKEN_FILE, secrets.token_urlsafe(24) + "\n")
    return study


def _pick_cases(inputs: StudyInputs, count: int, rng: np.random.Generator) -> list[str]:
    complete = sorted(name for name in inputs.references if all(name in files for files in inputs.methods.values()))
    if count < 1 or len(complete) < count:
        raise InputError(inputs.origin, f"asked for {count} case(s); {len(complete)} case(s) have the real image and "
                                        f"every method's output ({', '.join(inputs.methods)})")
    return sorted(str(name) for name in rng.choice(complete, size=count, replace=False))


def _read_case(name: str, inputs: StudyInputs, settings: StudySettings, rng: np.random.Generator) -> _Case:
    forced = {"ct": "CT", "mr": "MR"}.get(settings.modality.lower())
    reference = read_volume(inputs.references[name], modality=forced)
    images = {REAL: reference}
    for method, files in inputs.methods.items():
        output = read_volume(files[name], modality=reference.modality)
        if not output.geometry.matches(reference.geometry):
            raise InputError(files[name], f"is not on the grid of its real image {inputs.references[name]}: "
                                          f"{output.geometry.describe_difference(reference.geometry)}")
        images[method] = output
    if inputs.masks is None:
        body = body_mask(reference).array.astype(bool)
    elif name in inputs.masks:
        body = read_mask(inputs.masks[name], reference).array.astype(bool)
    else:
        raise InputError(inputs.references[name], f"has no mask named {name} in the mask folder")
    area = body.sum(axis=(1, 2))
    candidates = np.flatnonzero(area >= MIN_BODY_FRACTION * area.max())
    if len(candidates) < settings.slices or settings.slices < 1:
        raise InputError(inputs.references[name], f"has {len(candidates)} slice(s) showing at least half of its largest "
                                                  f"body cross-section; asked for {settings.slices}")
    slices = sorted(int(z) for z in rng.choice(candidates, size=settings.slices, replace=False))
    hounsfield = reference.modality == "CT"
    return _Case(name, images, slices, case_windows(hounsfield, reference.array, body))


def _is_ct(case: _Case) -> bool:
    return case.images[REAL].modality == "CT"


def _unique_ids(count: int) -> list[str]:
    ids: list[str] = []
    while len(ids) < count:
        item = secrets.token_hex(6)
        ids += [] if item in ids else [item]
    return ids


def _key(inputs: StudyInputs, cases: list[_Case], ids: list[str], entries: list[tuple[_Case, int, str]]) -> dict:
    files = {case.name: {source: str(Path(_file(inputs, case.name, source)).resolve()) for source in case.images}
             for case in cases}
    return {
        "format": f"{FORMAT}-key",
        "version": 1,
        "methods": list(inputs.methods),
        "items": {item: {"case": case.name, "slice": z, "source": source} for item, (case, z, source) in zip(ids, entries)},
        "windows": {case.name: case.windows for case in cases},
        "files": files,
    }


def _file(inputs: StudyInputs, case: str, source: str) -> Path:
    return inputs.references[case] if source == REAL else inputs.methods[source][case]
