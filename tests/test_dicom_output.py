"""`translate --output-dicom`: the sCT as a CT series in the MR's frame of reference, the uncertainty as a
Parametric Map beside it, every file valid by dciodvfy, and no patient value in anything but the DICOM files.

The input is a real MR series with recognisable patient values planted (tests/phi.py). Expected values
come from the source files (pydicom), from the NIfTI output read by SimpleITK, or from the model file,
never from the code under test.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from helpers import REPO, SARCOMA, assert_clear_failure, crossdiff, needs_shared
from phi import PHI, phi_found, phi_in_files, readable_text

from crossdiff import __version__
from crossdiff.checkpoints import read_config
from crossdiff.dicom_output import Derivation, DicomRequest, read_source_series, write_dicom_outputs
from crossdiff.errors import InputError
from crossdiff.readers import read_volume
from crossdiff.volumes import Volume

pytestmark = needs_shared

MODEL = REPO / "src" / "crossdiff" / "sample" / "model"
FAST = ("--steps", 2, "--samples", 2)
DCIODVFY = Path(sys.executable).parent / "dciodvfy"
# dciodvfy warnings accepted on these files, and why (anything else fails the test):
ACCEPTED_WARNINGS = {
    "needed to build DICOMDIR - Study ID": "the source's Study ID is 20 characters, invalid for SH, so it is left empty",
    "needed to build DICOMDIR - Patient ID": "without a reference series there is no patient (Type 2, empty)",
    "attribute <Laterality>": "Laterality is copied as the source has it: empty, i.e. unknown (also without a source)",
}


def dciodvfy_problems(file: Path) -> list[str]:
    """dciodvfy's errors and its warnings other than the accepted ones (and a non-zero exit)."""
    check = subprocess.run([str(DCIODVFY), str(file)], capture_output=True, text=True, timeout=60)
    lines = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith(("Error", "Warning"))]
    problems = [line for line in lines if line.startswith("Error") or not any(known in line for known in ACCEPTED_WARNINGS)]
    return problems + ([f"exit status {check.returncode}"] if check.returncode else [])


@pytest.fixture(scope="module")
def translated(phi_mr_series: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One CLI translation of the MR series into NIfTI (sCT, std) and DICOM, shared by the tests here."""
    out = tmp_path_factory.mktemp("translated")
    run = crossdiff("translate", "--model", MODEL, "--input", phi_mr_series, "--output", out / "sct.nii.gz",
                    "--uncertainty", out / "std.nii.gz", "--output-dicom", out / "dicom", *FAST)
    assert run.returncode == 0, run.stderr
    return SimpleNamespace(out=out, run=run, source=phi_mr_series, sct=out / "dicom" / "sct",
                           pmap=next((out / "dicom" / "uncertainty").glob("*.dcm")))


def read_headers(folder: Path) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(f) for f in folder.glob("*.dcm")), key=lambda d: int(d.InstanceNumber))


def series_image(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def along_normal(header: pydicom.Dataset, position: object) -> float:
    orientation = np.array(header.ImageOrientationPatient, float)
    return float(np.dot(np.cross(orientation[:3], orientation[3:]), np.array(position, float)))


def test_sct_series_reads_back_as_the_nifti_output(translated: SimpleNamespace) -> None:
    dicom, nifti = series_image(translated.sct), sitk.ReadImage(str(translated.out / "sct.nii.gz"))
    assert dicom.GetSize() == nifti.GetSize()
    for name in ("GetSpacing", "GetOrigin", "GetDirection"):
        np.testing.assert_allclose(getattr(dicom, name)(), getattr(nifti, name)(), atol=1e-4, err_msg=name)
    hu = sitk.GetArrayFromImage(dicom).astype(float)
    assert np.abs(hu - sitk.GetArrayFromImage(nifti)).max() <= 0.5
    first = pydicom.dcmread(next(translated.sct.glob("*.dcm")), stop_before_pixels=True)
    assert (first.BitsAllocated, first.PixelRepresentation) == (16, 1)  # signed 16-bit
    assert hu.min() < -1000 and hu.max() > 300  # air and bone are there, not clipped to a window


def test_sct_series_joins_the_mr_study_and_references_its_slices(translated: SimpleNamespace) -> None:
    mr = read_headers(translated.source)
    sct = read_headers(translated.sct)
    mr_by_uid = {str(h.SOPInstanceUID): h for h in mr}
    assert len(sct) == len(mr)
    assert len({str(h.SOPInstanceUID) for h in sct}) == len(sct)
    assert {str(h.SeriesInstanceUID) for h in sct} != {str(mr[0].SeriesInstanceUID)}
    assert len({str(h.SeriesInstanceUID) for h in sct}) == 1
    weights = hashlib.sha256((MODEL / "model.safetensors").read_bytes()).hexdigest()[:12]
    method = read_config(MODEL)["method"]["name"]
    for header in sct:
        assert header.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
        assert header.StudyInstanceUID == mr[0].StudyInstanceUID
        assert header.FrameOfReferenceUID == mr[0].FrameOfReferenceUID
        assert header.Modality == "CT" and list(header.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        assert header.Manufacturer == "crossdiff" and header.BurnedInAnnotation == "NO"
        assert (str(header.PatientName), header.PatientID, header.PatientBirthDate) == (
            PHI["PatientName"], PHI["PatientID"], PHI["PatientBirthDate"])
        assert "InstitutionName" not in header  # the equipment is crossdiff, not the MR's hospital
        for words in (f"crossdiff {__version__}", f"method {method}", weights):
            assert words in header.DerivationDescription
        assert "crossdiff" in header.SeriesDescription
        (reference,) = header.SourceImageSequence
        source = mr_by_uid[str(reference.ReferencedSOPInstanceUID)]
        assert reference.ReferencedSOPClassUID == source.SOPClassUID
        assert abs(along_normal(source, source.ImagePositionPatient) - along_normal(source, header.ImagePositionPatient)) < 0.01


def test_uncertainty_is_a_parametric_map_on_the_sct_planes(translated: SimpleNamespace) -> None:
    pmap = pydicom.dcmread(translated.pmap)
    sct = read_headers(translated.sct)
    std = sitk.ReadImage(str(translated.out / "std.nii.gz"))
    assert pmap.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage: no planning system's CT
    assert "NOT FOR PLANNING" in pmap.SeriesDescription
    assert (pmap.StudyInstanceUID, pmap.FrameOfReferenceUID) == (sct[0].StudyInstanceUID, sct[0].FrameOfReferenceUID)
    assert pmap.SeriesInstanceUID != sct[0].SeriesInstanceUID
    mapping = pmap.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "[hnsf'U]"
    values = sitk.GetArrayFromImage(std)
    frames = pmap.pixel_array
    assert frames.shape == values.shape
    for frame, group in zip(frames, pmap.PerFrameFunctionalGroupsSequence):
        position = group.PlanePositionSequence[0].ImagePositionPatient
        index = std.TransformPhysicalPointToIndex([float(v) for v in position])
        assert index[:2] == (0, 0)
        np.testing.assert_allclose(frame, values[index[2]], atol=1e-4)


def test_every_written_file_passes_dciodvfy(translated: SimpleNamespace) -> None:
    for file in [*sorted(translated.sct.glob("*.dcm")), translated.pmap]:
        assert not dciodvfy_problems(file), file.name


def test_no_patient_value_in_messages_or_non_dicom_outputs(translated: SimpleNamespace) -> None:
    assert not phi_found(translated.run.stdout + translated.run.stderr)
    assert not phi_in_files(translated.out)
    # the search does find the values where they belong: the DICOM files carry the patient
    assert set(phi_found(readable_text(next(translated.sct.glob("*.dcm"))))) >= {PHI["PatientID"], PHI["AccessionNumber"]}


def test_uids_are_determined_by_the_content(translated: SimpleNamespace, tmp_path: Path) -> None:
    sct, std = read_volume(translated.out / "sct.nii.gz"), read_volume(translated.out / "std.nii.gz")
    source = read_source_series(translated.source)
    derivation = Derivation("cddpm", "model", "test")
    same = [write_dicom_outputs(sct, std, DicomRequest(tmp_path / name, source), derivation) for name in ("a", "b")]
    changed_array = sct.array.copy()
    changed_array[10, 60, 60] += 10.0
    changed = write_dicom_outputs(sct.with_array(changed_array), std, DicomRequest(tmp_path / "c", source), derivation)
    assert same[0].sct_series_uid == same[1].sct_series_uid
    assert [h.SOPInstanceUID for h in read_headers(tmp_path / "a" / "sct")] == [
        h.SOPInstanceUID for h in read_headers(tmp_path / "b" / "sct")]
    assert changed.sct_series_uid != same[0].sct_series_uid
    assert changed.study_uid == same[0].study_uid == str(source.first.StudyInstanceUID)


def test_without_a_reference_the_series_belong_to_no_study(translated: SimpleNamespace, tmp_path: Path) -> None:
    sct, std = read_volume(translated.out / "sct.nii.gz"), read_volume(translated.out / "std.nii.gz")
    written = write_dicom_outputs(sct, std, DicomRequest(tmp_path / "out", None), Derivation("cddpm", "model", "test"))
    mr = pydicom.dcmread(next(translated.source.glob("*.dcm")), stop_before_pixels=True)
    assert any("no existing study" in note for note in written.warnings)
    ct, pmap = read_headers(tmp_path / "out" / "sct")[0], pydicom.dcmread(written.uncertainty_files[0])
    assert ct.StudyInstanceUID != mr.StudyInstanceUID and ct.FrameOfReferenceUID != mr.FrameOfReferenceUID
    assert (pmap.StudyInstanceUID, pmap.FrameOfReferenceUID) == (ct.StudyInstanceUID, ct.FrameOfReferenceUID)
    assert str(ct.PatientName) == "" and ct.PatientID == ""
    for file in (written.sct_files[0], written.sct_files[-1], written.uncertainty_files[0]):
        assert not dciodvfy_problems(file), file.name


def test_nifti_input_joins_the_reference_series_with_a_replaced_patient(phi_mr_series: Path, tmp_path: Path) -> None:
    nifti = SARCOMA / "STS_003" / "MR_T1" / "nifti" / "image" / "image.nii.gz"
    run = crossdiff("translate", "--model", MODEL, "--input", nifti, "--reference-dicom", phi_mr_series,
                    "--output-dicom", tmp_path / "dicom", "--patient", "PatientID=PLAN-0042", "--patient",
                    "PatientName=Planning^Alias", "--steps", 2)
    assert run.returncode == 0, run.stderr
    mr = pydicom.dcmread(next(phi_mr_series.glob("*.dcm")), stop_before_pixels=True)
    sct = read_headers(tmp_path / "dicom" / "sct")
    assert len(sct) == sitk.ReadImage(str(nifti)).GetSize()[2]
    assert (sct[0].StudyInstanceUID, sct[0].FrameOfReferenceUID) == (mr.StudyInstanceUID, mr.FrameOfReferenceUID)
    assert (sct[0].PatientID, str(sct[0].PatientName), sct[0].PatientBirthDate) == ("PLAN-0042", "Planning^Alias", "")
    assert not (tmp_path / "dicom" / "uncertainty").exists()  # one draw: no spread to store
    assert not phi_found(run.stdout + run.stderr)


def test_a_reference_series_of_another_scan_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    nifti = SARCOMA / "STS_003" / "MR_T1" / "nifti" / "image" / "image.nii.gz"
    other = SARCOMA / "STS_001" / "MR_T1" / "dicom" / "image"
    run = crossdiff("translate", "--model", MODEL, "--input", nifti, "--reference-dicom", other,
                    "--output-dicom", tmp_path / "dicom", "--output", tmp_path / "sct.nii.gz", "--steps", 2)
    assert_clear_failure(run, str(other), "not the series the input was made from")
    assert not list(tmp_path.iterdir())


def test_a_left_handed_grid_comes_back_reversed_with_the_same_voxels_in_space(translated: SimpleNamespace, tmp_path: Path):
    """NIfTI allows a slice axis against the slice normal; a DICOM series is read along the normal."""
    sct = read_volume(translated.out / "sct.nii.gz")
    flipped = sitk.Flip(sct.to_sitk(), [False, False, True])  # same voxels in space, slice axis reversed
    left_handed = Volume.from_sitk(flipped, "CT", "HU")
    assert np.linalg.det(np.reshape(left_handed.geometry.direction, (3, 3))) < 0
    write_dicom_outputs(left_handed, None, DicomRequest(tmp_path / "out", None), Derivation("cddpm", "model", "test"))
    back = series_image(tmp_path / "out" / "sct")
    np.testing.assert_allclose(back.GetOrigin(), sct.geometry.origin, atol=1e-4)
    np.testing.assert_allclose(back.GetDirection(), sct.geometry.direction, atol=1e-6)
    assert np.abs(sitk.GetArrayFromImage(back) - sct.array).max() <= 0.5


def test_a_folder_holding_other_files_is_not_replaced(translated: SimpleNamespace, tmp_path: Path) -> None:
    sct = read_volume(translated.out / "sct.nii.gz")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(InputError, match="holds other files"):
        write_dicom_outputs(sct, None, DicomRequest(tmp_path / "out", None), Derivation("cddpm", "model", "test"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]
    first = write_dicom_outputs(sct, None, DicomRequest(tmp_path / "again", None), Derivation("cddpm", "model", "test"))
    second = write_dicom_outputs(sct, None, DicomRequest(tmp_path / "again", None), Derivation("cddpm", "model", "test"))
    assert first.sct_files == second.sct_files and all(path.is_file() for path in second.sct_files)  # earlier output replaced
