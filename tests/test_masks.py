"""Body masks on real images: the bundled STS_003 sample and the shared sarcoma and brain sets.

Expectations come from the data itself (HU of air and couch, the tumour contour, the skull-stripped
brain's nonzero region, another modality's mask), never from a value the masks produced earlier.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import BRAIN, SAMPLE, SARCOMA
from scipy import ndimage as ndi

from crossdiff.errors import InputError
from crossdiff.masks import body_mask
from crossdiff.readers import read_mask, read_volume
from crossdiff.registration import dice
from crossdiff.volumes import Volume, resample_to


@pytest.fixture(scope="module")
def ct() -> Volume:
    return read_volume(SAMPLE / "ct.nii.gz")


@pytest.fixture(scope="module")
def masks(ct: Volume) -> dict[str, tuple[Volume, Volume]]:
    """(image, body mask) per modality of the sample patient."""
    images = {"CT": ct, "MR": read_volume(SAMPLE / "mr.nii.gz"), "PET": read_volume(SAMPLE / "pet.nii.gz")}
    return {name: (image, body_mask(image)) for name, image in images.items()}


def test_modalities_are_what_the_mask_dispatches_on(masks):
    assert {name: image.modality for name, (image, _) in masks.items()} == {"CT": "CT", "MR": "MR", "PET": "PET"}


@pytest.mark.parametrize("modality", ["CT", "MR", "PET"])
def test_mask_is_a_binary_volume_on_the_image_grid(masks, modality):
    image, mask = masks[modality]
    assert mask.array.dtype == np.uint8
    assert set(np.unique(mask.array)) == {0, 1}
    assert mask.modality == "mask"
    assert mask.geometry == image.geometry
    assert mask.path == image.path


@pytest.mark.parametrize("modality", ["CT", "MR", "PET"])
def test_mask_is_one_component_without_holes(masks, modality):
    """One body, no cavities: neither in 3-D nor in any axial slice (marrow, bowel gas)."""
    mask = masks[modality][1].array.astype(bool)
    assert ndi.label(mask)[1] == 1
    assert np.array_equal(ndi.binary_fill_holes(mask), mask)
    for axial in mask:
        assert np.array_equal(ndi.binary_fill_holes(axial), axial)


def test_ct_mask_excludes_air_corners(masks):
    """The two posterior corners of the sample CT are air (checked first); the mask leaves them out."""
    image, mask = masks["CT"]
    for corner in (np.s_[:, -5:, :5], np.s_[:, -5:, -5:]):
        assert image.array[corner].max() < -150, "test premise: this corner is air"
        assert not mask.array[corner].any()


def test_ct_mask_excludes_the_couch(masks):
    """The couch top lies at rows >= 150 (HU > 100 there is couch, the patient ends above it)."""
    image, mask = masks["CT"]
    couch = np.zeros(image.shape, dtype=bool)
    couch[:, 150:, :] = image.array[:, 150:, :] > 100
    assert couch.sum() > 1000, "test premise: the couch is in the field of view"
    assert not mask.array[couch].any()


@pytest.mark.parametrize("patient", ["STS_002", "STS_003"])
def test_ct_mask_is_tissue_not_mattress_and_air(shared_data, patient):
    """A 2 mm mattress (-400 HU) touches the patient and joins the largest component; with it comes
    the air between mattress and skin, filled as a hole. In the body itself only bowel gas and skin
    partial volume read below -500 HU: well under 2 % of the voxels (2.4-2.9 % with the mattress)."""
    image = read_volume(SARCOMA / patient / "CT" / "nifti" / "image" / "image.nii.gz")
    body = body_mask(image).array > 0
    assert (image.array[body] < -500).mean() < 0.02


def test_ct_mask_fills_bowel_gas(masks):
    """Rectal gas (-1000 HU) inside the pelvis at slice 45 belongs to the body."""
    image, mask = masks["CT"]
    assert image.array[45, 54, 133] < -900, "test premise: gas at this voxel"
    assert mask.array[45, 54, 133] == 1


def test_ct_mask_covers_the_tumour(shared_data, masks):
    image, mask = masks["CT"]
    gtv = read_mask(SARCOMA / "STS_003" / "CT" / "nifti" / "mask" / "mask.nii.gz", reference=image)
    assert mask.array[gtv.array > 0].all()


@pytest.mark.parametrize("patient", ["STS_001", "STS_002"])
def test_ct_mask_covers_the_tumour_of_other_patients(shared_data, patient):
    folder = SARCOMA / patient / "CT" / "nifti"
    image = read_volume(folder / "image" / "image.nii.gz")
    gtv = read_mask(folder / "mask" / "mask.nii.gz", reference=image)
    assert body_mask(image).array[gtv.array > 0].all()


def test_mr_and_pet_masks_agree_with_ct(masks):
    """Same patient, same frame of reference: the masks overlap once on one grid. Measured Dice without
    registration (inside the other image's field of view): MR 0.934 (soft tissue deformed between
    scans), PET 0.972; the margins below fail if either mask loses muscle, gains air or the couch."""
    ct_image, ct_mask = masks["CT"]
    for modality, minimum in (("MR", 0.90), ("PET", 0.94)):
        image, mask = masks[modality]
        on_ct = resample_to(mask, ct_image, "nearest", 0).array > 0
        view = resample_to(image.with_array(np.ones(image.shape, np.uint8)), ct_image, "nearest", 0).array > 0
        assert dice(ct_mask.array.astype(bool) & view, on_ct & view) > minimum, modality


def test_mr_mask_keeps_dark_brain_tissue(shared_data):
    """On a skull-stripped T1 everything nonzero is brain. Plain Otsu keeps 83 % of it (it splits
    grey matter and CSF from white matter); the body mask must keep nearly all."""
    image = read_volume(BRAIN / "TCGA-DU-7294" / "t1.nii.gz")
    brain = ndi.binary_fill_holes(image.array != 0)
    assert dice(body_mask(image).array.astype(bool), brain) > 0.99


def test_unknown_modality_takes_the_mr_path(masks):
    image, mask = masks["MR"]
    unknown = image.with_array(image.array, modality=None)
    assert np.array_equal(body_mask(unknown).array, mask.array)


@pytest.mark.parametrize("modality, value", [("CT", -1000.0), ("PET", 0.0), ("MR", 0.0)])
def test_empty_mask_raises_input_error_naming_the_file(ct, modality, value):
    blank = ct.with_array(np.full(ct.shape, value, dtype=np.float32), modality=modality)
    with pytest.raises(InputError) as raised:
        body_mask(blank)
    assert raised.value.path == ct.path
    assert "empty" in raised.value.problem


def test_ct_threshold_is_configurable(masks):
    """A threshold above soft tissue (fat -100, muscle 50 HU) leaves far less than the default."""
    image, mask = masks["CT"]
    assert body_mask(image, ct_threshold=200.0).array.sum() < 0.5 * mask.array.sum()
