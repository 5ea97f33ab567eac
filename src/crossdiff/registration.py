"""Rigid, affine and B-spline registration by Mattes mutual information (SimpleITK), and alignment measures.

Paired translation methods learn whatever misalignment their training pairs carry, so the MR of a
patient is registered onto the CT grid before slices are cut. Mutual information is used because
MR and CT intensities are related, but not by any fixed function.

Three choices matter on real data and are made deliberately here:

* The start is the identity, centred on the fixed image. Scans of one patient usually share a frame
  of reference (the sarcoma CT, MR and PET do) but are cropped differently; a geometry- or
  moments-centred start would shift them by the difference of their fields of view.
* Random metric sampling uses a fixed seed and ITK runs single-threaded during registration: ITK's
  Mattes metric sums per-thread histograms in a varying order, so with more than one thread the same
  call gave a different transform on every run (translations up to 9 mm apart on sarcoma STS_003).
* Steps are capped at 1 mm and the optimiser stops when the metric stops improving. MI on these
  cropped limb images keeps rising as the images slide apart (less overlap, fewer hard voxels); an
  optimiser allowed to run on (regular-step descent) moved the STS_001 MR by 100+ mm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

from crossdiff.errors import CrossdiffError
from crossdiff.masks import acquired_region
from crossdiff.volumes import Volume, resample_to

TRANSFORMS = ("rigid", "affine", "bspline")
INITIALISATIONS = ("identity", "moments")
HISTOGRAM_BINS = 50
SHRINK_FACTORS = (4, 2, 1)
SMOOTHING_MM = (2.0, 1.0, 0.0)
BSPLINE_MESH_MM = 60.0
MAX_STEP_MM = 1.0
# Metric samples stay this far inside the moving image's field of view, so that a few millimetres
# of motion do not push them out of it (ITK drops such samples, which makes the metric jump).
MARGIN_MM = 10.0

Progress = Callable[[int, float], None]


@dataclass
class RegistrationResult:
    """What `register` found.

    `transform` maps fixed-image points to moving-image points (SimpleITK's convention), so
    `resample_to(moving, fixed, transform=result.transform)` reproduces `volume`, and masks or labels
    of the moving image follow with interpolation='nearest'. `metric_before` and `metric_after` are
    the Mattes mutual information (nats, higher is better; SimpleITK reports its negative) over every
    voxel of the overlap at full resolution, before and after registration. `iterations` is the
    number of optimiser steps over all levels and stages.
    """

    volume: Volume
    transform: sitk.Transform
    metric_before: float
    metric_after: float
    iterations: int


def register(
    fixed: Volume,
    moving: Volume,
    transform: str = "rigid",
    seed: int = 0,
    iterations: int = 200,
    progress: Progress | None = None,
    init: str = "identity",
    sampling: float = 0.1,
    shrink_factors: tuple[int, ...] = SHRINK_FACTORS,
    smoothing_mm: tuple[float, ...] = SMOOTHING_MM,
    mesh_mm: float = BSPLINE_MESH_MM,
    threads: int = 1,
) -> RegistrationResult:
    """Register `moving` onto `fixed` by Mattes mutual information and resample it onto the fixed grid.

    `transform` is 'rigid' (6 parameters), 'affine' (12) or 'bspline' (affine, then a B-spline on a
    mesh of about `mesh_mm` millimetres); each stage starts where the previous one ended (rigid, then
    affine, then B-spline). `iterations` bounds the optimiser steps per resolution level;
    `sampling` is the fraction of voxels drawn (with `seed`) for the metric at each step. The metric
    only looks at the part of the fixed grid that the moving image covers with data. With the
    default `threads=1` results are identical run to run; more threads are faster but not repeatable.
    """
    if transform not in TRANSFORMS:
        raise CrossdiffError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
    if init not in INITIALISATIONS:
        raise CrossdiffError(f"unknown initialisation {init!r}; choose one of {', '.join(INITIALISATIONS)}")
    if not 0 <= seed < 2**32 - 1:
        raise CrossdiffError(f"seed must be between 0 and {2**32 - 2}, not {seed}")
    if len(shrink_factors) != len(smoothing_mm):
        raise CrossdiffError("give one smoothing value per shrink factor")
    fixed_image, moving_image = _float_image(fixed), _float_image(moving)
    overlap = _overlap(fixed, moving)
    settings = _Settings(_inner(overlap, MARGIN_MM), seed, iterations, sampling, shrink_factors, smoothing_mm, progress)
    with _itk_threads(threads):
        start = _initial(fixed_image, moving_image, init)
        found: sitk.Transform = _run(settings, fixed_image, moving_image, start, _gradient_descent)
        if transform in ("affine", "bspline"):
            found = _run(settings, fixed_image, moving_image, _affine_from(found), _gradient_descent)
        if transform == "bspline":
            found = _bspline_stage(settings, fixed_image, moving_image, found, mesh_mm)
        before = mattes_mutual_information(fixed_image, moving_image, start, overlap)
        after = mattes_mutual_information(fixed_image, moving_image, found, overlap)
    return RegistrationResult(
        volume=resample_to(moving, fixed, "linear", transform=found),
        transform=found,
        metric_before=before,
        metric_after=after,
        iterations=settings.steps,
    )


@contextmanager
def _itk_threads(threads: int) -> Iterator[None]:
    """Run ITK with `threads` threads, then restore the global default (SimpleITK has no other knob
    that reaches the metric's own threading)."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, threads))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


@dataclass
class _Settings:
    """What every stage of one `register` call shares, plus its running step count."""

    mask: sitk.Image
    seed: int
    iterations: int
    sampling: float
    shrink_factors: tuple[int, ...]
    smoothing_mm: tuple[float, ...]
    progress: Progress | None
    steps: int = 0


def _float_image(volume: Volume) -> sitk.Image:
    return sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)


def _overlap(fixed: Volume, moving: Volume) -> sitk.Image:
    """Fixed-grid mask of where the moving image has data: its field of view minus zero padding."""
    has_data = moving.with_array(acquired_region(moving).astype(np.uint8), modality="mask")
    covered = resample_to(has_data, fixed, "nearest", 0)
    if not covered.array.any():
        raise CrossdiffError(
            f"{moving.path or 'the moving image'} and {fixed.path or 'the fixed image'} do not overlap "
            "in physical space; check their origins and directions"
        )
    return covered.to_sitk()


def _inner(mask: sitk.Image, margin_mm: float) -> sitk.Image:
    """The part of `mask` at least `margin_mm` from its edge; unchanged if that leaves nothing.

    Distances are measured in millimetres to the nearest voxel outside the mask within the grid, so
    where the moving image reaches past the fixed grid's border no margin is taken there.
    """
    array = sitk.GetArrayViewFromImage(mask) > 0
    depth = ndi.distance_transform_edt(array, sampling=mask.GetSpacing()[::-1])
    inner = depth > margin_mm
    if not inner.any():
        return mask
    image = sitk.GetImageFromArray(inner.astype(np.uint8))
    image.CopyInformation(mask)
    return image


def _initial(fixed: sitk.Image, moving: sitk.Image, init: str) -> sitk.Euler3DTransform:
    """Identity rotation about the fixed image's centre, or centres of mass matched ('moments')."""
    if init == "moments":
        return sitk.Euler3DTransform(
            sitk.CenteredTransformInitializer(
                fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
            )
        )
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in fixed.GetSize()])
    start = sitk.Euler3DTransform()
    start.SetCenter(centre)
    return start


def _affine_from(rigid: sitk.Euler3DTransform) -> sitk.AffineTransform:
    """The same mapping as an affine transform, so the affine stage starts where the rigid one ended."""
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    return affine


def _method(settings: _Settings, shrink: tuple[int, ...], smoothing: tuple[float, ...]) -> sitk.ImageRegistrationMethod:
    """Mattes MI on random samples drawn with the fixed seed, limited to the overlap, multi-resolution."""
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetMetricSamplingStrategy(method.RANDOM)
    # SimpleITK reads seed 0 as "use the clock", so our seed s is passed as s + 1.
    method.SetMetricSamplingPercentage(settings.sampling, settings.seed + 1)
    method.SetMetricFixedMask(settings.mask)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel(list(shrink))
    method.SetSmoothingSigmasPerLevel(list(smoothing))
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def _gradient_descent(method: sitk.ImageRegistrationMethod, iterations: int) -> None:
    """Gradient descent with steps of at most 1 mm, stopping once the metric stops improving.

    Scales from physical shift put millimetres and radians on one footing.
    """
    method.SetOptimizerAsGradientDescent(
        learningRate=1.0,
        numberOfIterations=iterations,
        convergenceMinimumValue=1e-6,
        convergenceWindowSize=10,
        estimateLearningRate=method.Once,
        maximumStepSizeInPhysicalUnits=MAX_STEP_MM,
    )
    method.SetOptimizerScalesFromPhysicalShift()


def _lbfgsb(method: sitk.ImageRegistrationMethod, iterations: int) -> None:
    """L-BFGS-B for the many B-spline coefficients, where gradient descent crawls."""
    method.SetOptimizerAsLBFGSB(
        gradientConvergenceTolerance=1e-5,
        numberOfIterations=iterations,
        maximumNumberOfCorrections=5,
        maximumNumberOfFunctionEvaluations=4 * iterations,
        costFunctionConvergenceFactor=1e7,
    )


def _run(
    settings: _Settings,
    fixed: sitk.Image,
    moving: sitk.Image,
    start: sitk.Transform,
    optimizer: Callable[[sitk.ImageRegistrationMethod, int], None],
    shrink: tuple[int, ...] | None = None,
    smoothing: tuple[float, ...] | None = None,
    moving_initial: sitk.Transform | None = None,
) -> sitk.Transform:
    """One optimisation stage; returns the optimised copy of `start` (never changes `start` itself)."""
    method = _method(settings, shrink or settings.shrink_factors, smoothing or settings.smoothing_mm)
    optimizer(method, settings.iterations)
    if moving_initial is not None:
        method.SetMovingInitialTransform(moving_initial)
    method.SetInitialTransform(start, inPlace=False)

    def step() -> None:
        settings.steps += 1
        if settings.progress is not None:
            settings.progress(settings.steps, -method.GetMetricValue())

    method.AddCommand(sitk.sitkIterationEvent, step)
    try:
        found = method.Execute(fixed, moving)
    except RuntimeError as error:
        raise CrossdiffError(f"registration failed: {str(error).strip().splitlines()[-1]}") from None
    return _unwrap(found)


def _unwrap(transform: sitk.Transform) -> sitk.Transform:
    """The concrete transform (Euler3DTransform, ...) out of the one-element composite Execute returns."""
    if isinstance(transform, sitk.CompositeTransform) and transform.GetNumberOfTransforms() == 1:
        transform = transform.GetNthTransform(0)
    return transform.Downcast()


def _bspline_stage(
    settings: _Settings, fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform, mesh_mm: float
) -> sitk.CompositeTransform:
    """Deformable refinement after the affine: a coarse B-spline applied before the affine.

    It runs on all but the finest pyramid level: a mesh of several centimetres learns nothing from
    full-resolution detail, and skipping it cut the time ~3x on the sarcoma set (NMI 1.0325 instead of
    1.0354 on STS_003). The result maps a fixed point x to affine(bspline(x)), as one CompositeTransform.
    """
    extent = [sz * sp for sz, sp in zip(fixed.GetSize(), fixed.GetSpacing())]
    mesh = [max(1, round(e / mesh_mm)) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    coarse = settings.shrink_factors[:-1] or settings.shrink_factors
    smooth = settings.smoothing_mm[: len(coarse)]
    deformation = _run(settings, fixed, moving, bspline, _lbfgsb, coarse, smooth, moving_initial=affine)
    return sitk.CompositeTransform([affine, deformation])


def mattes_mutual_information(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, mask: sitk.Image | None = None
) -> float:
    """Mattes mutual information (nats, higher is better) of `fixed` and `moving` seen through `transform`.

    Every voxel of `mask` (or of the fixed grid) counts: no sampling, no smoothing, no shrinking, so
    the value is exact and comparable between transforms.
    """
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=HISTOGRAM_BINS)
    method.SetInterpolator(sitk.sitkLinear)
    if mask is not None:
        method.SetMetricFixedMask(mask)
    method.SetMovingInitialTransform(transform)
    method.SetInitialTransform(sitk.TranslationTransform(3), inPlace=False)
    return -float(method.MetricEvaluate(fixed, moving))


def normalized_mutual_information(
    a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, bins: int = 64
) -> float:
    """Studholme's normalised mutual information (H(A) + H(B)) / H(A, B), from 1 (independent) to 2.

    Our own short implementation from a numpy joint histogram of the voxels in `mask` (all voxels
    when None), with `bins` equal-width bins per image over its range inside the mask. Unlike raw MI
    it does not reward a registration for merely growing the overlap.
    """
    if a.shape != b.shape or (mask is not None and mask.shape != a.shape):
        raise ValueError(f"shapes differ: {a.shape}, {b.shape}" + (f", mask {mask.shape}" if mask is not None else ""))
    keep = np.ones(a.shape, dtype=bool) if mask is None else mask.astype(bool)
    if not keep.any():
        raise ValueError("the mask selects no voxel")
    joint, _, _ = np.histogram2d(a[keep].ravel(), b[keep].ravel(), bins=bins)
    joint = joint / joint.sum()
    joint_entropy = _entropy(joint)
    if joint_entropy == 0.0:  # both constant: each predicts the other perfectly
        return 2.0
    return (_entropy(joint.sum(axis=1)) + _entropy(joint.sum(axis=0))) / joint_entropy


def _entropy(probabilities: np.ndarray) -> float:
    p = probabilities[probabilities > 0]
    return float(-(p * np.log(p)).sum())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap 2|A and B| / (|A| + |B|) of two masks (nonzero is foreground); 1.0 when both are empty."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    a, b = a.astype(bool), b.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


# ----------------------------------------------------------------------------- slice-wise 2-D pairing

SLICE_TRANSFORMS = ("rigid-2d", "affine-2d")
DICE_TOLERANCE = 0.005  # a slice's registration is kept unless it lowers body-mask Dice by more than this


@dataclass
class SliceRegistration:
    """`register_slices` result: the moving stack on the fixed grid, where it has data, and per slice
    the body-mask Dice and NMI before (as exported) and after registration, and whether it was kept."""

    volume: Volume
    covered: np.ndarray
    rows: list[dict[str, float]]

    def dice(self, stage: str) -> float:
        """Mean body-mask Dice over the slices, 'before' or 'after'."""
        return float(np.mean([row[f"dice_{stage}"] for row in self.rows])) if self.rows else float("nan")


def register_slices(
    fixed: Volume, moving: Volume, fixed_mask: np.ndarray, moving_mask: np.ndarray,
    transform: str = "affine-2d", seed: int = 0, iterations: int = 200,
) -> SliceRegistration:
    """Register each 2-D slice of `moving` onto the same slice of `fixed` (Mattes MI, rigid or affine).

    For stacks of exported 2-D slices (the paired PNG sets) whose k-th images show the same level but
    with another field of view and scale: a 3-D transform cannot fix a per-slice zoom. Each slice starts
    from its body masks' match (centroids, and for affine the scale from their areas), then Mattes MI
    refines it inside the fixed body. A slice whose registration lowers the body-mask Dice (by more than
    DICE_TOLERANCE) or the NMI keeps its exported position: registration must not make a pair worse.
    """
    if transform not in SLICE_TRANSFORMS:
        raise CrossdiffError(f"unknown slice transform {transform!r}; choose one of {', '.join(SLICE_TRANSFORMS)}")
    if fixed.shape[0] != moving.shape[0]:
        raise CrossdiffError(f"slice-wise registration needs as many slices in both stacks ({fixed.shape[0]} vs "
                             f"{moving.shape[0]})")
    spacing = fixed.geometry.spacing[:2]
    aligned = np.empty(fixed.shape, dtype=np.float32)
    covered = np.zeros(fixed.shape, dtype=bool)
    rows = []
    with _itk_threads(1):
        for index in range(fixed.shape[0]):
            plane, region, row = _register_plane(
                fixed.array[index], moving.array[index], fixed_mask[index], moving_mask[index], spacing,
                transform, seed, iterations, moving.background,
            )
            aligned[index], covered[index] = plane, region
            rows.append({"slice": index, **row})
    return SliceRegistration(fixed.with_array(aligned, modality=moving.modality, units=moving.units), covered, rows)


def _register_plane(
    fixed: np.ndarray, moving: np.ndarray, fixed_mask: np.ndarray, moving_mask: np.ndarray,
    spacing: tuple[float, float], transform: str, seed: int, iterations: int, background: float,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """One slice: (moving resampled onto fixed, where it has data, Dice/NMI before and after, kept)."""
    images = [_plane_image(a, spacing) for a in (fixed, moving)]
    masks = [_plane_image(m.astype(np.uint8), spacing) for m in (fixed_mask, moving_mask)]
    identity = sitk.AffineTransform(2)

    def warp(image: sitk.Image, found: sitk.Transform, value: float, nearest: bool = False) -> np.ndarray:
        method = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
        return sitk.GetArrayFromImage(sitk.Resample(image, images[0], found, method, value, image.GetPixelID()))

    def scores(found: sitk.Transform) -> tuple[float, float]:
        warped_mask = warp(masks[1], found, 0, nearest=True) > 0
        warped = warp(images[1], found, background)
        both = fixed_mask | warped_mask
        nmi = normalized_mutual_information(fixed, warped, both) if both.any() else 1.0
        return dice(fixed_mask, warped_mask), nmi

    dice_before, nmi_before = scores(identity)
    found: sitk.Transform = identity
    if fixed_mask.any() and moving_mask.any():
        region = sitk.Cast(sitk.BinaryDilate(masks[0], [5, 5]), sitk.sitkUInt8)
        settings = _Settings(region, seed, iterations, 0.25, SHRINK_FACTORS, (2.0, 1.0, 0.0), None)
        start = _plane_start(fixed_mask, moving_mask, spacing, scale=transform == "affine-2d")
        if transform == "rigid-2d":
            rigid = sitk.Euler2DTransform()
            rigid.SetCenter(start.GetCenter())
            rigid.SetTranslation(start.GetTranslation())
            start = rigid
        try:
            found = _run(settings, images[0], images[1], start, _gradient_descent)
        except CrossdiffError:
            found = identity
    dice_after, nmi_after = scores(found)
    kept = dice_after >= dice_before - DICE_TOLERANCE and nmi_after >= nmi_before
    chosen = found if kept else identity
    ones = _plane_image(np.ones(moving.shape, dtype=np.uint8), spacing)
    row = {"dice_before": dice_before, "dice_after": dice_after if kept else dice_before, "nmi_before": nmi_before,
           "nmi_after": nmi_after if kept else nmi_before, "kept": float(kept)}
    return warp(images[1], chosen, background), warp(ones, chosen, 0, nearest=True) > 0, row


def _plane_image(array: np.ndarray, spacing: tuple[float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array if array.dtype == np.uint8 else array.astype(np.float32)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    return image


def _plane_start(fixed_mask: np.ndarray, moving_mask: np.ndarray, spacing: tuple[float, float],
                 scale: bool) -> sitk.AffineTransform:
    """Fixed -> moving points matching the body masks' centroids (and, with `scale`, their sizes)."""
    def centroid(mask: np.ndarray) -> np.ndarray:
        rows, cols = np.nonzero(mask)
        return np.array([cols.mean() * spacing[0], rows.mean() * spacing[1]])

    centre, target = centroid(fixed_mask), centroid(moving_mask)
    factor = float(np.sqrt(moving_mask.sum() / fixed_mask.sum())) if scale else 1.0
    start = sitk.AffineTransform(2)
    start.SetCenter(tuple(float(c) for c in centre))
    start.SetMatrix((factor, 0.0, 0.0, factor))
    start.SetTranslation(tuple(float(t) for t in target - centre))
    return start


@dataclass
class CheckedRegistration:
    """`register_checked` result: the moving image on the fixed grid (registered, or resampled by the
    scanner geometry when registration made the pair worse), the region it covers, NMI before/after."""

    volume: Volume
    covered: np.ndarray
    transform: sitk.Transform | None
    nmi_before: float
    nmi_after: float

    @property
    def kept(self) -> bool:
        return self.transform is not None

    def describe(self, name: str) -> str:
        verdict = "kept" if self.kept else "NOT kept (it lowered NMI): resampled by the scanner geometry instead"
        return f"{name}: NMI {self.nmi_before:.4f} before, {self.nmi_after:.4f} after; registration {verdict}"


def register_checked(
    fixed: Volume, moving: Volume, transform: str = "rigid", seed: int = 0, keep_worse: bool = False, **options: Any
) -> CheckedRegistration:
    """`register`, then keep the result only if it raises normalised mutual information over the voxels
    both the registered and the unregistered image cover.

    Mattes MI (what the optimiser climbs) can rise as images slide apart, so a registration may move a
    kidney 39 mm and still 'converge'; NMI over a fixed overlap does not reward that. When it falls, the
    scanner geometry's own resampling is returned, and callers say so (CLI warning, preparation notes);
    `keep_worse` keeps the registration anyway.
    """
    from crossdiff.volumes import coverage

    result = register(fixed, moving, transform=transform, seed=seed, **options)
    plain = resample_to(moving, fixed)
    plain_cover = coverage(moving, fixed)
    moved_cover = coverage(moving, fixed, result.transform)
    overlap = plain_cover & moved_cover
    if not overlap.any():
        overlap = plain_cover
    before = normalized_mutual_information(fixed.array, plain.array, overlap)
    after = normalized_mutual_information(fixed.array, result.volume.array, overlap)
    if after < before and not keep_worse:
        return CheckedRegistration(plain, plain_cover, None, before, after)
    return CheckedRegistration(result.volume, moved_cover, result.transform, before, after)
