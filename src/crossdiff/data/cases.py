"""A case made ready for learning: every modality on one grid, scaled to [-1, 1], with a mask of where voxels count.

Preparing a case reads its files, resamples (optionally registers) every modality onto the reference
modality's grid through physical space, builds the body mask, and fits the intensity scalings. That
costs seconds per case (registration dominates), so prepared cases are cached on disk keyed by the
files and the settings: training epochs and repeated runs never redo it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from crossdiff.atomic import atomic_path, write_json
from crossdiff.config_schema import check_preparation, check_section
from crossdiff.data.manifest import CaseEntry, ref_files
from crossdiff.errors import InputError
from crossdiff.intensity import IntensityScaling, default_method, fit_scaling
from crossdiff.masks import body_mask
from crossdiff.readers import read_mask, read_volume
from crossdiff.registration import SLICE_TRANSFORMS, register_checked, register_slices
from crossdiff.volumes import Geometry, Volume, coverage, resample_to

CACHE_VERSION = 2
FAMILY_OF_KEY = {"ct": "CT", "sct": "CT", "cbct": "CT", "pet": "PET", "pt": "PET"}
MR_KEYS = ("mr", "t1", "t1c", "t1n", "t2", "flair", "pd")


def family_of(key: str) -> str | None:
    """Modality family ('CT', 'MR', 'PET') of a manifest key; None lets the reader guess (e.g. pix2pix 'a')."""
    if key in FAMILY_OF_KEY:
        return FAMILY_OF_KEY[key]
    return "MR" if key.startswith(MR_KEYS) else None


@dataclass
class PreparedCase:
    """One case after pairing, registration, masking and normalisation.

    `images` maps a modality key (e.g. 'mr', 'ct') to a float32 array (z, y, x) in [-1, 1], all on
    `geometry`; `mask` (bool, same shape) is True where the body is and every image has data (fields
    of view differ between modalities); `scalings` undo the normalisation per modality.
    Unpaired datasets hold cases with a single modality. `planar`: the case is a stack of 2-D images
    without a known distance between them (PNG slices), scored slice by slice. `notes` are the
    preparation's warnings (e.g. a registration that was not kept), for training records and reports.
    """

    case_id: str
    images: dict[str, np.ndarray]
    mask: np.ndarray
    geometry: Geometry
    scalings: dict[str, IntensityScaling] = field(default_factory=dict)
    planar: bool = False
    notes: list[str] = field(default_factory=list)

    def physical(self, key: str) -> Volume:
        """The image `key` back in physical units (HU, SUV, ...), on the case grid."""
        scaling = self.scalings[key]
        return Volume(scaling.invert(self.images[key]), self.geometry, family_of(key), scaling.units, planar=self.planar)


@dataclass
class PreparationConfig:
    """How cases become PreparedCase objects; saved beside models so inference repeats it exactly.

    `reference`: the modality whose grid everything is resampled onto (the target, e.g. 'ct', so
    metrics are computed on the original reference voxels). `registration`: 'none', 'rigid',
    'affine' or 'bspline' (moving = every other modality). `scaling`: per-modality method overrides
    (see crossdiff.intensity.fit_scaling); windows/percentiles apply to the methods that use them.
    `spacing`: (x, y) millimetres of the working grid, slice spacing kept (None: the reference's own).
    A fixed working spacing gives the network the same anatomy per pixel whatever grid a scan comes on;
    inference resamples every input to it and the result back (crossdiff.inference).
    """

    modalities: list[str]
    reference: str | None = None
    registration: str = "none"
    scaling: dict[str, str] = field(default_factory=dict)
    ct_window: tuple[float, float] = (-1024.0, 3000.0)
    suv_window: tuple[float, float] = (0.0, 20.0)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    spacing: tuple[float, float] | None = None
    seed: int = 0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> PreparationConfig:
        known = dict(check_section("preparation", data, cls))
        for name in ("ct_window", "suv_window", "mr_percentiles", "spacing"):
            if known.get(name) is not None:
                known[name] = tuple(known[name])  # type: ignore[arg-type]
        config = cls(**known)  # type: ignore[arg-type]
        check_preparation(config)
        return config


def prepare_case(
    case_id: str,
    entry: CaseEntry,
    config: PreparationConfig,
    cache_dir: Path | None = None,
) -> PreparedCase:
    """Read, align, mask and scale the configured modalities of one case (from the cache when possible)."""
    keys = [key for key in config.modalities if key in entry.images]
    if not keys:
        raise InputError(None, f"case {case_id} has none of the modalities {', '.join(config.modalities)}")
    cache_file = cache_dir / f"{case_id}-{_cache_key(entry, keys, config)}.npz" if cache_dir else None
    if cache_file is not None and cache_file.exists():
        return _load_cached(cache_file, case_id)
    case = _prepare_uncached(case_id, entry, keys, config)
    if cache_file is not None:
        _save_cached(case, cache_file)
    return case


def prepare_cases(
    cases: Iterable[tuple[str, CaseEntry]],
    config: PreparationConfig,
    cache_dir: Path | None = None,
    on_case: Callable[[str], None] | None = None,
) -> list[PreparedCase]:
    """Prepare several cases; `on_case` is called after each (for a progress bar)."""
    prepared = []
    for case_id, entry in cases:
        prepared.append(prepare_case(case_id, entry, config, cache_dir))
        if on_case is not None:
            on_case(case_id)
    return prepared


def read_modality(entry: CaseEntry, key: str) -> Volume:
    """One modality of a case, read with the family its key names and the manifest's reading settings."""
    reading = entry.reading_of(key)
    return read_volume(entry.images[key], modality=family_of(key), units=reading.units, colour=reading.colour,
                       key=reading.key)


def check_case(case_id: str, entry: CaseEntry, reference: str | None = None) -> list[str]:
    """Read every image, mask and label map of a case; masks must lie on their image's grid.

    The body mask belongs to the reference modality (default 'ct' when present, else the first);
    a label map keyed by a modality belongs to that modality. Returns the modality keys read.
    """
    volumes = {key: read_modality(entry, key) for key in entry.images}
    if not volumes:
        raise InputError(None, f"case {case_id} lists no images")
    reference_key = reference if reference in volumes else ("ct" if "ct" in volumes else next(iter(volumes)))
    if entry.mask:
        read_mask(entry.mask, volumes[reference_key])
    for key, label in entry.labels.items():
        read_mask(label, volumes.get(key, volumes[reference_key]))
    return list(volumes)


def _prepare_uncached(case_id: str, entry: CaseEntry, keys: list[str], config: PreparationConfig) -> PreparedCase:
    volumes = {key: read_modality(entry, key) for key in keys}
    reference_key = config.reference if config.reference in volumes else keys[0]
    reference = volumes[reference_key]
    given = read_mask(entry.mask, reference) if entry.mask else None
    if config.spacing is not None:
        grid = reference.geometry.with_spacing((*config.spacing, reference.geometry.spacing[2]))
        reference = resample_to(reference, grid)
        given = resample_to(given, grid, "nearest", 0) if given is not None else None
    mask = (given if given is not None else body_mask(reference)).array.astype(bool)
    aligned = {reference_key: reference}
    notes = [f"{key}: {warning}" for key, volume in volumes.items() for warning in volume.warnings]
    body = mask.copy()
    for key, volume in volumes.items():
        if key == reference_key:
            continue
        aligned[key], field_of_view, note = _align(volume, reference, body, config)
        mask &= field_of_view
        notes += [f"{key}: {note}"] if note else []
    if not mask.any():
        raise InputError(ref_files(entry.images[reference_key])[0], f"case {case_id}: the modalities do not overlap inside "
                                                                    "the body")
    scalings = {key: _fit(key, volume, mask, config) for key, volume in aligned.items()}
    images = {key: scalings[key].apply(volume.array) for key, volume in aligned.items()}
    return PreparedCase(case_id, images, mask, reference.geometry, scalings, reference.planar, notes)


def _align(
    volume: Volume, reference: Volume, reference_body: np.ndarray, config: PreparationConfig
) -> tuple[Volume, np.ndarray, str | None]:
    """Bring `volume` onto the reference grid; return it, the region it actually covers, and a note
    when the registration was not kept or (slice-wise) what it achieved."""
    if config.registration == "none":
        return resample_to(volume, reference), coverage(volume, reference), None
    if config.registration in SLICE_TRANSFORMS:
        on_grid = resample_to(volume, reference)
        moving_body = body_mask(on_grid).array.astype(bool)
        slices = register_slices(reference, on_grid, reference_body, moving_body, config.registration, config.seed)
        moved = sum(int(row["kept"]) for row in slices.rows)
        note = (f"slice-wise {config.registration}: body-mask Dice {slices.dice('before'):.3f} -> "
                f"{slices.dice('after'):.3f} ({moved} of {len(slices.rows)} slices moved)")
        return slices.volume, slices.covered & coverage(volume, reference), note
    checked = register_checked(reference, volume, transform=config.registration, seed=config.seed)
    return checked.volume, checked.covered, None if checked.kept else checked.describe(f"{config.registration} registration")


def _fit(key: str, volume: Volume, mask: np.ndarray, config: PreparationConfig) -> IntensityScaling:
    method = config.scaling.get(key)
    window = {"ct-window": config.ct_window, "suv": config.suv_window}.get(method or default_method(volume))
    return fit_scaling(volume, mask, method, window=window, percentiles=config.mr_percentiles)


def _cache_key(entry: CaseEntry, keys: list[str], config: PreparationConfig) -> str:
    """Changes when any input file, the mask, a reading setting or a preparation setting changes."""
    files = [f for key in keys for f in ref_files(entry.images[key])] + ([entry.mask] if entry.mask else [])
    stamp = [(str(Path(f).resolve()), *_file_stamp(Path(f))) for f in files]
    reading = {key: entry.reading_of(key).to_dict() for key in keys}
    payload = json.dumps([CACHE_VERSION, keys, stamp, reading, config.to_dict()], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _file_stamp(path: Path) -> tuple[int, int]:
    """Size and mtime; a DICOM folder is stamped by its files."""
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    stats = [f.stat() for f in files if f.is_file()]
    return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)


def _save_cached(case: PreparedCase, path: Path) -> None:
    """Metadata first, arrays last: the .npz existing is what marks a complete cache entry."""
    write_json(
        path.with_suffix(".json"),
        {"geometry": asdict(case.geometry), "scalings": {k: s.to_dict() for k, s in case.scalings.items()},
         "planar": case.planar, "notes": case.notes},
    )
    with atomic_path(path) as tmp:
        with tmp.open("wb") as handle:
            np.savez_compressed(handle, mask=case.mask, **{f"image_{k}": v for k, v in case.images.items()})


def _load_cached(path: Path, case_id: str) -> PreparedCase:
    meta = json.loads(path.with_suffix(".json").read_text())
    with np.load(path) as arrays:
        images = {name.removeprefix("image_"): arrays[name] for name in arrays.files if name.startswith("image_")}
        mask = arrays["mask"]
    geometry = Geometry(**{k: tuple(v) for k, v in meta["geometry"].items()})  # type: ignore[arg-type]
    scalings = {k: IntensityScaling.from_dict(v) for k, v in meta["scalings"].items()}
    return PreparedCase(case_id, images, mask, geometry, scalings, bool(meta.get("planar")), list(meta.get("notes", [])))
