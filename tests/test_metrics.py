"""SynthRAD2023 metrics on real CT volumes, checked against the published formulas written out directly."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from crossdiff import read_volume
from crossdiff.errors import CrossdiffError
from crossdiff.evaluation.metrics import synthrad_metrics
from crossdiff.masks import body_mask


@pytest.fixture(scope="module")
def ct_pair(sample_dir):
    """The real CT and a degraded copy (noise, a bias and a shifted slab), with the body mask."""
    ct = read_volume(sample_dir / "ct.nii.gz")
    rng = np.random.default_rng(0)
    degraded = ct.array + rng.normal(0, 40, ct.shape) + 15
    degraded[20:25] = np.roll(ct.array[20:25], 3, axis=2)
    return ct.array.astype(np.float64), degraded, body_mask(ct).array.astype(bool)


def test_metrics_follow_the_published_definitions(ct_pair):
    ct, sct, mask = ct_pair
    metrics = synthrad_metrics(ct, sct, mask)
    assert metrics.mae == pytest.approx(np.sum(np.abs(ct - sct) * mask) / np.sum(mask))
    a, b = np.clip(ct, -1024, 3000)[mask], np.clip(sct, -1024, 3000)[mask]
    assert metrics.psnr == pytest.approx(10 * np.log10(4024**2 / np.mean((a - b) ** 2)))
    ref = np.where(mask, np.clip(ct, -1024, 3000), -1024) + 1024
    pred = np.where(mask, np.clip(sct, -1024, 3000), -1024) + 1024
    _, full = structural_similarity(ref, pred, data_range=4024, full=True)
    assert metrics.ssim == pytest.approx(full[mask].mean())


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # PSNR of a perfect prediction is infinite
def test_metrics_rank_a_closer_prediction_higher(ct_pair):
    ct, sct, mask = ct_pair
    far = synthrad_metrics(ct, sct, mask)
    near = synthrad_metrics(ct, 0.5 * (ct + sct), mask)
    perfect = synthrad_metrics(ct, ct, mask)
    assert near.mae < far.mae and near.psnr > far.psnr and near.ssim > far.ssim
    assert perfect.mae == 0 and perfect.ssim == pytest.approx(1.0)


def test_shape_mismatch_and_empty_mask_are_refused(ct_pair):
    ct, sct, mask = ct_pair
    with pytest.raises(CrossdiffError, match="shapes differ"):
        synthrad_metrics(ct, sct[1:], mask)
    with pytest.raises(CrossdiffError, match="mask is empty"):
        synthrad_metrics(ct, sct, np.zeros_like(mask))
