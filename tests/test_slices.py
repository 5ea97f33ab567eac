"""Slice datasets on real data: the bundled STS_003 MR/CT pair and two brain MRI subjects (T1, T2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import BRAIN, SAMPLE, require_shared
from torch.utils.data import DataLoader

from crossdiff.data.cases import PreparedCase
from crossdiff.data.slices import (
    PairedSliceDataset,
    SliceConfig,
    UnpairedSliceDataset,
    fit_slice,
    slice_indices,
    unfit_slice,
)
from crossdiff.errors import CrossdiffError
from crossdiff.intensity import fit_scaling
from crossdiff.readers import read_volume
from crossdiff.volumes import Geometry, coverage, resample_to

NO_AUGMENT = {"flip_h": 0.0, "flip_v": 0.0, "rotation": 0.0, "scale": (1.0, 1.0)}


@pytest.fixture(scope="module")
def sts() -> PreparedCase:
    """MR resampled onto the CT grid; the mask is body (CT > -500 HU) inside the MR field of view."""
    ct = read_volume(SAMPLE / "ct.nii.gz")
    mr = read_volume(SAMPLE / "mr.nii.gz")
    mr_on_ct = resample_to(mr, ct)
    mask = (ct.array > -500) & coverage(mr, ct)
    scalings = {"ct": fit_scaling(ct), "mr": fit_scaling(mr_on_ct, mask)}
    images = {"ct": scalings["ct"].apply(ct.array), "mr": scalings["mr"].apply(mr_on_ct.array)}
    return PreparedCase("STS_003", images, mask, ct.geometry, scalings)


def _brain_case(subject: str, key: str) -> PreparedCase:
    """One contrast of one subject on a 4 mm grid (60 x 60 x 39), masked where the skull-stripped image is > 0."""
    require_shared()
    volume = read_volume(BRAIN / subject / f"{key}.nii.gz")
    grid = Geometry((60, 60, 39), (4.0, 4.0, 4.0), volume.geometry.origin, volume.geometry.direction)
    coarse = resample_to(volume, grid)
    mask = coarse.array > 0
    scaling = fit_scaling(coarse, mask)
    return PreparedCase(subject, {key: scaling.apply(coarse.array)}, mask, grid, {key: scaling})


@pytest.fixture(scope="module")
def brains() -> tuple[PreparedCase, PreparedCase]:
    return _brain_case("TCGA-DU-7294", "t1"), _brain_case("TCGA-FG-6692", "t2")


def _same_items(first: dict, second: dict) -> bool:
    return all(
        torch.equal(first[key], second[key]) if isinstance(first[key], torch.Tensor) else first[key] == second[key]
        for key in first
    )


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_paired_items_have_configured_shapes_types_and_ranges(sts: PreparedCase) -> None:
    config = SliceConfig(size=(64, 64), context=1, rotation=30.0, scale=(0.8, 1.2), flip_v=0.5)
    dataset = PairedSliceDataset([sts], "mr", "ct", config, augment=True)
    kept = slice_indices(sts, config)
    for item in dataset:
        assert item["source"].shape == (3, 64, 64) and item["source"].dtype == torch.float32
        assert item["target"].shape == (1, 64, 64) and item["target"].dtype == torch.float32
        assert item["mask"].shape == (1, 64, 64) and item["mask"].dtype == torch.float32
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        for key in ("source", "target"):
            assert -1.0 - 1e-5 <= item[key].min() and item[key].max() <= 1.0 + 1e-5
        assert item["case"] == "STS_003" and item["index"] in kept
    assert dataset.config.channels == 3


def test_slices_with_too_little_mask_are_skipped(sts: PreparedCase, brains: tuple[PreparedCase, PreparedCase]) -> None:
    for axis in (0, 1, 2):
        config = SliceConfig(axis=axis, min_mask_fraction=0.4, size=(32, 32))
        per_slice = [np.take(sts.mask, i, axis=axis) for i in range(sts.mask.shape[axis])]
        expected = [i for i, plane in enumerate(per_slice) if plane.sum() >= 0.4 * plane.size]
        assert 0 < len(expected) < len(per_slice)
        assert slice_indices(sts, config) == expected
    outside_mr = [z for z in range(sts.mask.shape[0]) if not sts.mask[z].any()]
    assert outside_mr, "the MR field of view should end before the CT's"
    assert not set(outside_mr) & set(slice_indices(sts, SliceConfig()))
    t1 = brains[0]
    brain = PreparedCase(t1.case_id, {"mr": t1.images["t1"], "ct": t1.images["t1"]}, t1.mask, t1.geometry)
    config = SliceConfig(size=(32, 32))
    dataset = PairedSliceDataset([sts, brain], "mr", "ct", config)
    assert len(dataset) == len(slice_indices(sts, config)) + len(slice_indices(brain, config))
    assert {item["case"] for item in dataset} == {"STS_003", brain.case_id}


@pytest.mark.parametrize("axis", [0, 2])
def test_context_channels_are_the_neighbouring_source_slices_clamped_at_the_ends(sts: PreparedCase, axis: int) -> None:
    shape = tuple(np.delete(sts.mask.shape, axis))
    config = SliceConfig(axis=axis, size=shape, context=2, min_mask_fraction=0.0, **NO_AUGMENT)
    dataset = PairedSliceDataset([sts], "mr", "ct", config, augment=True)
    last = sts.mask.shape[axis] - 1
    assert len(dataset) == last + 1
    for i in (0, 1, 20, last):
        item = dataset[i]
        assert item["index"] == i
        for channel, offset in enumerate(range(-2, 3)):
            neighbour = min(max(i + offset, 0), last)
            expected = np.take(sts.images["mr"], neighbour, axis=axis)
            np.testing.assert_array_equal(item["source"][channel].numpy(), expected)
        np.testing.assert_array_equal(item["target"][0].numpy(), np.take(sts.images["ct"], i, axis=axis))
        np.testing.assert_array_equal(item["mask"][0].numpy(), np.take(sts.mask, i, axis=axis))


def test_pad_crop_centres_the_slice_with_background(sts: PreparedCase) -> None:
    config = SliceConfig(size=(200, 100), **NO_AUGMENT)  # slices are 158 x 154: pad rows by 42, crop 54 columns
    item = PairedSliceDataset([sts], "mr", "ct", config)[10]
    z = item["index"]
    np.testing.assert_array_equal(item["target"][0, 21:179].numpy(), sts.images["ct"][z][:, 27:127])
    np.testing.assert_array_equal(item["mask"][0, 21:179].numpy(), sts.mask[z][:, 27:127])
    for rows in (slice(0, 21), slice(179, 200)):
        assert (item["source"][:, rows] == -1).all() and (item["target"][:, rows] == -1).all()
        assert (item["mask"][:, rows] == 0).all()


@pytest.mark.parametrize("fit", ["pad-crop", "resize"])
@pytest.mark.parametrize("axis", [0, 1])
def test_both_fits_give_the_configured_size_for_non_square_slices(sts: PreparedCase, fit: str, axis: int) -> None:
    config = SliceConfig(axis=axis, size=(48, 80), fit=fit, context=1)
    item = PairedSliceDataset([sts], "mr", "ct", config, augment=True)[5]
    assert item["source"].shape == (3, 48, 80) and item["target"].shape == item["mask"].shape == (1, 48, 80)


def test_unfit_undoes_pad_crop_exactly_inside_the_kept_region(sts: PreparedCase) -> None:
    image, mask = sts.images["ct"][30], sts.mask[30]  # 158 x 154
    config = SliceConfig(size=(64, 200))  # crop rows 47:111, pad columns
    fitted = fit_slice(image, config)
    assert fitted.shape == (64, 200) and isinstance(fitted, np.ndarray)
    restored = unfit_slice(fitted, image.shape, config)
    assert restored.shape == image.shape and restored.dtype == image.dtype
    np.testing.assert_array_equal(restored[47:111], image[47:111])
    assert (restored[:47] == -1).all() and (restored[111:] == -1).all()
    restored_mask = unfit_slice(fit_slice(mask, config, kind="mask"), mask.shape, config, kind="mask")
    assert restored_mask.dtype == bool
    np.testing.assert_array_equal(restored_mask[47:111], mask[47:111])
    assert not restored_mask[:47].any()
    larger = SliceConfig(size=(181, 160))
    stack = torch.from_numpy(sts.images["mr"][28:31].copy())
    torch.testing.assert_close(unfit_slice(fit_slice(stack, larger), (158, 154), larger), stack, rtol=0, atol=0)


def test_unfit_undoes_resize_approximately(sts: PreparedCase) -> None:
    image, mask = sts.images["ct"][30], sts.mask[30]
    config = SliceConfig(size=(96, 80), fit="resize")
    fitted = fit_slice(image, config)
    assert fitted.shape == (96, 80)
    restored = unfit_slice(fitted, image.shape, config)
    assert restored.shape == image.shape
    assert np.abs(restored - image)[mask].mean() < 0.03  # of a [-1, 1] range: edges blur, nothing moves
    restored_mask = unfit_slice(fit_slice(mask, config, kind="mask"), mask.shape, config, kind="mask")
    assert (restored_mask & mask).sum() / (restored_mask | mask).sum() > 0.95


def _twin_case(sts: PreparedCase) -> PreparedCase:
    """Source and target are the same CT array; the mask is its body (> -500 HU), so it can be recomputed."""
    ct = sts.images["ct"]
    return PreparedCase("twin", {"a": ct, "b": ct}, ct > sts.scalings["ct"].apply(np.float32(-500)), sts.geometry)


def test_source_target_and_mask_move_together(sts: PreparedCase) -> None:
    twin = _twin_case(sts)
    body = float(sts.scalings["ct"].apply(np.float32(-500)))
    config = SliceConfig(size=(160, 176), flip_h=0.5, flip_v=0.5, rotation=40.0, scale=(0.8, 1.2), context=1)
    moved = PairedSliceDataset([twin], "a", "b", config, augment=True)
    still = PairedSliceDataset([twin], "a", "b", config, augment=False)
    moved_dice = []
    for i in range(0, len(moved), 4):
        item, plain = moved[i], still[i]
        torch.testing.assert_close(item["source"][1], item["target"][0], rtol=0, atol=0)
        assert _dice(item["mask"], item["target"] > body) > 0.97
        moved_dice.append(_dice(item["mask"], plain["mask"]))
    assert min(moved_dice) < 0.8, "augmentation should have moved the body"


def test_flips_are_exact_mirror_images(sts: PreparedCase) -> None:
    for flips, dims in (({"flip_h": 1.0}, [-1]), ({"flip_v": 1.0}, [-2])):
        config = SliceConfig(size=(64, 48), context=1, **{**NO_AUGMENT, **flips})
        flipped = PairedSliceDataset([sts], "mr", "ct", config, augment=True)[7]
        plain = PairedSliceDataset([sts], "mr", "ct", config, augment=False)[7]
        for key in ("source", "target", "mask"):
            torch.testing.assert_close(flipped[key], plain[key].flip(dims), rtol=0, atol=0)


def test_scaling_magnifies_about_the_centre_of_a_non_square_slice(sts: PreparedCase) -> None:
    config = SliceConfig(size=(48, 64), **{**NO_AUGMENT, "scale": (2.0, 2.0)})
    zoomed = PairedSliceDataset([sts], "mr", "ct", config, augment=True)[20]["target"]
    plain = PairedSliceDataset([sts], "mr", "ct", config, augment=False)[20]["target"]
    expected = F.interpolate(plain[None, :, 12:36, 16:48], scale_factor=2, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(zoomed[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], rtol=0, atol=1e-5)


def _principal_lengths(mask: torch.Tensor) -> np.ndarray:
    """Square roots of the eigenvalues of the mask's pixel-coordinate covariance: unchanged by rotation."""
    points = torch.nonzero(mask[0]).double().numpy()
    return np.sqrt(np.linalg.eigvalsh(np.cov(points.T)))


def test_rotation_keeps_shapes_on_non_square_slices(sts: PreparedCase) -> None:
    config = SliceConfig(size=(200, 240), **{**NO_AUGMENT, "rotation": 45.0})  # the whole body stays in frame
    rotated = PairedSliceDataset([sts], "mr", "ct", config, augment=True)
    plain = PairedSliceDataset([sts], "mr", "ct", config, augment=False)
    for i in (3, 15, 30):
        assert not torch.equal(rotated[i]["mask"], plain[i]["mask"])
        lengths = _principal_lengths(rotated[i]["mask"])
        np.testing.assert_allclose(lengths, _principal_lengths(plain[i]["mask"]), rtol=0.02)


def test_random_choices_depend_only_on_seed_epoch_and_index(sts: PreparedCase) -> None:
    config = SliceConfig(size=(48, 48), context=1, flip_v=0.5, rotation=30.0)
    first = PairedSliceDataset([sts], "mr", "ct", config, augment=True)
    again = PairedSliceDataset([sts], "mr", "ct", config, augment=True)
    other_seed = PairedSliceDataset([sts], "mr", "ct", SliceConfig(**{**config.to_dict(), "seed": 1}), augment=True)
    indices = range(0, len(first), 5)
    epoch0 = [first[i] for i in indices]
    assert all(_same_items(a, again[i]) for a, i in zip(epoch0, indices))
    assert not all(_same_items(a, other_seed[i]) for a, i in zip(epoch0, indices))
    first.set_epoch(1)
    assert not all(_same_items(a, first[i]) for a, i in zip(epoch0, indices))
    first.set_epoch(0)
    assert all(_same_items(a, first[i]) for a, i in zip(epoch0, indices))


def test_batches_are_the_same_with_and_without_workers(sts: PreparedCase) -> None:
    config = SliceConfig(size=(32, 32), context=1, rotation=20.0)
    dataset = PairedSliceDataset([sts], "mr", "ct", config, augment=True)
    dataset.set_epoch(3)
    serial = list(DataLoader(dataset, batch_size=8, num_workers=0))
    parallel = list(DataLoader(dataset, batch_size=8, num_workers=2))
    assert len(serial) == len(parallel) == -(-len(dataset) // 8)
    for one, two in zip(serial, parallel):
        assert one["case"] == two["case"]
        for key in ("source", "target", "mask", "index"):
            torch.testing.assert_close(one[key], two[key], rtol=0, atol=0)


def test_unpaired_items_pair_slices_of_different_cases(brains: tuple[PreparedCase, PreparedCase]) -> None:
    t1, t2 = brains
    config = SliceConfig(size=(60, 60), context=1, **NO_AUGMENT)
    dataset = UnpairedSliceDataset([t1], [t2], "t1", "t2", config, augment=True)
    assert len(dataset) == len(slice_indices(t1, config))
    kept_targets = set(slice_indices(t2, config))
    partners = []
    for i in range(len(dataset)):
        item = dataset[i]
        assert (item["source_case"], item["target_case"]) == (t1.case_id, t2.case_id)
        z, w = item["source_index"], item["target_index"]
        assert w in kept_targets
        np.testing.assert_array_equal(item["source"].numpy(), t1.images["t1"][[max(z - 1, 0), z, min(z + 1, 38)]])
        np.testing.assert_array_equal(item["target"][0].numpy(), t2.images["t2"][w])
        np.testing.assert_array_equal(item["target_mask"][0].numpy(), t2.mask[w])
        np.testing.assert_array_equal(item["source_mask"][0].numpy(), t1.mask[z])
        partners.append(w)
    assert len(set(partners)) > len(partners) // 3
    again = UnpairedSliceDataset([t1], [t2], "t1", "t2", config, augment=True)
    assert [again[i]["target_index"] for i in range(len(again))] == partners
    again.set_epoch(1)
    assert [again[i]["target_index"] for i in range(len(again))] != partners


def test_unpaired_sides_are_augmented_independently(brains: tuple[PreparedCase, PreparedCase]) -> None:
    t1, t2 = brains
    config = SliceConfig(size=(64, 64), **{**NO_AUGMENT, "flip_h": 0.5})
    moved = UnpairedSliceDataset([t1], [t2], "t1", "t2", config, augment=True)
    still = UnpairedSliceDataset([t1], [t2], "t1", "t2", config, augment=False)
    decisions = set()
    for i in range(len(moved)):
        item, plain = moved[i], still[i]
        assert item["target_index"] == plain["target_index"]
        flipped = []
        for side in ("source", "target"):
            if torch.equal(item[side], plain[side].flip(-1)) and not torch.equal(item[side], plain[side]):
                flipped.append(True)
            else:
                assert torch.equal(item[side], plain[side])
                flipped.append(False)
        decisions.add(tuple(flipped))
    assert {(True, False), (False, True)} <= decisions


def test_cases_without_a_modality_are_refused_by_name(
    sts: PreparedCase, brains: tuple[PreparedCase, PreparedCase]
) -> None:
    ct_only = PreparedCase("CT-ONLY-7", {"ct": sts.images["ct"]}, sts.mask, sts.geometry)
    with pytest.raises(CrossdiffError, match="CT-ONLY-7.*mr"):
        PairedSliceDataset([sts, ct_only], "mr", "ct", SliceConfig())
    with pytest.raises(CrossdiffError, match="TCGA-DU-7294.*t2"):
        UnpairedSliceDataset([brains[1]], [brains[0]], "t2", "t2", SliceConfig())
    with pytest.raises(CrossdiffError, match="no slices"):
        PairedSliceDataset([sts], "mr", "ct", SliceConfig(min_mask_fraction=1.0))


def test_config_survives_yaml_and_refuses_bad_settings() -> None:
    config = SliceConfig(axis=2, size=(96, 64), fit="resize", context=2, scale=(0.9, 1.0), seed=7)
    assert SliceConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config
    for bad in ({"fit": "stretch"}, {"axis": 3}, {"size": (0, 64)}, {"scale": (1.2, 1.0)}, {"flip_h": 2.0}):
        with pytest.raises(CrossdiffError):
            SliceConfig(**bad)
    with pytest.raises(CrossdiffError, match="unknown"):
        SliceConfig.from_dict({"patch": 64})
