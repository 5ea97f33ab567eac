"""Layout detection and scanning, on the three real folders as published and on public layouts
(SynthRAD, pix2pix/CycleGAN, BraTS 2021/2023) rebuilt in tmp_path from links to real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from crossdiff.data.layouts import LAYOUTS, detect_layout, prepare_manifest, scan
from crossdiff.data.manifest import Manifest, load_manifest
from crossdiff.errors import InputError
from crossdiff.readers import read_volume

SARCOMA_FOLDERS = {"ct": "CT", "mr": "MR_T1", "pet": "PET"}
BRATS_2023 = {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f"}
TCGA = {"t1": "t1", "t1c": "t1c", "t2": "t2", "flair": "flair"}


@pytest.fixture
def sarcoma(shared_data: Path) -> Path:
    return shared_data / "sarcoma-ct-mr-pet"


@pytest.fixture
def brain(shared_data: Path) -> Path:
    return shared_data / "brain-multicontrast-mri"


@pytest.fixture
def brainweb(shared_data: Path) -> Path:
    return shared_data / "brainweb-t1-pd-slices"


def _link(target: Path, link: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def _every_path_exists(manifest: Manifest) -> None:
    files = [path for case in manifest.cases.values() for _, path in case.files()]
    assert files and all(path.exists() for path in files)


# ------------------------------------------------------------------------- the real folders


def test_prepare_sarcoma_nifti(sarcoma: Path, tmp_path: Path) -> None:
    out = tmp_path / "manifest.json"
    manifest = prepare_manifest(sarcoma, out)
    assert detect_layout(sarcoma) == "modality-folders"
    assert load_manifest(out) == manifest
    assert list(manifest.cases) == ["STS_001", "STS_002", "STS_003"]
    assert manifest.modalities() == ["ct", "mr", "pet"]
    for cid, case in manifest.cases.items():
        assert case.images == {
            key: sarcoma / cid / name / "nifti/image/image.nii.gz" for key, name in SARCOMA_FOLDERS.items()
        }
        assert case.labels == {
            key: sarcoma / cid / name / "nifti/mask/mask.nii.gz" for key, name in SARCOMA_FOLDERS.items()
        }
        assert case.mask is None
    assert sorted(case.split for case in manifest.cases.values()) == ["test", "train", "train"]
    assert manifest.is_paired("mr", "ct") and manifest.is_paired("pet", "ct")
    stored = json.loads(out.read_text())["cases"]["STS_001"]["images"]["ct"]
    assert stored == str(sarcoma / "STS_001" / "CT" / "nifti" / "image" / "image.nii.gz")
    _every_path_exists(manifest)
    assert read_volume(manifest.cases["STS_001"].images["ct"]).shape == (59, 202, 198)


def test_prepare_sarcoma_dicom_reads_every_series_and_mask(sarcoma: Path, tmp_path: Path) -> None:
    manifest = prepare_manifest(sarcoma, tmp_path / "m.csv", prefer="dicom", check_readable=True)
    case = load_manifest(tmp_path / "m.csv").cases["STS_001"]
    assert case.images == {key: sarcoma / "STS_001" / name / "dicom" / "image" for key, name in SARCOMA_FOLDERS.items()}
    assert set(case.labels) == {"ct", "mr", "pet"}
    pet = read_volume(case.images["pet"])
    assert (pet.modality, pet.shape) == ("PET", (59, 43, 41))
    assert len(manifest.cases) == 3


def test_prepare_brain_maps_brats_and_tcga_names(brain: Path, tmp_path: Path) -> None:
    manifest = prepare_manifest(brain, tmp_path / "brain.json", val=0.0, test=0.2, seed=0)
    assert detect_layout(brain) == "brats"
    assert list(manifest.cases) == ["BraTS-GLI-00001-000", "TCGA-DU-7294", "TCGA-FG-6692"]
    assert manifest.modalities() == ["flair", "t1", "t1c", "t2"]
    for cid, case in manifest.cases.items():
        names = BRATS_2023 if cid.startswith("BraTS") else TCGA
        assert case.images == {key: brain / cid / f"{name}.nii.gz" for key, name in names.items()}
        assert case.labels == {} and case.mask is None
    assert [case.split for case in manifest.cases.values()].count("test") == 1
    _every_path_exists(manifest)
    assert read_volume(manifest.cases["BraTS-GLI-00001-000"].images["flair"]).shape == (155, 240, 240)


def test_prepare_brainweb_pairs_slices_by_name(brainweb: Path, tmp_path: Path) -> None:
    manifest = prepare_manifest(brainweb, tmp_path / "m.json", check_readable=True)
    assert detect_layout(brainweb) == "flat"
    images = {cid: {key: path.name for key, path in case.images.items()} for cid, case in manifest.cases.items()}
    assert images == {
        "Brain_3Slices": {"pd": "BrainProtonDensity3Slices.mha"},
        "Brain_Slice": {"pd": "BrainProtonDensitySlice.png", "t1": "BrainT1Slice.png"},
        "Brain_SliceBorder20": {"pd": "BrainProtonDensitySliceBorder20.png", "t1": "BrainT1SliceBorder20.png"},
    }
    assert manifest.cases_with("t1", "pd") == ["Brain_Slice", "Brain_SliceBorder20"]
    assert not manifest.is_paired("t1", "pd")
    _every_path_exists(load_manifest(tmp_path / "m.json"))
    assert read_volume(manifest.cases["Brain_3Slices"].images["pd"]).shape[0] == 3


# -------------------------------------------------------------- public layouts rebuilt from links


def test_flat_volumes_are_grouped_by_name_without_the_modality_word(sarcoma: Path, tmp_path: Path) -> None:
    for case in ("STS_001", "STS_002"):
        subject = f"sub-{case[-2:]}"
        _link(sarcoma / case / "MR_T1/nifti/image/image.nii.gz", tmp_path / f"{subject}_MR_T1.nii.gz")
        _link(sarcoma / case / "CT/nifti/image/image.nii.gz", tmp_path / f"{subject}_CT.nii.gz")
    _link(sarcoma / "STS_003/PET/nifti/image/image.nii.gz", tmp_path / "sub-03-pet.nii.gz")
    manifest = scan(tmp_path)
    modalities = {cid: sorted(case.images) for cid, case in manifest.cases.items()}
    assert modalities == {"sub-01": ["ct", "t1"], "sub-02": ["ct", "t1"], "sub-03": ["pet"]}
    assert manifest.cases["sub-01"].images["t1"] == tmp_path / "sub-01_MR_T1.nii.gz"


def test_synthrad_cases_at_any_depth_with_body_masks(sarcoma: Path, brainweb: Path, tmp_path: Path) -> None:
    brain_case = tmp_path / "Task1" / "brain" / "1BA001"
    _link(sarcoma / "STS_001/MR_T1/nifti/image/image.nii.gz", brain_case / "mr.nii.gz")
    _link(sarcoma / "STS_001/CT/nifti/image/image.nii.gz", brain_case / "ct.nii.gz")
    _link(sarcoma / "STS_001/CT/nifti/mask/mask.nii.gz", brain_case / "mask.nii.gz")
    pelvis_case = tmp_path / "Task2" / "pelvis" / "2PA002"
    _link(brainweb / "BrainProtonDensity3Slices.mha", pelvis_case / "cbct.mha")
    _link(brainweb / "BrainProtonDensity3Slices.raw", pelvis_case / "BrainProtonDensity3Slices.raw")
    _link(sarcoma / "STS_002/CT/nifti/image/image.nii.gz", pelvis_case / "ct.nii.gz")
    validation_case = tmp_path / "Task1" / "brain" / "1BC003"
    _link(sarcoma / "STS_003/MR_T1/nifti/image/image.nii.gz", validation_case / "mr.nii.gz")
    _link(brainweb / "PROVENANCE.txt", tmp_path / "Task1" / "overview" / "notes.txt")

    assert detect_layout(tmp_path) == "synthrad"
    manifest = scan(tmp_path)
    modalities = {cid: sorted(case.images) for cid, case in manifest.cases.items()}
    assert modalities == {"1BA001": ["ct", "mr"], "1BC003": ["mr"], "2PA002": ["cbct", "ct"]}
    assert manifest.cases["1BA001"].mask == brain_case / "mask.nii.gz"
    assert manifest.cases["2PA002"].mask is None
    assert all(case.labels == {} and case.split == "train" for case in manifest.cases.values())
    assert read_volume(manifest.cases["2PA002"].images["cbct"]).shape == (3, 217, 181)


def test_pix2pix_paired_folders_with_renamed_modalities(brainweb: Path, tmp_path: Path) -> None:
    for stem, suffix in (("s1", "Slice"), ("s2", "SliceBorder20")):
        _link(brainweb / f"BrainT1{suffix}.png", tmp_path / "A" / f"{stem}.png")
        _link(brainweb / f"BrainProtonDensity{suffix}.png", tmp_path / "B" / f"{stem}.png")
    assert detect_layout(tmp_path) == "pix2pix"
    manifest = prepare_manifest(tmp_path, tmp_path / "m.json", test=0.5, seed=1, names={"a": "t1", "b": "pd"})
    assert manifest.cases["s1"].images == {"pd": tmp_path / "B" / "s1.png", "t1": tmp_path / "A" / "s1.png"}
    assert manifest.is_paired("t1", "pd") and manifest.modalities() == ["pd", "t1"]
    assert sorted(case.split for case in manifest.cases.values()) == ["test", "train"]
    stored = json.loads((tmp_path / "m.json").read_text())["cases"]["s2"]["images"]
    assert stored == {"pd": "B/s2.png", "t1": "A/s2.png"}


def test_cyclegan_unpaired_folders_keep_their_splits(brainweb: Path, tmp_path: Path) -> None:
    _link(brainweb / "BrainT1Slice.png", tmp_path / "trainA" / "t1_slice.png")
    _link(brainweb / "BrainT1SliceBorder20.png", tmp_path / "trainA" / "t1_border.png")
    _link(brainweb / "BrainProtonDensitySlice.png", tmp_path / "trainB" / "pd_slice.png")
    _link(brainweb / "BrainProtonDensity3Slices.mha", tmp_path / "testB" / "pd_volume.mha")
    _link(brainweb / "BrainProtonDensity3Slices.raw", tmp_path / "testB" / "BrainProtonDensity3Slices.raw")
    _link(brainweb / "BrainT1SliceBorder20.png", tmp_path / "testA" / "t1_test.png")
    manifest = prepare_manifest(tmp_path, tmp_path / "m.json", test=0.2)
    found = {cid: (sorted(case.images), case.split) for cid, case in manifest.cases.items()}
    assert found == {
        "pd_slice": (["b"], "train"),
        "pd_volume": (["b"], "test"),
        "t1_border": (["a"], "train"),
        "t1_slice": (["a"], "train"),
        "t1_test": (["a"], "test"),
    }
    assert manifest.cases_with("a", "b") == [] and not manifest.is_paired("a", "b")
    assert manifest.split_cases("test") == ["pd_volume", "t1_test"]


@pytest.mark.parametrize(
    ("case", "separator", "words"),
    [
        ("BraTS-GLI-00002-000", "-", {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f"}),  # BraTS 2023
        ("BraTS2021_00002", "_", {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair"}),  # BraTS 2021
    ],
)
def test_brats_case_prefixed_names(
    brain: Path, sarcoma: Path, tmp_path: Path, case: str, separator: str, words: dict[str, str]
) -> None:
    folder = tmp_path / "TrainingData" / case
    for key, word in words.items():
        _link(brain / "TCGA-DU-7294" / f"{TCGA[key]}.nii.gz", folder / f"{case}{separator}{word}.nii.gz")
    _link(sarcoma / "STS_001/MR_T1/nifti/mask/mask.nii.gz", folder / f"{case}{separator}seg.nii.gz")
    assert detect_layout(tmp_path) == "brats"
    entry = scan(tmp_path).cases[case]
    assert entry.images == {key: folder / f"{case}{separator}{word}.nii.gz" for key, word in words.items()}
    assert entry.labels == {"seg": folder / f"{case}{separator}seg.nii.gz"} and entry.mask is None


def test_modality_folders_with_two_mr_series_and_dicom_only(sarcoma: Path, tmp_path: Path) -> None:
    _link(sarcoma / "STS_001" / "CT", tmp_path / "P1" / "CT")
    _link(sarcoma / "STS_001" / "MR_T1", tmp_path / "P1" / "MR_T1")
    _link(sarcoma / "STS_002" / "MR_T1", tmp_path / "P1" / "MRI-T2")
    _link(sarcoma / "STS_002" / "PET", tmp_path / "P2" / "PT")
    _link(sarcoma / "STS_003" / "CT" / "dicom" / "image", tmp_path / "P3" / "CT" / "dicom" / "image")
    (tmp_path / "P4" / "notes").mkdir(parents=True)
    manifest = scan(tmp_path)
    modalities = {cid: sorted(case.images) for cid, case in manifest.cases.items()}
    assert modalities == {"P1": ["ct", "mr_t1", "mri_t2"], "P2": ["pet"], "P3": ["ct"]}
    assert sorted(manifest.cases["P1"].labels) == ["ct", "mr_t1", "mri_t2"]
    assert manifest.cases["P3"].images["ct"] == tmp_path / "P3" / "CT" / "dicom" / "image"
    assert manifest.cases["P3"].labels == {}


# --------------------------------------------------------------------------------- refusals


def test_check_readable_names_every_label_off_its_image_grid(sarcoma: Path, tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "manifest.json"
    for case in ("P1", "P2"):
        _link(sarcoma / "STS_001" / "CT", data / case / "CT")
        _link(sarcoma / "STS_001/PET/nifti/image/image.nii.gz", data / case / "PET/nifti/image/image.nii.gz")
        _link(sarcoma / "STS_001/CT/nifti/mask/mask.nii.gz", data / case / "PET/nifti/mask/mask.nii.gz")
    with pytest.raises(InputError) as caught:
        prepare_manifest(data, out, check_readable=True)
    message = str(caught.value)
    assert message.startswith("2 case(s)") and message.count("does not match") == 2
    assert str(data / "P1" / "PET/nifti/mask/mask.nii.gz") in message
    assert str(data / "P2" / "PET/nifti/mask/mask.nii.gz") in message
    assert not out.exists()
    assert prepare_manifest(data, out).cases_with("ct", "pet") == ["P1", "P2"]


def test_two_files_for_one_modality_are_refused(brain: Path, tmp_path: Path) -> None:
    case = tmp_path / "BraTS-GLI-00001-000"
    _link(brain / "BraTS-GLI-00001-000" / "t1n.nii.gz", case / "t1n.nii.gz")
    _link(brain / "TCGA-DU-7294" / "t1.nii.gz", case / "t1.nii.gz")
    with pytest.raises(InputError) as caught:
        scan(tmp_path)
    assert str(case) in str(caught.value) and "t1n.nii.gz" in str(caught.value) and "t1.nii.gz" in str(caught.value)


def test_unrecognised_folder_lists_every_layout(brainweb: Path, tmp_path: Path) -> None:
    _link(brainweb / "PROVENANCE.txt", tmp_path / "docs" / "PROVENANCE.txt")
    with pytest.raises(InputError) as caught:
        detect_layout(tmp_path)
    assert str(caught.value).startswith(str(tmp_path))
    assert all(f"{layout.name}: " in str(caught.value) for layout in LAYOUTS)


@pytest.mark.parametrize("name", ["slice_0001.png", "BrainT2FlairSlice.png"])
def test_flat_file_naming_no_or_two_modalities_is_refused(brainweb: Path, tmp_path: Path, name: str) -> None:
    _link(brainweb / "BrainT1Slice.png", tmp_path / "BrainT1Slice.png")
    _link(brainweb / "BrainProtonDensitySlice.png", tmp_path / name)
    with pytest.raises(InputError, match=f"{name}: cannot tell one modality.*recognised layouts"):
        scan(tmp_path)


def test_pix2pix_case_in_two_splits_is_refused(brainweb: Path, tmp_path: Path) -> None:
    _link(brainweb / "BrainT1Slice.png", tmp_path / "trainA" / "x.png")
    _link(brainweb / "BrainProtonDensitySlice.png", tmp_path / "testB" / "x.png")
    with pytest.raises(InputError, match=r"x\.png: case 'x' is both in train and in test"):
        scan(tmp_path)


def test_explicit_layout_that_finds_nothing_and_unknown_names_are_refused(brain: Path, sarcoma: Path) -> None:
    with pytest.raises(InputError, match="no case with an image found as layout synthrad"):
        scan(brain, layout="synthrad")
    with pytest.raises(InputError, match="cannot rename a: the dataset's modalities are ct, mr, pet"):
        scan(sarcoma, names={"a": "t1"})
    with pytest.raises(InputError, match="is not a folder"):
        scan(sarcoma / "README.md")
