"""Intensity scaling on real CT, MR and PET: the right window, and an exact way back."""

from __future__ import annotations

import numpy as np
import pytest

from crossdiff import read_volume
from crossdiff.errors import CrossdiffError
from crossdiff.intensity import IntensityScaling, fit_scaling


def test_ct_window_maps_hu_to_unit_range_and_back_exactly(sample_dir):
    ct = read_volume(sample_dir / "ct.nii.gz")
    scaling = fit_scaling(ct)
    assert (scaling.method, scaling.low, scaling.high) == ("ct-window", -1024.0, 3000.0)
    scaled = scaling.apply(ct.array)
    assert scaled.min() >= -1 and scaled.max() <= 1
    # air (-1000 HU) sits just above -1; water (0 HU) at 2*1024/4024 - 1
    assert scaling.apply(np.array([0.0]))[0] == pytest.approx(2 * 1024 / 4024 - 1, abs=1e-6)
    back = scaling.invert(scaled)
    assert np.abs(back - np.clip(ct.array, -1024, 3000)).max() < 1e-3


def test_mr_percentile_scaling_uses_the_mask(sample_dir):
    mr = read_volume(sample_dir / "mr.nii.gz")
    mask = mr.array > np.percentile(mr.array, 60)
    scaling = fit_scaling(mr, mask)
    low, high = np.percentile(mr.array[mask], [0.5, 99.5])
    assert scaling.method == "percentile"
    assert scaling.low == pytest.approx(low) and scaling.high == pytest.approx(high)
    inside = mr.array[mask]
    kept = (inside >= low) & (inside <= high)
    assert np.allclose(scaling.invert(scaling.apply(inside[kept])), inside[kept], atol=1e-3 * (high - low))


def test_mean_scaling_follows_syndiff(sample_dir):
    mr = read_volume(sample_dir / "mr.nii.gz")
    mask = mr.array > 0
    scaling = fit_scaling(mr, mask, method="mean", mean_multiple=2.0)
    assert scaling.low == 0.0
    assert scaling.high == pytest.approx(2.0 * mr.array[mask].mean(), rel=1e-5)


def test_pet_suv_window_and_round_trip_through_dict(sample_dir):
    pet = read_volume(sample_dir / "pet.nii.gz")
    scaling = fit_scaling(pet)
    assert (scaling.method, scaling.low, scaling.high, scaling.units) == ("suv", 0.0, 20.0, "SUVbw")
    assert IntensityScaling.from_dict(scaling.to_dict()) == scaling


def test_bad_windows_are_refused(sample_dir):
    ct = read_volume(sample_dir / "ct.nii.gz")
    with pytest.raises(CrossdiffError, match="empty"):
        fit_scaling(ct, window=(100.0, 100.0))
    with pytest.raises(CrossdiffError, match="unknown intensity scaling"):
        fit_scaling(ct, method="zscore")
    with pytest.raises(CrossdiffError, match="needs a window"):
        fit_scaling(ct, method="fixed")
