"""Automatic body (foreground) masks for CT, MR and PET.

Metrics, intensity statistics and registration should only look at the patient, not at air, the
couch or zero padding; these masks say where the patient is. Every modality follows the same
recipe: a threshold suited to its intensity scale, then one shared clean-up (closing, largest
connected component, hole filling), so the masks of one patient agree across modalities.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from skimage.morphology import convex_hull_image

from crossdiff.errors import InputError
from crossdiff.units import DISPLAY, HU, SUV
from crossdiff.volumes import Volume

# Air is about -1000 HU and fat about -100 HU: -500 separates them with a wide margin either side.
CT_THRESHOLD_HU = -500.0
# Soft tissue takes up FDG at ~0.2-0.5 SUV, air reads ~0.01; PET blur smears the skin over a few
# millimetres. Against the CT body mask of the three sarcoma patients, Dice peaks at 0.15-0.25 SUV
# (0.95-0.975 at 0.2; 0.94-0.96 at 0.1, where the blur halo is counted as body).
PET_THRESHOLD_SUV = 0.2
# A display-windowed CT (8-bit export) shows air as 0 (below every window in use) with noise of a few
# grey levels (up to ~3 on the paired PNG set), fat at 15-60 in a soft-tissue window: 8 separates them.
# Otsu would cut the dark fat out of the body (paired PNG Patient_12: Dice 0.82 against the MR's mask).
# A brain window (W80 L40) shows fat, air cells and sinuses as 0 too, so the head falls apart into
# pieces open to the outside that hole filling cannot close, and the thin skin line around them does not
# survive an opening; such a CT's body is the convex hull of its parts in each slice (a head's outline).
CT_DISPLAY_AIR_ABOVE = 8.0
DISPLAY_SPECK_FRACTION = 0.005
# MR threshold floor as a fraction of the plain Otsu level; see `mr_foreground`.
MR_OTSU_FRACTION = 0.25
# Closing radius in millimetres: bridges the thin skin line gaps thresholding leaves.
CLOSING_MM = 2.0
# Opening radius in millimetres: the couch mattress (~-400 HU) is a 2-4 mm plate that touches the
# patient (sarcoma STS_002, STS_003) and joins the body's component; an in-plane opening cuts it off.
OPENING_MM = 3.0


def body_mask(
    volume: Volume,
    ct_threshold: float = CT_THRESHOLD_HU,
    pet_threshold: float = PET_THRESHOLD_SUV,
    mr_otsu_fraction: float = MR_OTSU_FRACTION,
    closing_mm: float = CLOSING_MM,
    opening_mm: float = OPENING_MM,
) -> Volume:
    """The patient's body as a uint8 0/1 volume (modality 'mask') on the same grid as `volume`.

    The threshold depends on the modality and its units (CT in HU, PET in SUV; MR, unknown, and any image
    without physical units such as a display-windowed CT: Otsu-based); then only the largest connected
    part is kept and its holes are filled. Raises InputError if
    nothing is left, since an empty body mask would silently turn every later statistic into NaN.
    """
    array = np.asarray(volume.array, dtype=np.float32)
    if volume.modality == "CT" and volume.units in (None, HU):
        foreground = array > ct_threshold
    elif volume.modality == "CT" and volume.units == DISPLAY:
        foreground = array > CT_DISPLAY_AIR_ABOVE
    elif volume.modality == "PET" and volume.units in (None, SUV):
        foreground = array > pet_threshold
    else:
        foreground = mr_foreground(array, mr_otsu_fraction)
    spacing = volume.geometry.spacing
    if volume.modality == "CT" and volume.units == DISPLAY:
        mask = np.stack([_display_outline(plane) for plane in foreground])
    elif volume.planar:  # stacked 2-D images: each slice is its own picture, a body in each
        mask = np.stack([clean_mask(plane[None], spacing, closing_mm, opening_mm)[0] for plane in foreground])
    else:
        mask = clean_mask(foreground, spacing, closing_mm, opening_mm)
    if not mask.any():
        raise InputError(volume.path, f"no body found: the automatic {volume.modality or 'MR'} body mask is empty")
    return volume.with_array(mask.astype(np.uint8), modality="mask", units=None)


def _display_outline(plane: np.ndarray) -> np.ndarray:
    """The convex hull of a windowed CT slice's foreground parts (specks under 0.5% of the slice dropped)."""
    labels, count = ndi.label(plane)
    if count == 0:
        return plane
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    kept = np.isin(labels, np.flatnonzero(sizes >= DISPLAY_SPECK_FRACTION * plane.size))
    return convex_hull_image(kept) if kept.any() else kept


def mr_foreground(array: np.ndarray, otsu_fraction: float = MR_OTSU_FRACTION) -> np.ndarray:
    """Voxels above max(Otsu of log(1 + intensity), `otsu_fraction` x plain Otsu).

    Plain Otsu on MR splits bright tissue (fat, white matter) from dark tissue (muscle, CSF,
    fat-suppressed areas): on the sarcoma T1 it keeps only the fat, and on 12 skull-stripped brain
    volumes its masks reach only Dice 0.94-0.996 against their nonzero region. In the log domain the
    widest gap is usually the one between air and any tissue (brain: Dice >= 0.994). When the grid
    has zero padding (oblique MR, sarcoma STS_001) it is instead the gap between padding and
    everything else, air noise included; the floor at a quarter of plain Otsu (~140 on the
    fat-normalised sarcoma T1, in the valley between air noise ~50 and muscle ~300) catches that.
    """
    values = np.clip(array, 0.0, None)
    if values.min() == values.max():
        return np.zeros(array.shape, dtype=bool)
    log_level = float(np.expm1(threshold_otsu(np.log1p(values))))
    return values > max(log_level, otsu_fraction * float(threshold_otsu(values)))


def clean_mask(
    foreground: np.ndarray,
    spacing: tuple[float, float, float],
    closing_mm: float = CLOSING_MM,
    opening_mm: float = OPENING_MM,
) -> np.ndarray:
    """Keep the body (largest 3-D part, thin plates cut off), close small gaps and fill its holes.

    Closing comes after the component is chosen: closing first bridges the few millimetres of air
    between the patient and the couch, and the couch then joins the body.
    """
    mask = largest_component(drop_thin(foreground, spacing, opening_mm))
    mask = closing(mask, spacing, closing_mm)
    return fill_holes(mask)


def in_plane_disk(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """A one-slice elliptical structuring element of `radius_mm` on this (x, y, z) spacing."""
    ry, rx = (round(radius_mm / s) for s in (spacing[1], spacing[0]))
    y, x = np.ogrid[-ry : ry + 1, -rx : rx + 1]
    disk = (y / max(ry, 1)) ** 2 + (x / max(rx, 1)) ** 2 <= 1.0
    return disk[np.newaxis]


def drop_thin(foreground: np.ndarray, spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Foreground that is not part of thin plates (couch, mattress, sheets) attached to the body.

    An in-plane opening erases everything thinner than 2 * `radius_mm`; the body's own outline,
    which the opening also rounds off, is restored from the original foreground within that radius.
    Only the largest opened part is kept, so plates further than the radius from the body go too.
    """
    disk = in_plane_disk(radius_mm, spacing)
    if radius_mm <= 0 or disk.size == 1:
        return foreground
    core = largest_component(ndi.binary_opening(foreground, disk))
    if not core.any():  # nothing thick at all (a tiny or synthetic image): keep what there is
        return foreground
    return foreground & ndi.binary_dilation(core, disk)


def closing(mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Binary closing with a box of about `radius_mm` in each direction (0 voxels on coarse axes).

    Padding first keeps the closing from eating away foreground that touches the grid border.
    """
    radius = [round(radius_mm / s) for s in spacing[::-1]]  # (z, y, x) like the array
    if not any(radius):
        return mask
    structure = np.ones([2 * r + 1 for r in radius], dtype=bool)
    padded = np.pad(mask, [(r, r) for r in radius], mode="edge")
    closed = ndi.binary_closing(padded, structure)
    return closed[tuple(slice(r, r + n) for r, n in zip(radius, mask.shape))]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 6-connected part: drops the couch, positioning aids and noise specks."""
    labels, count = ndi.label(mask)
    if count <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed cavities in 3-D, then in each axial slice.

    The per-slice pass is needed because a cropped limb is open at the top and bottom slices, so its
    marrow, bowel gas or airways are not enclosed in 3-D but are enclosed in every cross-section.
    """
    filled = ndi.binary_fill_holes(mask)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndi.generate_binary_structure(2, 1)
    return ndi.binary_fill_holes(filled, structure=in_plane)


def acquired_region(volume: Volume) -> np.ndarray:
    """Boolean array: True where the scanner measured something, False in zero padding at the border.

    Exported MR is often resampled from an oblique acquisition, leaving corners of exact zeros
    (about 9 % of the sarcoma STS_001 T1 grid) that are 'no data', not 'no body'; comparing masks
    there would count the padding as disagreement. Zero regions enclosed by data are kept.
    """
    return ndi.binary_fill_holes(volume.array != volume.background)
