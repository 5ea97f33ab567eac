"""Preparing real cases: one grid, masks that respect every field of view, scaling that undoes, a cache that is used."""

from __future__ import annotations

import numpy as np
import pytest

import crossdiff.data.cases as cases_module
from crossdiff import read_volume
from crossdiff.data.cases import PreparationConfig, prepare_case
from crossdiff.data.manifest import CaseEntry
from crossdiff.errors import InputError
from crossdiff.masks import body_mask
from crossdiff.volumes import coverage


@pytest.fixture()
def sample_entry(sample_dir) -> CaseEntry:
    return CaseEntry(images={key: sample_dir / f"{key}.nii.gz" for key in ("ct", "mr", "pet")})


def test_every_modality_lands_on_the_reference_grid(sample_entry, sample_dir):
    config = PreparationConfig(modalities=["mr", "ct", "pet"], reference="ct")
    case = prepare_case("STS_003", sample_entry, config)
    ct = read_volume(sample_dir / "ct.nii.gz")
    mr = read_volume(sample_dir / "mr.nii.gz")
    assert case.geometry == ct.geometry
    assert set(case.images) == {"mr", "ct", "pet"}
    for image in case.images.values():
        assert image.shape == ct.shape and image.dtype == np.float32
        assert image.min() >= -1 and image.max() <= 1
    # the mask is the CT body, cut to where the (smaller) MR field of view has data
    body = body_mask(ct).array.astype(bool)
    mr_view = coverage(mr, ct)
    assert not (case.mask & ~body).any() and not (case.mask & ~mr_view).any()
    assert case.mask.sum() > 0.5 * (body & mr_view).sum()
    # undoing the CT scaling gives back the CT in HU (inside the window)
    assert np.abs(case.physical("ct").array - np.clip(ct.array, -1024, 3000)).max() < 1e-3


def test_a_working_spacing_resamples_the_reference_grid_over_the_same_extent(sample_entry, sample_dir):
    config = PreparationConfig(modalities=["mr", "ct"], reference="ct", spacing=(2.5, 2.5))
    case = prepare_case("STS_003", sample_entry, config)
    ct = read_volume(sample_dir / "ct.nii.gz")
    assert case.geometry.spacing == (2.5, 2.5, ct.geometry.spacing[2]) and case.geometry.origin == ct.geometry.origin
    extent = np.array(ct.geometry.size[:2]) * ct.geometry.spacing[:2]
    assert np.all(np.abs(np.array(case.geometry.size[:2]) * 2.5 - extent) <= 2.5)  # the same field of view
    assert case.images["ct"].shape == case.mask.shape == case.geometry.shape
    # the body covers the same physical area on the coarse grid (to within its outline's pixels)
    fine = prepare_case("STS_003", sample_entry, PreparationConfig(modalities=["mr", "ct"], reference="ct"))
    area = (fine.mask.sum() * np.prod(ct.geometry.spacing[:2]), case.mask.sum() * 2.5 * 2.5)
    assert area[1] == pytest.approx(area[0], rel=0.05)
    assert PreparationConfig.from_dict(config.to_dict()) == config

def test_a_body_mask_from_the_manifest_is_used(tmp_path, sample_dir):
    from crossdiff import write_volume

    ct = read_volume(sample_dir / "ct.nii.gz")
    given = ct.with_array((ct.array > 0).astype(np.uint8), modality="mask")
    write_volume(given, tmp_path / "mask.nii.gz")
    entry = CaseEntry(images={"ct": sample_dir / "ct.nii.gz"}, mask=tmp_path / "mask.nii.gz")
    case = prepare_case("STS_003", entry, PreparationConfig(modalities=["ct"]))
    assert np.array_equal(case.mask, ct.array > 0)


def test_prepared_cases_are_cached_and_the_cache_follows_the_settings(tmp_path, sample_entry, monkeypatch):
    config = PreparationConfig(modalities=["mr", "ct"], reference="ct")
    first = prepare_case("STS_003", sample_entry, config, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("STS_003-*.npz"))) == 1

    def no_reading(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(cases_module, "read_volume", no_reading)
    again = prepare_case("STS_003", sample_entry, config, cache_dir=tmp_path)
    assert np.array_equal(again.images["mr"], first.images["mr"]) and np.array_equal(again.mask, first.mask)
    assert again.scalings == first.scalings and again.geometry == first.geometry
    with pytest.raises(AssertionError, match="cache should have been used"):
        prepare_case(
            "STS_003",
            sample_entry,
            PreparationConfig(modalities=["mr", "ct"], reference="ct", mr_percentiles=(1, 99)),
            cache_dir=tmp_path,
        )


def test_registration_changes_the_mr_and_keeps_the_grid(sample_entry):
    plain = prepare_case("STS_003", sample_entry, PreparationConfig(modalities=["mr", "ct"], reference="ct"))
    registered = prepare_case(
        "STS_003", sample_entry, PreparationConfig(modalities=["mr", "ct"], reference="ct", registration="rigid")
    )
    assert registered.geometry == plain.geometry
    assert not np.array_equal(registered.images["mr"], plain.images["mr"])
    assert np.array_equal(registered.images["ct"], plain.images["ct"])


def test_a_case_without_the_configured_modalities_is_refused(sample_dir):
    entry = CaseEntry(images={"ct": sample_dir / "ct.nii.gz"})
    with pytest.raises(InputError, match="none of the modalities"):
        prepare_case("STS_003", entry, PreparationConfig(modalities=["t1", "t2"]))
