"""Recognisable patient-identifying values planted in a copy of a real series, and a search for them in outputs.

The values are chosen so that no image, UID or number could contain them by chance.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import pydicom

PHI = {
    "PatientName": "Quixotehaven^Zebulonia",
    "PatientID": "PHI-ID-8675309",
    "PatientBirthDate": "19010203",
    "AccessionNumber": "ACC55512349",
    "InstitutionName": "Saint Recognisable Infirmary",
    "InstitutionalDepartmentName": "Recognisable Oncology",
}
# What must never appear: every value, and each part of the name on its own.
NEEDLES = sorted({*PHI.values(), *PHI["PatientName"].split("^")})

def copy_with_phi(source: Path, target: Path) -> Path:
    """Copy the series in `source` to `target`, with PHI set in every file."""
    target.mkdir(parents=True)
    for file in sorted(source.glob("*.dcm")):
        dataset = pydicom.dcmread(file)
        for keyword, value in PHI.items():
            setattr(dataset, keyword, value)
        dataset.save_as(target / file.name)
    return target

def readable_text(path: Path) -> str:
    """A file's bytes as text (decompressed if gzip), so a value stored anywhere in it is found."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("latin-1")

def phi_found(text: str) -> list[str]:
    return [needle for needle in NEEDLES if needle.lower() in text.lower()]

def phi_in_files(folder: Path, skip_dicom: bool = True) -> dict[str, list[str]]:
    """{file: PHI values found} for every file under `folder` (DICOM files, which carry the patient by design, skipped)."""
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        if skip_dicom and path.suffix == ".dcm":
            continue
        hits = phi_found(readable_text(path))
        if hits:
            found[str(path)] = hits
    return found

