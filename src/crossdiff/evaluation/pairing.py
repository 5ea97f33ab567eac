"""Which prediction goes with which reference (and mask): single files, folders matched by file name,
or dataset manifests. Everything is resolved, and every problem named, before any image is read.

- two files: one case, named after the prediction file;
- two folders of image files (NIfTI, MHA/MHD, NRRD): files matched by name without the suffix, so
  `pred/STS_001.nii.gz` goes with `ref/STS_001.mha`; a folder without such files is one image
  (a DICOM series or PNG slices);
- a reference manifest (.json/.csv from `crossdiff prepare`): its cases holding the `key` modality
  (optionally one split); predictions in a folder named by case id, or in a manifest under the same key;
  its body masks are used unless `--mask` is given (cases without one get the automatic body mask).
Every prediction needs a reference; references without a prediction are skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from crossdiff.data.manifest import load_manifest
from crossdiff.errors import InputError
from crossdiff.readers import VOLUME_SUFFIXES

MANIFEST_SUFFIXES = (".json", ".csv")


@dataclass(frozen=True)
class EvaluationCase:
    name: str
    prediction: Path
    reference: Path
    mask: Path | None = None


@dataclass(frozen=True)
class Pairing:
    cases: list[EvaluationCase]
    unmatched_references: list[str]


def pair_inputs(
    prediction: Path, reference: Path, mask: Path | None = None, key: str = "ct", split: str | None = None
) -> Pairing:
    """Resolve --pred/--ref/--mask into cases; InputError naming the path for anything that does not fit."""
    for path in (prediction, reference, mask):
        if path is not None and not path.exists():
            raise InputError(path, "does not exist")
    if _is_manifest(reference):
        return _from_manifest(prediction, reference, mask, key, split)
    ref_files, pred_files = image_files(reference), image_files(prediction)
    if ref_files is None and pred_files is None:
        if mask is not None and image_files(mask) is not None:
            raise InputError(mask, "is a folder of masks, but --pred and --ref are single images: give one mask file")
        return Pairing([EvaluationCase(case_name(prediction), prediction, reference, mask)], [])
    if ref_files is None or pred_files is None:
        single, folder = (reference, prediction) if ref_files is None else (prediction, reference)
        raise InputError(single, f"is a single image but {folder} is a folder of images: give two files or two folders")
    masks = _mask_files(mask)
    return _match(prediction, pred_files, reference, ref_files, masks)


def image_files(path: Path) -> dict[str, Path] | None:
    """{name: file} of the image files in a folder, or None when `path` is one image (file, DICOM or PNG folder)."""
    if not path.is_dir():
        return None
    files = {}
    for entry in sorted(path.iterdir()):
        if entry.is_file() and not entry.name.startswith(".") and entry.name.lower().endswith(VOLUME_SUFFIXES):
            files[case_name(entry)] = entry
    return files or None


def case_name(path: Path) -> str:
    """The file name without its image suffix ('STS_001.nii.gz' -> 'STS_001')."""
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_manifest(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(MANIFEST_SUFFIXES)


def _mask_files(mask: Path | None) -> dict[str, Path] | None:
    if mask is None:
        return None
    files = image_files(mask)
    if files is None:
        raise InputError(mask, "must be a folder of masks named like the references when --pred and --ref are folders")
    return files


def _match(
    pred_root: Path, predictions: dict[str, Path], ref_root: Path, references: dict[str, Path], masks: dict[str, Path] | None
) -> Pairing:
    matched = [name for name in predictions if name in references]
    if not matched:
        raise InputError(
            pred_root,
            f"no file matches a reference in {ref_root} by name (predictions: {_listing(predictions)}; "
            f"references: {_listing(references)})",
        )
    orphans = [name for name in predictions if name not in references]
    if orphans:
        raise InputError(pred_root, f"no reference in {ref_root} for {_listing(orphans)}")
    cases = []
    for name in matched:
        mask_file = None
        if masks is not None:
            if name not in masks:
                raise InputError(references[name], f"has no mask named {name} in the mask folder")
            mask_file = masks[name]
        cases.append(EvaluationCase(name, predictions[name], references[name], mask_file))
    return Pairing(cases, sorted(set(references) - set(matched)))


def _from_manifest(prediction: Path, reference: Path, mask: Path | None, key: str, split: str | None) -> Pairing:
    manifest = load_manifest(reference)
    ids = [cid for cid in manifest.cases_with(key) if split is None or manifest.cases[cid].split == split]
    if not ids:
        where = f" in split {split!r}" if split else ""
        raise InputError(reference, f"has no case with a {key!r} image{where} (modalities: {', '.join(manifest.modalities())})")
    references = {cid: manifest.cases[cid].images[key] for cid in ids}
    if _is_manifest(prediction):
        predicted = load_manifest(prediction)
        predictions = {cid: predicted.cases[cid].images[key] for cid in predicted.cases_with(key)}
    else:
        predictions = image_files(prediction) or {}
    predictions = {cid: path for cid, path in predictions.items() if cid in references or split is None}
    pairing = _match(prediction, predictions, reference, references, _mask_files(mask))
    if mask is not None:
        return pairing
    with_masks = [replace(case, mask=manifest.cases[case.name].mask) for case in pairing.cases]
    return Pairing(with_masks, pairing.unmatched_references)


def _listing(names: dict[str, Path] | list[str], limit: int = 5) -> str:
    names = list(names)
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")
