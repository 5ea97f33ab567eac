"""DICOM series on real files: same voxels and geometry as the published NIfTI, geometry against the
raw header fields read by pydicom, series selection, and clear errors for broken folders.

Expected values come from pydicom (pixel_array * RescaleSlope + RescaleIntercept, Image Position/
Orientation (Patient), Pixel Spacing) or from nibabel, never from the code under test.
"""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import SARCOMA, needs_shared
from pydicom.data import get_testdata_file

from crossdiff.dicom import list_series, read_dicom_series
from crossdiff.errors import InputError
from crossdiff.readers import read_volume
from crossdiff.volumes import Volume

pytestmark = needs_shared

PATIENTS = ("STS_001", "STS_002", "STS_003")
MODALITIES = {"CT": ("CT", "HU"), "MR_T1": ("MR", "a.u."), "PET": ("PET", "SUVbw")}  # PET files say Units GML


def series_dir(patient: str, modality: str, kind: str = "image") -> Path:
    return SARCOMA / patient / modality / "dicom" / kind


@cache
def published_series(patient: str, modality: str) -> Volume:
    """The published DICOM series, read once per session (tests only look at it)."""
    return read_volume(series_dir(patient, modality))


def nifti(patient: str, modality: str) -> Path:
    return SARCOMA / patient / modality / "nifti" / "image" / "image.nii.gz"


def headers_by_position(folder: Path) -> list[pydicom.Dataset]:
    """The slices of a folder sorted by pydicom alone, along the normal of Image Orientation (Patient)."""
    datasets = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
    normal = slice_normal(datasets[0])
    return sorted(datasets, key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, float))))


def slice_normal(header: pydicom.Dataset) -> np.ndarray:
    orientation = np.array(header.ImageOrientationPatient, float)
    return np.cross(orientation[:3], orientation[3:])


def hounsfield(header: pydicom.Dataset) -> np.ndarray:
    return header.pixel_array * float(header.get("RescaleSlope", 1)) + float(header.get("RescaleIntercept", 0))


def copy_series(source: Path, target: Path, prefix: str = "") -> list[Path]:
    target.mkdir(exist_ok=True)
    return [Path(shutil.copy(f, target / f"{prefix}{f.name}")) for f in sorted(source.glob("*.dcm"))]


def uid_of(folder: Path) -> str:
    return str(pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)


# --- DICOM and NIfTI of the same image ------------------------------------------------------------


@pytest.mark.parametrize("modality", list(MODALITIES))
@pytest.mark.parametrize("patient", PATIENTS)
def test_dicom_series_and_nifti_agree(patient: str, modality: str) -> None:
    from_dicom = published_series(patient, modality)
    from_nifti = read_volume(nifti(patient, modality))
    assert from_dicom.shape == from_nifti.shape
    np.testing.assert_allclose(from_dicom.array, from_nifti.array, rtol=1e-5, atol=1e-5)
    for name in ("spacing", "origin", "direction"):  # the NIfTI holds float32 copies of the DICOM numbers
        np.testing.assert_allclose(getattr(from_dicom.geometry, name), getattr(from_nifti.geometry, name), atol=1e-4)
    assert (from_dicom.modality, from_dicom.units) == MODALITIES[modality]


@pytest.mark.parametrize("modality", list(MODALITIES))
@pytest.mark.parametrize("patient", PATIENTS)
def test_dicom_geometry_matches_first_and_last_slice_headers(patient: str, modality: str) -> None:
    folder = series_dir(patient, modality)
    volume = published_series(patient, modality)
    headers = headers_by_position(folder)
    first, last = headers[0], headers[-1]
    g = volume.geometry
    direction = np.array(g.direction).reshape(3, 3)
    orientation = np.array(first.ImageOrientationPatient, float)
    np.testing.assert_allclose(direction[:, 0], orientation[:3], atol=1e-6)  # along a row (x index)
    np.testing.assert_allclose(direction[:, 1], orientation[3:], atol=1e-6)  # down a column (y index)
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    np.testing.assert_allclose(g.spacing[:2], (column_spacing, row_spacing), rtol=1e-9)
    assert volume.shape == (len(headers), int(first.Rows), int(first.Columns))
    last_index = np.array([0, 0, len(headers) - 1])
    np.testing.assert_allclose(g.origin, np.array(first.ImagePositionPatient, float), atol=1e-4)
    last_position = np.array(g.origin) + direction @ (np.array(g.spacing) * last_index)
    np.testing.assert_allclose(last_position, np.array(last.ImagePositionPatient, float), atol=1e-3)
    np.testing.assert_allclose(volume.array[0], hounsfield(first), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(volume.array[-1], hounsfield(last), rtol=1e-6, atol=1e-6)


def test_dicom_and_nifti_put_a_voxel_at_the_same_world_point() -> None:
    """Through nibabel's RAS affine (x, y negated) for the NIfTI, through IPP for the DICOM slice."""
    folder, path = series_dir("STS_002", "CT"), nifti("STS_002", "CT")
    headers = headers_by_position(folder)
    affine = nib.load(str(path)).affine
    for k in (0, len(headers) - 1):
        ras = affine @ np.array([0.0, 0.0, k, 1.0])
        np.testing.assert_allclose(ras[:3] * [-1, -1, 1], np.array(headers[k].ImagePositionPatient, float), atol=1e-3)


# --- several series, selection, and non-image objects ---------------------------------------------


@pytest.fixture(scope="module")
def two_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real CT and MR series of STS_001 in one folder (file names prefixed: both use 000000.dcm...)."""
    folder = tmp_path_factory.mktemp("two_series")
    copy_series(series_dir("STS_001", "CT"), folder, "ct_")
    copy_series(series_dir("STS_001", "MR_T1"), folder, "mr_")
    return folder


def test_folder_with_two_series_needs_a_uid(two_series: Path) -> None:
    with pytest.raises(InputError, match="several DICOM series") as caught:
        read_volume(two_series)
    message = str(caught.value)
    assert str(two_series) in message
    assert uid_of(series_dir("STS_001", "CT")) in message
    assert uid_of(series_dir("STS_001", "MR_T1")) in message


@pytest.mark.parametrize("modality", ["CT", "MR_T1"])
def test_uid_picks_the_right_series(two_series: Path, modality: str) -> None:
    chosen = read_volume(two_series, series_uid=uid_of(series_dir("STS_001", modality)))
    alone = published_series("STS_001", modality)
    np.testing.assert_array_equal(chosen.array, alone.array)
    assert chosen.geometry == alone.geometry
    assert chosen.modality == MODALITIES[modality][0]


def test_unknown_uid_lists_what_is_there(two_series: Path) -> None:
    with pytest.raises(InputError, match="has no series 1.2.3.4") as caught:
        read_dicom_series(two_series, "1.2.3.4")
    assert uid_of(series_dir("STS_001", "MR_T1")) in str(caught.value)


def test_list_series_reports_modality_and_file_count(two_series: Path) -> None:
    found = {info.uid: info for info in list_series(two_series)}
    ct, mr = found[uid_of(series_dir("STS_001", "CT"))], found[uid_of(series_dir("STS_001", "MR_T1"))]
    assert (ct.modality, len(ct.files)) == ("CT", len(list(series_dir("STS_001", "CT").glob("*.dcm"))))
    assert (mr.modality, len(mr.files)) == ("MR", len(list(series_dir("STS_001", "MR_T1").glob("*.dcm"))))


def test_rtstruct_alone_is_not_an_image_series() -> None:
    folder = series_dir("STS_001", "CT", "mask")
    assert pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).Modality == "RTSTRUCT"
    with pytest.raises(InputError, match="holds no DICOM image series") as caught:
        read_volume(folder)
    assert str(folder) in str(caught.value) and "RTSTRUCT" in str(caught.value)


def test_rtstruct_beside_the_images_is_ignored(tmp_path: Path) -> None:
    copy_series(series_dir("STS_003", "CT"), tmp_path)
    shutil.copy(series_dir("STS_003", "CT", "mask") / "RS.dcm", tmp_path)
    (tmp_path / "README.txt").write_text("exported by the scanner")
    volume = read_volume(tmp_path)
    np.testing.assert_array_equal(volume.array, published_series("STS_003", "CT").array)


def test_files_without_dcm_suffix_are_found_by_their_marker(tmp_path: Path) -> None:
    for file in sorted(series_dir("STS_003", "PET").glob("*.dcm")):
        shutil.copy(file, tmp_path / file.stem)
    volume = read_volume(tmp_path)
    np.testing.assert_array_equal(volume.array, published_series("STS_003", "PET").array)


# --- broken series ------------------------------------------------------------------------------------


def interior_slice(files: list[Path]) -> Path:
    """The file whose slice lies in the middle of the stack (by pydicom's positions, not its name)."""
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    normal = slice_normal(headers[0])
    order = np.argsort([float(np.dot(normal, np.array(h.ImagePositionPatient, float))) for h in headers])
    return files[order[len(order) // 2]]


def test_missing_middle_slice_is_refused(tmp_path: Path) -> None:
    interior_slice(copy_series(series_dir("STS_001", "CT"), tmp_path)).unlink()
    with pytest.raises(InputError, match="not evenly spaced") as caught:
        read_volume(tmp_path)
    assert str(tmp_path) in str(caught.value) and "missing" in str(caught.value)


def test_duplicated_slice_is_refused(tmp_path: Path) -> None:
    files = copy_series(series_dir("STS_002", "MR_T1"), tmp_path)
    shutil.copy(interior_slice(files), tmp_path / "copy_of_a_slice.dcm")
    with pytest.raises(InputError, match="not evenly spaced"):
        read_volume(tmp_path)


def random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(3).integers(0, 256, 5000, dtype=np.uint8).tobytes())


def cut_pixels(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * 0.7)])


def cut_header(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:400])


@pytest.mark.parametrize("damage", [random_bytes, cut_pixels, cut_header], ids=["random", "pixels-cut", "header-cut"])
def test_corrupt_file_in_series_is_named(tmp_path: Path, capfd: pytest.CaptureFixture[str], damage) -> None:
    files = copy_series(series_dir("STS_001", "CT"), tmp_path)
    broken = interior_slice(files)
    damage(broken)
    capfd.readouterr()
    with pytest.raises(InputError, match="truncated|not a readable DICOM") as caught:
        read_volume(tmp_path)
    assert broken.name in str(caught.value)
    assert capfd.readouterr().err == ""


def test_corrupt_extra_dcm_is_named_rather_than_skipped(tmp_path: Path) -> None:
    copy_series(series_dir("STS_001", "MR_T1"), tmp_path)
    random_bytes(tmp_path / "zz_extra.dcm")
    with pytest.raises(InputError, match="not a readable DICOM file") as caught:
        read_volume(tmp_path)
    assert "zz_extra.dcm" in str(caught.value)


def test_per_slice_rescale_with_an_integer_first_slice(tmp_path: Path) -> None:
    """PET stores one Rescale Slope per slice; if the first slice's slope is 1, ITK would pick an
    integer pixel type for the whole series and truncate every other slice's SUVs."""
    copy_series(series_dir("STS_001", "PET"), tmp_path)
    headers = headers_by_position(tmp_path)
    headers[0].RescaleSlope, headers[0].RescaleIntercept = 1, 0
    headers[0].save_as(headers[0].filename)
    volume = read_volume(tmp_path)
    expected = np.stack([hounsfield(pydicom.dcmread(h.filename)) for h in headers])
    np.testing.assert_allclose(volume.array, expected, rtol=1e-5, atol=1e-5)
    assert np.any(expected[1:] % 1 != 0)  # the case would catch truncation


def test_pet_in_bq_per_ml_keeps_its_units(tmp_path: Path) -> None:
    """No SUV conversion without a test file that has both BQML values and their SUV: units say Bq/ml."""
    for file in copy_series(series_dir("STS_002", "PET"), tmp_path):
        header = pydicom.dcmread(file)
        header.Units = "BQML"
        header.save_as(file)
    volume = read_volume(tmp_path)
    assert (volume.modality, volume.units) == ("PET", "Bq/ml")


# --- single files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, modality", [("CT_small.dcm", "CT"), ("MR_small.dcm", "MR")])
def test_pydicom_test_file_reads_with_rescale_and_position(name: str, modality: str) -> None:
    path = Path(get_testdata_file(name, download=False))
    header = pydicom.dcmread(path)
    volume = read_volume(path)
    assert volume.shape == (1, int(header.Rows), int(header.Columns))
    np.testing.assert_array_equal(volume.array[0], hounsfield(header))
    np.testing.assert_allclose(volume.geometry.origin, np.array(header.ImagePositionPatient, float), atol=1e-4)
    np.testing.assert_allclose(volume.geometry.spacing[:2], [float(v) for v in header.PixelSpacing[::-1]], rtol=1e-6)
    assert volume.modality == modality


def test_ct_small_really_needs_the_rescale() -> None:
    header = pydicom.dcmread(get_testdata_file("CT_small.dcm", download=False))
    assert float(header.RescaleIntercept) == -1024.0
    assert read_volume(header.filename).array.min() < 0 <= header.pixel_array.min()


def test_truncated_pydicom_file_is_named() -> None:
    path = Path(get_testdata_file("MR_truncated.dcm", download=False))
    with pytest.raises(InputError, match="truncated or corrupt") as caught:
        read_volume(path)
    assert path.name in str(caught.value)


def test_one_file_of_a_series_reads_as_that_slice_alone() -> None:
    headers = headers_by_position(series_dir("STS_001", "CT"))
    middle = headers[len(headers) // 2]
    volume = read_volume(middle.filename)
    assert volume.shape == (1, int(middle.Rows), int(middle.Columns))
    np.testing.assert_array_equal(volume.array[0], hounsfield(middle))
    np.testing.assert_allclose(volume.geometry.origin, np.array(middle.ImagePositionPatient, float), atol=1e-4)
