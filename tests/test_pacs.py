"""`crossdiff pacs` against a real Orthanc started here: pull the MR series (C-FIND, C-GET), translate it,
push the sCT and uncertainty series (C-STORE), then ask Orthanc itself (its REST API) what it holds.

Faults: an unreachable PACS, a study without MR, an MR series with a slice missing, a PACS that refuses
the push (this caller may not store), and one that acknowledges instances it discards (a Lua filter).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import REPO, SARCOMA, assert_clear_failure, crossdiff, needs_shared
from orthanc import READ_ONLY_AET, REFUSED_FROM, REFUSED_PATIENT, Orthanc, free_port, running_orthanc
from phi import phi_found, phi_in_files

pytestmark = needs_shared

MODEL = REPO / "src" / "crossdiff" / "sample" / "model"


def study_of(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture(scope="module")
def pacs(phi_mr_series: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace]:
    """Orthanc holding: the MR series with planted patient values, a CT-only study, and an MR series with a
    slice taken out of its middle."""
    work = tmp_path_factory.mktemp("pacs")
    gapped = work / "gapped"
    gapped.mkdir()
    slices = sorted((SARCOMA / "STS_002" / "MR_T1" / "dicom" / "image").glob("*.dcm"))
    for file in slices[: len(slices) // 2] + slices[len(slices) // 2 + 1 :]:
        shutil.copy(file, gapped / file.name)
    ct_only = SARCOMA / "STS_001" / "CT" / "dicom" / "image"
    with running_orthanc(work / "orthanc") as orthanc:
        for folder in (phi_mr_series, ct_only, gapped):
            orthanc.upload(sorted(folder.glob("*.dcm")))
        yield SimpleNamespace(orthanc=orthanc, mr=phi_mr_series, mr_study=study_of(phi_mr_series),
                              ct_study=study_of(ct_only), gapped_study=study_of(gapped), gapped=gapped)


def run_pacs(orthanc: Orthanc, study: str, out: Path, *extra: object, port: int | None = None):
    return crossdiff("pacs", "--model", MODEL, "--study", study, "--out", out, "--port", port or orthanc.dicom_port,
                     "--steps", 2, *extra)


def assert_push_failure(run, *fragments: str) -> None:
    """Exit 1, no traceback, and one error line naming what failed; warnings about the written series may precede it."""
    assert run.returncode == 1, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and run.stderr.strip().endswith(errors[0].strip()), run.stderr
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"


def new_series(orthanc: Orthanc, study: str) -> dict[str, dict]:
    """Series of the study in Orthanc that are not MR, by SeriesInstanceUID."""
    found = orthanc.rest("/tools/find", f'{{"Level": "Series", "Query": {{"StudyInstanceUID": "{study}"}}, '
                                        '"Expand": true}'.encode())
    return {s["MainDicomTags"]["SeriesInstanceUID"]: s for s in found if s["MainDicomTags"].get("Modality") != "MR"}


def test_round_trip_stores_the_sct_and_uncertainty_in_the_mr_frame_of_reference(pacs: SimpleNamespace, tmp_path: Path):
    run = run_pacs(pacs.orthanc, pacs.mr_study, tmp_path / "out", "--samples", 2)
    assert run.returncode == 0, run.stderr
    held = new_series(pacs.orthanc, pacs.mr_study)
    assert len(held) == 2
    mr = pydicom.dcmread(next(pacs.mr.glob("*.dcm")), stop_before_pixels=True)
    nifti = sitk.ReadImage(str(tmp_path / "out" / "sct.nii.gz"))
    by_count = {len(s["Instances"]): uid for uid, s in held.items()}
    sct_files = pacs.orthanc.download_series(by_count[nifti.GetSize()[2]], tmp_path / "from-pacs" / "sct")
    (pmap_file,) = pacs.orthanc.download_series(by_count[1], tmp_path / "from-pacs" / "uncertainty")
    for file in [*sct_files, pmap_file]:
        header = pydicom.dcmread(file, stop_before_pixels=True)
        assert (header.StudyInstanceUID, header.FrameOfReferenceUID) == (mr.StudyInstanceUID, mr.FrameOfReferenceUID)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "from-pacs" / "sct")))
    stored = reader.Execute()
    assert stored.GetSize() == nifti.GetSize()
    np.testing.assert_allclose(stored.GetOrigin(), nifti.GetOrigin(), atol=1e-4)
    assert np.abs(sitk.GetArrayFromImage(stored).astype(float) - sitk.GetArrayFromImage(nifti)).max() <= 0.5
    assert pydicom.dcmread(pmap_file, stop_before_pixels=True).SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"
    # no patient value in what crossdiff said or wrote besides DICOM files
    assert not phi_found(run.stdout + run.stderr)
    assert not phi_in_files(tmp_path / "out")


def test_unreachable_pacs_is_one_clear_error(pacs: SimpleNamespace, tmp_path: Path):
    port = free_port()
    run = run_pacs(pacs.orthanc, pacs.mr_study, tmp_path / "out", port=port)
    assert_clear_failure(run, "cannot reach PACS", f"127.0.0.1:{port}")
    assert not (tmp_path / "out").exists()


def test_study_without_mr_series_is_refused(pacs: SimpleNamespace, tmp_path: Path):
    run = run_pacs(pacs.orthanc, pacs.ct_study, tmp_path / "out")
    assert_clear_failure(run, pacs.ct_study, "holds no MR series", "(CT, ")
    assert not (tmp_path / "out").exists()


def test_series_with_a_missing_slice_is_refused(pacs: SimpleNamespace, tmp_path: Path):
    run = run_pacs(pacs.orthanc, pacs.gapped_study, tmp_path / "out")
    series = str(pydicom.dcmread(next(pacs.gapped.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
    assert_clear_failure(run, f"MR series {series}", "not evenly spaced", "a slice is missing")
    assert not (tmp_path / "out").exists()
    assert not phi_found(run.stderr)


def test_refused_store_leaves_nothing_in_the_pacs(pacs: SimpleNamespace, tmp_path: Path):
    run = run_pacs(pacs.orthanc, pacs.mr_study, tmp_path / "out", "--calling-aet", READ_ONLY_AET, "--seed", 1)
    assert_push_failure(run, "refused instance 1 of", "the PACS now holds nothing of the sCT series")
    uid = pydicom.dcmread(next((tmp_path / "out" / "dicom" / "sct").glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID
    assert pacs.orthanc.series_id(str(uid)) is None


def test_discarded_instances_are_named_exactly(pacs: SimpleNamespace, tmp_path: Path):
    """Orthanc 1.10 acknowledges (status 0) instances its filter discards: only asking it afterwards tells."""
    run = run_pacs(pacs.orthanc, pacs.mr_study, tmp_path / "out", "--patient", f"PatientID={REFUSED_PATIENT}")
    files = sorted((tmp_path / "out" / "dicom" / "sct").glob("*.dcm"))
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    kept = f"1-{REFUSED_FROM - 1}"
    assert_push_failure(run, "does not hold them all", f"instances {kept} of {len(files)} of the sCT series {uid}")
    held = pacs.orthanc.rest(f"/series/{pacs.orthanc.series_id(uid)}")["Instances"]
    assert len(held) == REFUSED_FROM - 1
