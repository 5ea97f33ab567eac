"""The command line on real files and on each kind of bad input: one clear line, exit 1, nothing half-written."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import assert_clear_failure, crossdiff

from crossdiff import read_volume


def real_nifti(sample_dir: Path, name: str = "pet.nii.gz") -> nib.Nifti1Image:
    return nib.load(str(sample_dir / name))


def test_info_describes_a_real_ct(sample_dir):
    result = crossdiff("info", sample_dir / "ct.nii.gz")
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    assert "154 x 158 x 51" in out and "LPS" in out
    assert "modality │ CT: guessed from the name 'ct.nii.gz'" in out
    assert "units │ HU: values" in out and "air near -1000, Hounsfield units" in out


def test_info_on_a_dicom_series_and_a_png(shared_data):
    dicom = crossdiff("info", shared_data / "sarcoma-ct-mr-pet/STS_002/PET/dicom/image")
    assert dicom.returncode == 0, dicom.stderr
    assert "PET: DICOM Modality tag (PET)" in " ".join(dicom.stdout.split())
    assert "SUVbw: declared by the DICOM header" in " ".join(dicom.stdout.split())
    png = crossdiff("info", shared_data / "brainweb-t1-pd-slices/BrainT1Slice.png")
    assert png.returncode == 0 and "181 x 217 x 1" in " ".join(png.stdout.split())


def test_missing_file(tmp_path):
    assert_clear_failure(crossdiff("info", tmp_path / "nothing.nii.gz"), "nothing.nii.gz", "does not exist")


def test_text_file_named_like_nifti(tmp_path):
    fake = tmp_path / "notes.nii.gz"
    fake.write_text("this is not an image")
    assert_clear_failure(crossdiff("info", fake), "notes.nii.gz", "corrupt")


def test_corrupt_mha(tmp_path, sample_dir):
    corrupt = tmp_path / "scan.mha"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    assert_clear_failure(crossdiff("info", corrupt), "scan.mha", "could not be read")


def test_truncated_nifti(tmp_path, sample_dir):
    data = (sample_dir / "ct.nii.gz").read_bytes()
    cut = tmp_path / "ct_cut.nii.gz"
    cut.write_bytes(data[: len(data) // 2])
    assert_clear_failure(crossdiff("info", cut), "ct_cut.nii.gz", "truncated")


def test_four_dimensional_volume(tmp_path, sample_dir):
    pet = real_nifti(sample_dir)
    data = np.asanyarray(pet.dataobj)
    four_d = tmp_path / "pet_4d.nii.gz"
    nib.save(nib.Nifti1Image(np.stack([data, data], axis=-1), pet.affine), four_d)
    assert_clear_failure(crossdiff("info", four_d), "pet_4d.nii.gz", "4-D")


@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "Inf")])
def test_non_finite_voxels(tmp_path, sample_dir, value, word):
    pet = real_nifti(sample_dir)
    data = np.asanyarray(pet.dataobj).astype(np.float32)
    data[3, 4, 5] = value
    bad = tmp_path / "pet_bad.nii.gz"
    nib.save(nib.Nifti1Image(data, pet.affine), bad)
    assert_clear_failure(crossdiff("info", bad), "pet_bad.nii.gz", "non-finite", word)


def test_empty_volume(tmp_path, sample_dir):
    pet = real_nifti(sample_dir)
    empty = tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(pet.shape, np.float32), pet.affine), empty)
    assert_clear_failure(crossdiff("info", empty), "blank.nii.gz", "empty")


def test_failed_run_leaves_no_output_and_keeps_the_earlier_one(tmp_path, sample_dir):
    out = tmp_path / "mask.nii.gz"
    ok = crossdiff("mask", sample_dir / "ct.nii.gz", "--out", out)
    assert ok.returncode == 0, ok.stderr
    before = out.read_bytes()
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(gzip.compress((sample_dir / "ct.nii.gz").read_bytes())[:1000])
    assert_clear_failure(crossdiff("mask", broken, "--out", out), "broken.nii.gz")
    assert out.read_bytes() == before
    fresh = tmp_path / "never.nii.gz"
    assert_clear_failure(crossdiff("mask", broken, "--out", fresh), "broken.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.nii.gz", "mask.nii.gz"]


def test_mask_that_does_not_match_its_image(tmp_path, shared_data):
    case = tmp_path / "STS_001"
    case.mkdir()
    manifest = tmp_path / "manifest.json"
    ct = shared_data / "sarcoma-ct-mr-pet/STS_001/CT/nifti/image/image.nii.gz"
    mr_mask = shared_data / "sarcoma-ct-mr-pet/STS_001/MR_T1/nifti/mask/mask.nii.gz"
    manifest.write_text(json.dumps({"cases": {"STS_001": {"images": {"ct": str(ct)}, "mask": str(mr_mask), "split": "train"}}}))
    assert_clear_failure(crossdiff("check", manifest), "mask.nii.gz", "does not match")


def test_manifest_naming_missing_files(tmp_path, sample_dir):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "cases": {
                    "a": {"images": {"ct": str(sample_dir / "ct.nii.gz"), "mr": "gone/mr.nii.gz"}, "split": "train"},
                    "b": {"images": {"ct": "gone/ct.nii.gz"}, "split": "test"},
                }
            }
        )
    )
    result = crossdiff("check", manifest)
    assert_clear_failure(result, "manifest.json", "gone/mr.nii.gz", "gone/ct.nii.gz")


def test_check_reads_every_case_of_a_real_manifest(tmp_path, shared_data):
    manifest = tmp_path / "sarcoma.json"
    prepared = crossdiff("prepare", shared_data / "sarcoma-ct-mr-pet", "--out", manifest)
    assert prepared.returncode == 0, prepared.stderr
    checked = crossdiff("check", manifest)
    assert checked.returncode == 0, checked.stderr
    assert "3 cases" in " ".join(checked.stdout.split())


def register_sample(sample_dir: Path, out: Path, *options: object):
    """`crossdiff register` of the bundled MR onto the bundled CT."""
    images = ("--fixed", sample_dir / "ct.nii.gz", "--moving", sample_dir / "mr.nii.gz")
    return crossdiff("register", *images, "--out", out, *options)


def test_register_writes_the_moving_image_on_the_fixed_grid(tmp_path, sample_dir):
    out = tmp_path / "mr_on_ct.nii.gz"
    result = register_sample(sample_dir, out, "--iterations", "30", "--save-transform", tmp_path / "mr_to_ct.tfm")
    assert result.returncode == 0, result.stderr
    assert read_volume(out).geometry.matches(read_volume(sample_dir / "ct.nii.gz").geometry)
    assert (tmp_path / "mr_to_ct.tfm").is_file()
    assert "normalised mutual information" in result.stdout


def test_unknown_registration_transform_is_a_clear_error(tmp_path, sample_dir):
    result = register_sample(sample_dir, tmp_path / "x.nii.gz", "--transform", "elastic")
    assert_clear_failure(result, "elastic")
    assert not (tmp_path / "x.nii.gz").exists()


def test_methods_lists_the_registered_methods_and_refuses_unknown_ones(tmp_path, sample_dir):
    listed = crossdiff("methods")
    assert listed.returncode == 0
    for name in ("cddpm", "score-sde", "unet"):
        assert name in listed.stdout
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"cases": {"a": {"images": {"ct": str(sample_dir / "ct.nii.gz")}, "split": "train"}}}))
    result = crossdiff("train", "--method", "no-such-method", "--manifest", manifest, "--out", tmp_path / "run")
    assert_clear_failure(result, "no-such-method", "cddpm")
    assert not (tmp_path / "run").exists()
