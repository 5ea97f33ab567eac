"""The built-in default job on the bundled sarcoma patient (STS_003).

No translation model ships yet, so the demo runs the data pipeline every method stands on: read CT,
MR and PET, bring MR and PET onto the CT grid (MR rigidly registered), build the body mask, scale
intensities to [-1, 1], and write the results with a preview and a summary of the alignment.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from crossdiff.atomic import atomic_directory, write_json, write_text
from crossdiff.data.cases import PreparationConfig, PreparedCase, prepare_case
from crossdiff.data.manifest import CaseEntry
from crossdiff.errors import InputError
from crossdiff.preview import Panel, save_panels
from crossdiff.registration import normalized_mutual_information
from crossdiff.volumes import Volume, write_volume

SAMPLE_DIR = Path(__file__).parent / "sample"
SAMPLE_CASE = "STS_003"
SAMPLE_MODALITIES = ("ct", "mr", "pet")
BONE_HU = 250.0


@dataclass(frozen=True)
class DemoResult:
    out: Path
    nmi_before: float
    nmi_after: float
    seconds: float
    files: list[str]


def sample_entry(sample_dir: Path = SAMPLE_DIR) -> CaseEntry:
    """The bundled case, after checking every file against SHA256SUMS (a damaged copy is refused)."""
    sums = sample_dir / "SHA256SUMS"
    if not sums.is_file():
        raise InputError(sums, "the bundled sample's checksum list is missing; reinstall crossdiff")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        file = sample_dir / name.strip()
        if not file.is_file():
            raise InputError(file, "bundled sample file is missing; reinstall crossdiff")
        if hashlib.sha256(file.read_bytes()).hexdigest() != digest:
            raise InputError(file, "bundled sample file is damaged (checksum mismatch); reinstall crossdiff")
    return CaseEntry(images={key: sample_dir / SAMPLE_CASE / f"{key}.nii.gz" for key in SAMPLE_MODALITIES})


def run_demo(out: Path, registration: str = "rigid", seed: int = 0, sample_dir: Path = SAMPLE_DIR) -> DemoResult:
    """Prepare the sample twice (plain resampling, then with registration) and write what it shows."""
    start = time.perf_counter()
    entry = sample_entry(sample_dir)
    config = PreparationConfig(modalities=list(SAMPLE_MODALITIES), reference="ct", registration=registration, seed=seed)
    unregistered = prepare_case(SAMPLE_CASE, entry, PreparationConfig(**{**config.to_dict(), "registration": "none"}))
    registered = prepare_case(SAMPLE_CASE, entry, config)
    mask = registered.mask & unregistered.mask
    nmi_before = normalized_mutual_information(unregistered.images["ct"], unregistered.images["mr"], mask)
    nmi_after = normalized_mutual_information(registered.images["ct"], registered.images["mr"], mask)
    with atomic_directory(out) as folder:
        files = _write_outputs(folder, registered)
        _write_preview(folder / "preview.png", unregistered, registered, nmi_before, nmi_after)
        write_text(folder / "config.yaml", yaml.safe_dump({"case": SAMPLE_CASE, "preparation": config.to_dict()}))
        seconds = time.perf_counter() - start
        write_json(
            folder / "summary.json",
            {
                "case": SAMPLE_CASE,
                "registration": registration,
                "nmi_mr_ct_before": nmi_before,
                "nmi_mr_ct_after": nmi_after,
                "body_mask_voxels": int(registered.mask.sum()),
                "scalings": {key: s.to_dict() for key, s in registered.scalings.items()},
                "seconds": seconds,
            },
        )
        files += ["preview.png", "config.yaml", "summary.json"]
    return DemoResult(out, nmi_before, nmi_after, seconds, files)


def _write_outputs(folder: Path, case: PreparedCase) -> list[str]:
    names = []
    for key, image in case.images.items():
        name = f"{key}_normalised.nii.gz"
        write_volume(Volume(image, case.geometry, units="[-1, 1]"), folder / name)
        names.append(name)
    write_volume(Volume(case.mask.astype(np.uint8), case.geometry, modality="mask"), folder / "body_mask.nii.gz")
    return names + ["body_mask.nii.gz"]


def _write_preview(path: Path, before: PreparedCase, after: PreparedCase, nmi_before: float, nmi_after: float) -> None:
    """The axial slice with the most bone; the CT bone outline over the MR shows how well they align."""
    ct = after.physical("ct").array
    bone = ct > BONE_HU
    z = int(np.argmax((bone & after.mask).sum(axis=(1, 2))))
    spacing = after.geometry.spacing
    panels = [
        Panel("CT (HU)", ct[z], -400, 600, overlay=after.mask[z]),
        Panel(f"MR resampled, NMI {nmi_before:.3f}", before.images["mr"][z], -1, 1, overlay=bone[z]),
        Panel(f"MR registered, NMI {nmi_after:.3f}", after.images["mr"][z], -1, 1, overlay=bone[z]),
        Panel("PET (SUV)", after.physical("pet").array[z], 0, 5, cmap="magma", overlay=after.mask[z]),
    ]
    title = f"{SAMPLE_CASE}, axial slice {z} on the CT grid (outlines: body inside every field of view on CT/PET, CT bone > {BONE_HU:g} HU on MR)"
    save_panels(panels, path, title=title, aspect=spacing[1] / spacing[0])
