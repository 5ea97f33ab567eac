"""Volume I/O on real files: geometry against nibabel, format round trips, atomic writes, resampling,
PNG/MHA inputs and the refusal of bad inputs.

Expected values come from independent readers (nibabel, PIL, numpy on the raw bytes) or from the
input itself (round trips), never from the code under test.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from helpers import BRAINWEB, SARCOMA, needs_shared
from PIL import Image

from crossdiff.errors import InputError
from crossdiff.readers import read_mask, read_volume
from crossdiff.volumes import Geometry, Volume, coverage, resample_to, write_volume

pytestmark = needs_shared

WRITE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".nrrd")


def nifti(patient: str, modality: str, kind: str = "image") -> Path:
    return SARCOMA / patient / modality / "nifti" / kind / f"{kind}.nii.gz"


@pytest.fixture(scope="module")
def ct() -> Volume:
    """STS_001 CT read from its DICOM series, so its geometry carries full float64 precision."""
    return read_volume(SARCOMA / "STS_001" / "CT" / "dicom" / "image")


@pytest.fixture(scope="module")
def pet() -> Volume:
    """STS_001 PET from DICOM: small (41x43x59), non-integer SUVs, float64 geometry; quick to write."""
    return read_volume(SARCOMA / "STS_001" / "PET" / "dicom" / "image")


@pytest.fixture(scope="module")
def mr() -> Volume:
    return read_volume(nifti("STS_001", "MR_T1"))


def voxel_to_lps(geometry: Geometry, index: tuple[int, int, int]) -> np.ndarray:
    """ITK's index -> physical point: origin + direction @ (spacing * index)."""
    direction = np.array(geometry.direction).reshape(3, 3)
    return np.array(geometry.origin) + direction @ (np.array(geometry.spacing) * np.array(index))


def nibabel_lps(path: Path, index: tuple[int, int, int]) -> np.ndarray:
    """nibabel's (RAS) voxel -> world mapping with x, y negated into LPS."""
    ras = nib.load(str(path)).affine @ np.r_[index, 1.0]
    return ras[:3] * np.array([-1.0, -1.0, 1.0])


def corners(geometry: Geometry) -> list[tuple[int, int, int]]:
    nx, ny, nz = (s - 1 for s in geometry.size)
    return [(0, 0, 0), (nx, 0, 0), (0, ny, 0), (0, 0, nz), (nx, ny, nz)]


def rotated(volume: Volume, degrees_z: float = 20.0, degrees_x: float = 17.0) -> Volume:
    """The same voxels under oblique direction cosines: the real ones rotated by known angles."""
    a, b = np.deg2rad(degrees_z), np.deg2rad(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    direction = rx @ rz @ np.array(volume.geometry.direction).reshape(3, 3)
    geometry = Geometry(volume.geometry.size, volume.geometry.spacing, volume.geometry.origin, tuple(direction.ravel()))
    return volume.with_array(volume.array, geometry=geometry)


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name not in keep)


# --- geometry: our LPS against nibabel's RAS ---------------------------------------------------


@pytest.mark.parametrize("modality", ["CT", "MR_T1", "PET"])
def test_nifti_geometry_agrees_with_nibabel_affine(modality: str) -> None:
    path = nifti("STS_001", modality)
    volume = read_volume(path)
    assert volume.shape == nib.load(str(path)).shape[::-1]
    for index in corners(volume.geometry):
        np.testing.assert_allclose(voxel_to_lps(volume.geometry, index), nibabel_lps(path, index), atol=1e-3)


def test_nifti_array_is_nibabel_data_transposed(mr: Volume) -> None:
    expected = np.asarray(nib.load(str(nifti("STS_001", "MR_T1"))).dataobj, dtype=np.float32).transpose(2, 1, 0)
    np.testing.assert_array_equal(mr.array, expected)


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", WRITE_SUFFIXES)
@pytest.mark.parametrize("oblique", [False, True], ids=["axial", "oblique"])
def test_round_trip_keeps_voxels_and_geometry(pet: Volume, tmp_path: Path, suffix: str, oblique: bool) -> None:
    source = rotated(pet) if oblique else pet
    path = write_volume(source, tmp_path / f"pet{suffix}")
    back = read_volume(path)
    assert back.array.dtype == source.array.dtype
    np.testing.assert_array_equal(back.array, source.array)
    assert back.geometry.size == source.geometry.size
    # NIfTI stores float32 (origin ~ -881 mm -> ulp 6e-5 mm); MHA and NRRD keep text with full precision.
    atol = 1e-4 if suffix.startswith(".nii") else 1e-9
    for name in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(back.geometry, name), getattr(source.geometry, name), atol=atol, err_msg=name)
    assert leftovers(tmp_path, {path.name}) == []


def test_oblique_nifti_lands_where_nibabel_says(pet: Volume, tmp_path: Path) -> None:
    """Independent of our reader: nibabel's affine of the written file puts voxels where we meant."""
    source = rotated(pet, 33.0, -12.0)
    path = write_volume(source, tmp_path / "oblique.nii.gz")
    for index in corners(source.geometry):
        np.testing.assert_allclose(nibabel_lps(path, index), voxel_to_lps(source.geometry, index), atol=1e-3)


def test_upper_case_suffixes_round_trip(pet: Volume, tmp_path: Path) -> None:
    for name in ("MR.NII.GZ", "MR.MHA"):
        path = write_volume(pet, tmp_path / name)
        np.testing.assert_array_equal(read_volume(path).array, pet.array)
    assert leftovers(tmp_path, {"MR.NII.GZ", "MR.MHA"}) == []


def test_written_file_gets_ordinary_permissions(pet: Volume, tmp_path: Path) -> None:
    """The hidden temporary is private (0600); the published file must follow the umask like any other."""
    umask = os.umask(0o022)
    os.umask(umask)
    path = write_volume(pet, tmp_path / "pet.nii.gz")
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


# --- atomic writes -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["out.png", "out.txt", "out"])
def test_unsupported_target_raises_and_leaves_nothing(mr: Volume, tmp_path: Path, name: str) -> None:
    with pytest.raises(InputError, match="cannot write this format") as caught:
        write_volume(mr, tmp_path / name)
    assert name in str(caught.value)
    assert leftovers(tmp_path, set()) == []


def test_unwritable_target_raises_input_error(mr: Volume, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder is needed")
    with pytest.raises(InputError, match="could not be written") as caught:
        write_volume(mr, blocker / "mr.nii.gz")
    assert "mr.nii.gz" in str(caught.value)
    assert leftovers(tmp_path, {"not-a-folder"}) == []


FULL_DISK_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys
    from crossdiff.errors import InputError
    from crossdiff.readers import read_volume
    from crossdiff.volumes import write_volume
    volume = read_volume(sys.argv[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, resource.RLIM_INFINITY))
    for target in sys.argv[2:]:
        try:
            write_volume(volume, target)
            print(target, "NO ERROR")
        except InputError as error:
            print(target, "InputError", "could not be written" in str(error))
    """
)


def test_failed_write_keeps_existing_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    """A real short write (file-size limit, as on a full disk) must not replace an earlier result.

    ITK's NIfTI writer only prints the short write to stderr and returns normally, so this also
    proves that write_volume checks what it wrote.
    """
    targets = [tmp_path / f"result{suffix}" for suffix in WRITE_SUFFIXES]
    for target in targets:
        target.write_bytes(b"earlier result")
    command = [sys.executable, "-c", FULL_DISK_SCRIPT, str(nifti("STS_001", "PET")), *map(str, targets)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for target in targets:
        assert f"{target} InputError True" in done.stdout, done.stdout
        assert target.read_bytes() == b"earlier result"
    assert leftovers(tmp_path, {t.name for t in targets}) == []


# --- resampling ----------------------------------------------------------------------------------


def test_resample_onto_own_grid_is_identity(ct: Volume, mr: Volume) -> None:
    for volume in (ct, mr):
        same = resample_to(volume, volume)
        np.testing.assert_array_equal(same.array, volume.array)
        assert same.geometry == volume.geometry
        # Through the full interpolation path (an explicit identity transform), too.
        interpolated = resample_to(volume, volume, transform=sitk.Transform())
        np.testing.assert_allclose(interpolated.array, volume.array, atol=1e-3)


def shifted_grid(volume: Volume, voxels: int) -> Geometry:
    """The volume's grid moved `voxels` columns along its first axis."""
    g = volume.geometry
    step = np.array(g.direction).reshape(3, 3)[:, 0] * g.spacing[0] * voxels
    return Geometry(g.size, g.spacing, tuple(np.array(g.origin) + step), g.direction)


@pytest.mark.parametrize("which, background", [("ct", -1024.0), ("mr", 0.0)])
def test_resample_fills_outside_field_of_view_with_modality_background(
    request: pytest.FixtureRequest, which: str, background: float
) -> None:
    volume: Volume = request.getfixturevalue(which)
    shift = 50
    moved = resample_to(volume, shifted_grid(volume, shift))
    np.testing.assert_allclose(moved.array[:, :, :-shift], volume.array[:, :, shift:], atol=1e-3)
    assert np.all(moved.array[:, :, -shift:] == background)


def test_nearest_keeps_mask_binary_and_linear_would_not(ct: Volume) -> None:
    mr_mask = read_mask(nifti("STS_001", "MR_T1", "mask"))
    nearest = resample_to(mr_mask, ct, "nearest")
    assert nearest.geometry == ct.geometry
    assert nearest.array.dtype == np.uint8
    assert set(np.unique(nearest.array)) == {0, 1}
    linear = resample_to(mr_mask, ct, "linear")
    assert len(np.unique(linear.array)) > 2  # why masks must use 'nearest'


def physical_centroid_ras(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Centroid in world coordinates through nibabel's affine; `mask` is indexed (x, y, z)."""
    index = np.argwhere(mask > 0).mean(axis=0)
    return (affine @ np.r_[index, 1.0])[:3]


def test_mr_tumour_resampled_onto_ct_lands_on_ct_tumour(ct: Volume) -> None:
    ct_mask_path, mr_mask_path = nifti("STS_001", "CT", "mask"), nifti("STS_001", "MR_T1", "mask")
    ct_affine = nib.load(str(ct_mask_path)).affine
    on_ct = resample_to(read_mask(mr_mask_path), ct, "nearest")
    moved = physical_centroid_ras(on_ct.array.transpose(2, 1, 0), ct_affine)
    ct_centroid = physical_centroid_ras(np.asarray(nib.load(str(ct_mask_path)).dataobj), ct_affine)
    mr_image = nib.load(str(mr_mask_path))
    mr_centroid = physical_centroid_ras(np.asarray(mr_image.dataobj), mr_image.affine)
    assert np.linalg.norm(moved - ct_centroid) < 3.0
    assert np.linalg.norm(moved - mr_centroid) < 3.0


def test_coverage_is_the_other_volumes_field_of_view(ct: Volume, mr: Volume) -> None:
    """Axis-aligned grids: a CT voxel is covered iff its centre lies inside the MR's voxel extent."""
    covered = coverage(mr, ct)
    assert covered.any() and not covered.all()
    inside, outside = np.ones(ct.shape, bool), np.zeros(ct.shape, bool)
    for axis in range(3):
        centres = ct.geometry.origin[axis] + ct.geometry.spacing[axis] * np.arange(ct.geometry.size[axis])
        first = mr.geometry.origin[axis]
        last = first + mr.geometry.spacing[axis] * (mr.geometry.size[axis] - 1)
        half = mr.geometry.spacing[axis] / 2
        shape = [1, 1, 1]
        shape[2 - axis] = -1
        inside &= ((centres > first - 0.98 * half) & (centres < last + 0.98 * half)).reshape(shape)
        outside |= ((centres < first - 1.02 * half) | (centres > last + 1.02 * half)).reshape(shape)
    assert covered[inside].all()
    assert not covered[outside].any()


# --- PNG and MHA inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["BrainT1Slice.png", "BrainProtonDensitySlice.png", "BrainT1SliceBorder20.png"])
def test_single_png_is_a_one_slice_volume_with_pil_values(name: str) -> None:
    volume = read_volume(BRAINWEB / name)
    expected = np.asarray(Image.open(BRAINWEB / name).convert("L"), dtype=np.float32)
    assert volume.shape == (1, *expected.shape)
    np.testing.assert_array_equal(volume.array[0], expected)


def test_png_folder_with_mixed_sizes_names_the_odd_file() -> None:
    with pytest.raises(InputError, match="differs from") as caught:
        read_volume(BRAINWEB)
    assert "Border20.png" in str(caught.value)


def test_png_folder_stacks_in_natural_order(tmp_path: Path) -> None:
    pd_name, t1_name = "BrainProtonDensitySlice.png", "BrainT1Slice.png"
    order = {"slice1.png": pd_name, "Slice2.png": t1_name, "slice10.png": pd_name}
    for target, source in order.items():
        shutil.copy(BRAINWEB / source, tmp_path / target)
    (tmp_path / "notes.txt").write_text("not a slice")
    volume = read_volume(tmp_path)
    assert volume.shape == (3, 217, 181)
    pd_, t1 = (np.asarray(Image.open(BRAINWEB / n).convert("L"), dtype=np.float32) for n in (pd_name, t1_name))
    np.testing.assert_array_equal(volume.array[0], pd_)
    np.testing.assert_array_equal(volume.array[1], t1)  # 'Slice2' before 'slice10', whatever the case
    np.testing.assert_array_equal(volume.array[2], pd_)


def test_mha_with_separate_raw_reads_the_raw_bytes() -> None:
    header = (BRAINWEB / "BrainProtonDensity3Slices.mha").read_text()
    assert "ElementDataFile = BrainProtonDensity3Slices.raw" in header
    volume = read_volume(BRAINWEB / "BrainProtonDensity3Slices.mha")
    raw = np.fromfile(BRAINWEB / "BrainProtonDensity3Slices.raw", dtype=np.uint8).reshape(3, 217, 181)
    np.testing.assert_array_equal(volume.array, raw)
    assert volume.geometry.spacing == (1.0, 1.0, 1.0)


def test_mha_with_missing_raw_says_which_file_is_missing(tmp_path: Path) -> None:
    shutil.copy(BRAINWEB / "BrainProtonDensity3Slices.mha", tmp_path)
    with pytest.raises(InputError, match="BrainProtonDensity3Slices.raw is missing"):
        read_volume(tmp_path / "BrainProtonDensity3Slices.mha")


# --- bad inputs -----------------------------------------------------------------------------------


def cut(source: Path, target: Path, fraction: float = 0.6) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def real_ct_as(tmp_path: Path, name: str, compress: bool) -> Path:
    """The real CT re-encoded by SimpleITK itself (not by the code under test)."""
    path = tmp_path / name
    sitk.WriteImage(sitk.ReadImage(str(nifti("STS_001", "CT"))), str(path), useCompression=compress)
    return path


def with_voxels(tmp_path: Path, name: str, change: Callable[[np.ndarray], np.ndarray]) -> Path:
    image = nib.load(str(nifti("STS_001", "PET")))
    data = change(np.asarray(image.dataobj, dtype=np.float32).copy())
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, image.affine), str(path))
    return path


def set_non_finite(data: np.ndarray) -> np.ndarray:
    data[10, 20, 30] = data[11, 21, 31] = data[12, 22, 32] = np.nan
    data[40, 40, 5] = np.inf
    data[39, 41, 6] = -np.inf
    return data


BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "missing": (lambda d: d / "nowhere.nii.gz", "does not exist"),
    "unsupported suffix": (lambda d: Path(shutil.copy(SARCOMA / "README.md", d / "scan.txt")), "not a supported image"),
    "random bytes .nii.gz": (lambda d: _random_file(d / "noise.nii.gz"), "corrupt"),
    "random bytes .mha": (lambda d: _random_file(d / "noise.mha"), "not a MetaImage file"),
    "random bytes .nrrd": (lambda d: _random_file(d / "noise.nrrd"), "could not be read"),
    "truncated .nii.gz": (lambda d: cut(nifti("STS_001", "CT"), d / "cut.nii.gz"), "truncated"),
    "truncated .nii": (lambda d: _cut_nii(d), "truncated"),
    "truncated .mha": (lambda d: cut(real_ct_as(d, "ct.mha", True), d / "cut.mha"), "truncated"),
    "truncated raw .mha": (lambda d: cut(real_ct_as(d, "ct.mha", False), d / "cut.mha"), "truncated"),
    "truncated .nrrd": (lambda d: cut(real_ct_as(d, "ct.nrrd", True), d / "cut.nrrd"), "truncated"),
    "truncated raw .nrrd": (lambda d: cut(real_ct_as(d, "ct.nrrd", False), d / "cut.nrrd"), "truncated"),
    "4-D": (lambda d: _four_d(d), "is 4-D"),
    "NaN and Inf": (lambda d: with_voxels(d, "nan.nii.gz", set_non_finite), r"3 NaN, 2 Inf"),
    "NaN in .mha": (lambda d: _mha_with_nan(d), "1 NaN, 0 Inf"),
    "constant": (lambda d: with_voxels(d, "flat.nii.gz", lambda a: np.full_like(a, 0.0)), "same value"),
}


def _random_file(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    return path


def _mha_with_nan(folder: Path) -> Path:
    """ITK keeps NaN in MetaImage (it zeroes them in NIfTI, which the NIfTI case covers)."""
    image = sitk.ReadImage(str(nifti("STS_001", "PET")))
    image[3, 4, 5] = float("nan")
    path = folder / "pet_nan.mha"
    sitk.WriteImage(image, str(path))
    return path


def _cut_nii(folder: Path) -> Path:
    whole = folder / "ct.nii"
    whole.write_bytes(gzip.decompress(nifti("STS_001", "CT").read_bytes()))
    return cut(whole, folder / "cut.nii")


def _four_d(folder: Path) -> Path:
    image = nib.load(str(nifti("STS_001", "PET")))
    data = np.asarray(image.dataobj)
    path = folder / "two_frames.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), image.affine), str(path))
    return path


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_with_its_name_and_problem(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], case: str
) -> None:
    build, problem = BAD_INPUTS[case]
    path = build(tmp_path)
    capfd.readouterr()
    with pytest.raises(InputError, match=problem) as caught:
        read_volume(path)
    assert path.name in str(caught.value)
    assert caught.value.path == path
    assert capfd.readouterr().err == ""  # no ITK/MetaIO chatter on the console


def test_folder_of_folders_points_to_its_subfolders() -> None:
    with pytest.raises(InputError, match="neither a DICOM series nor PNG/JPEG slices") as caught:
        read_volume(SARCOMA / "STS_001" / "CT")
    assert "dicom, nifti" in str(caught.value)


def test_mask_on_another_grid_is_refused(ct: Volume) -> None:
    path = nifti("STS_001", "MR_T1", "mask")
    with pytest.raises(InputError, match="does not match") as caught:
        read_mask(path, ct)
    assert path.name in str(caught.value) and "resample" in str(caught.value)


def test_mask_on_the_same_grid_is_binary(ct: Volume) -> None:
    mask = read_mask(nifti("STS_001", "CT", "mask"), ct)
    expected = np.asarray(nib.load(str(nifti("STS_001", "CT", "mask"))).dataobj).transpose(2, 1, 0) > 0
    np.testing.assert_array_equal(mask.array.astype(bool), expected)


def test_empty_mask_is_refused(tmp_path: Path) -> None:
    image = nib.load(str(nifti("STS_001", "CT", "mask")))
    path = tmp_path / "empty_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(image.shape, np.uint8), image.affine), str(path))
    with pytest.raises(InputError, match="mask is empty") as caught:
        read_mask(path)
    assert path.name in str(caught.value)
