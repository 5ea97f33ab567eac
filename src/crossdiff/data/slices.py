"""2-D and 2.5-D training slices cut from prepared cases, for paired and unpaired translation.

The cases are already in memory (PreparedCase arrays on one grid, scaled to [-1, 1]), so an epoch
only indexes arrays: no volume is re-read, resampled or re-normalised. Every random choice for item
i comes from a generator seeded by (config.seed, epoch, i), so batches are identical across runs and
DataLoader worker counts; call `set_epoch` before each epoch for fresh augmentations.

`fit_slice` brings a slice to the configured size and `unfit_slice` puts it back on its grid, so
inference can return translated slices exactly where they came from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from crossdiff.config_schema import check_section
from crossdiff.errors import CrossdiffError

if TYPE_CHECKING:
    from crossdiff.data.cases import PreparedCase

FITS = ("pad-crop", "resize")
MAX_SIZE = 1024  # pixels per side of a slice: beyond it a translation batch needs many GB (a crafted config's way in)
MAX_CONTEXT = 31  # neighbours on each side: 63 source channels at most
KINDS = ("image", "mask")
FILL = {"image": -1.0, "mask": 0.0}  # background of [-1, 1] images; outside of a mask

Array = TypeVar("Array", np.ndarray, torch.Tensor)


@dataclass
class SliceConfig:
    """How volumes become training slices; `to_dict`/`from_dict` keep it a plain dict for YAML.

    axis: array axis the slices are cut along (arrays are (z, y, x), so 0 is axial).
    size: (H, W) of every slice. fit: 'pad-crop' keeps the pixel spacing (centre pad with background,
      centre crop); 'resize' stretches the whole slice to `size` (bilinear images, nearest masks).
    context: k source slices on each side become extra channels (2.5-D); 0 is plain 2-D.
    min_mask_fraction: slices whose mask covers less of the slice are skipped (0 keeps every slice).
    flip_h, flip_v: flip probabilities; rotation: largest rotation in degrees either way;
      scale: range of the magnification; all only when a dataset is built with augment=True.
    crop: (h, w) random patches of the fitted slice for training (patch training, as nnU-Net does:
      full-size slices cost too much per step on a CPU, and convolutional networks translate whole
      slices anyway); None trains on whole slices. Validation and translation always see whole slices.
    """

    axis: int = 0
    size: tuple[int, int] = (256, 256)
    fit: str = "pad-crop"
    context: int = 0
    min_mask_fraction: float = 0.01
    flip_h: float = 0.5
    flip_v: float = 0.0
    rotation: float = 10.0
    scale: tuple[float, float] = (0.9, 1.1)
    seed: int = 0
    crop: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        self.size = (int(self.size[0]), int(self.size[1]))
        self.scale = (float(self.scale[0]), float(self.scale[1]))
        if self.crop is not None:
            self.crop = (int(self.crop[0]), int(self.crop[1]))
        problems = [text for ok, text in self._checks() if not ok]
        if problems:
            raise CrossdiffError("invalid slice configuration: " + "; ".join(problems))

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            (self.axis in (0, 1, 2), f"axis must be 0, 1 or 2, not {self.axis}"),
            (0 < min(self.size) and max(self.size) <= MAX_SIZE, f"size must lie in [1, {MAX_SIZE}] pixels, not {self.size}"),
            (self.fit in FITS, f"fit must be one of {', '.join(FITS)}, not {self.fit!r}"),
            (0 <= self.context <= MAX_CONTEXT, f"context must lie in [0, {MAX_CONTEXT}], not {self.context}"),
            (0.0 <= self.min_mask_fraction <= 1.0, "min_mask_fraction must lie in [0, 1]"),
            (0.0 <= self.flip_h <= 1.0 and 0.0 <= self.flip_v <= 1.0, "flip probabilities must lie in [0, 1]"),
            (self.rotation >= 0.0, f"rotation must be >= 0 degrees, not {self.rotation}"),
            (0.0 < self.scale[0] <= self.scale[1], f"scale must be (low, high) with 0 < low <= high, not {self.scale}"),
            (self.seed >= 0, f"seed must be >= 0, not {self.seed}"),
            (self.crop is None or (0 < self.crop[0] <= self.size[0] and 0 < self.crop[1] <= self.size[1]),
             f"crop must be None or (h, w) within size {self.size}, not {self.crop}"),
        ]

    @property
    def channels(self) -> int:
        """Source channels per item: the slice and its context."""
        return 2 * self.context + 1

    def to_dict(self) -> dict[str, object]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> SliceConfig:
        return cls(**check_section("slices", data, cls))


def slice_indices(case: PreparedCase, config: SliceConfig) -> list[int]:
    """Indices along `config.axis` of the slices worth training on: mask coverage >= min_mask_fraction.

    Slices outside the body or another modality's field of view teach nothing and waste steps.
    """
    per_slice = np.moveaxis(case.mask, config.axis, 0).reshape(case.mask.shape[config.axis], -1)
    return [int(i) for i in np.flatnonzero(per_slice.mean(axis=1) >= config.min_mask_fraction)]


def context_slices(volume: np.ndarray, index: int, config: SliceConfig) -> np.ndarray:
    """Slice `index` with `config.context` neighbours on each side, (2k+1, h, w); the end slices repeat."""
    k, last = config.context, volume.shape[config.axis] - 1
    neighbours = np.clip(np.arange(index - k, index + k + 1), 0, last)
    return _cut(volume, neighbours, config.axis)


def fit_slice(array: Array, config: SliceConfig, kind: str = "image") -> Array:
    """Bring (..., h, w) to `config.size`; images pad with -1 and resize bilinearly, masks pad with 0 and
    resize nearest. Returns the same type (numpy or torch) and dtype it was given."""
    if config.fit == "resize":
        return _on_tensor(array, kind, lambda t: _resize(t, config.size, kind))
    return _on_tensor(array, kind, lambda t: _pad(t, _centre_pads(tuple(t.shape[-2:]), config.size), kind))


def unfit_slice(array: Array, original_shape: tuple[int, int], config: SliceConfig, kind: str = "image") -> Array:
    """Undo `fit_slice`: back to (..., h, w) = `original_shape` on the slice's own grid.

    'pad-crop' is exact inside the region fit_slice kept (what it cropped comes back as background);
    'resize' is a bilinear approximation.
    """
    if config.fit == "resize":
        return _on_tensor(array, kind, lambda t: _resize(t, original_shape, kind))
    pads = [-p for p in _centre_pads(tuple(original_shape), config.size)]
    return _on_tensor(array, kind, lambda t: _pad(t, pads, kind))


class _SliceDataset(Dataset):
    """What paired and unpaired slice datasets share: the configuration, the epoch and the seeding."""

    def __init__(self, config: SliceConfig, augment: bool, crop: bool = True) -> None:
        self.config = config
        self.augment = augment
        self.crop = crop and augment and config.crop is not None  # patches for training only
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose random draws items use. DataLoader workers copy the dataset when an
        epoch's iteration starts, so set it before iterating (persistent workers would keep the old one)."""
        self.epoch = int(epoch)

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng([self.config.seed, self.epoch, int(i)])

    def _render(
        self, images: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit a (C, h, w) image stack and its (1, h, w) mask to size and, when augmenting, move them together."""
        stack = fit_slice(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)), self.config)
        cover = fit_slice(torch.from_numpy(mask.astype(np.float32)), self.config, kind="mask")
        if not self.augment:
            return stack, cover
        stack, cover = _augment(stack, cover, _draw_augmentation(rng, self.config))
        return _random_crop(stack, cover, self.config.crop, rng) if self.crop else (stack, cover)

    def _pair(self, case: PreparedCase, index: int, source: str, target: str, i: int) -> dict[str, object]:
        """Item i: slice `index` of `source` (with context) and of `target`, moved together with the mask."""
        target_slice = _cut(case.images[target], [index], self.config.axis)
        stack = np.concatenate([context_slices(case.images[source], index, self.config), target_slice])
        images, mask = self._render(stack, _cut(case.mask, [index], self.config.axis), self._rng(i))
        return {"source": images[:-1], "target": images[-1:], "mask": mask, "case": case.case_id, "index": index}


class PairedSliceDataset(_SliceDataset):
    """Aligned source/target slices of the same cases (for pix2pix, conditional diffusion, ...).

    Item i: 'source' (2k+1, H, W), 'target' (1, H, W), 'mask' (1, H, W) of 0/1 floats, 'case' id and
    'index' of the slice; one random flip/rotation/scale (and patch, with `config.crop` and `crop`) moves all three.
    """

    def __init__(
        self, cases: Sequence[PreparedCase], source: str, target: str, config: SliceConfig, augment: bool = False,
        crop: bool = True,
    ) -> None:
        super().__init__(config, augment, crop)
        self.source, self.target = source, target
        self.slices = _kept_slices(cases, (source, target), config)

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, i: int) -> dict[str, object]:
        case, index = self.slices[i]
        return self._pair(case, index, self.source, self.target, i)


class MultiTargetSliceDataset(_SliceDataset):
    """One source and several targets (for one model that completes several missing modalities, e.g. PET
    to CT and MR): every kept slice of a case appears once per target the case holds.

    Item i: what a PairedSliceDataset item holds for that (slice, target) pair, and 'code', the target's
    modality key, which tells a class-conditional model which target to make. `source` None makes each
    item's source its target slice itself: the images an autoencoder of the targets learns from.
    """

    def __init__(
        self,
        cases: Sequence[PreparedCase],
        source: str | None,
        targets: Sequence[str],
        config: SliceConfig,
        augment: bool = False,
    ) -> None:
        super().__init__(config, augment)
        if not targets or len(set(targets)) != len(targets):
            raise CrossdiffError(f"a multi-target dataset needs distinct target modalities, not {list(targets)}")
        self.source, self.targets = source, tuple(targets)
        self.items: list[tuple[PreparedCase, int, str]] = []
        for target in self.targets:
            holding = [case for case in cases if target in case.images]
            if not holding:
                raise CrossdiffError(f"no case has a {target} image (cases: {', '.join(c.case_id for c in cases)})")
            keys = (target,) if source is None else (source, target)
            self.items += [(case, index, target) for case, index in _kept_slices(holding, keys, config)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, object]:
        case, index, target = self.items[i]
        return {**self._pair(case, index, self.source or target, target, i), "code": target}


class UnpairedSliceDataset(_SliceDataset):
    """Source slices of some cases, each met with a target slice of other cases (for cycle-consistent
    methods, which never see aligned pairs).

    Item i: source slice i with a target slice drawn from (seed, epoch, i); 'source' (2k+1, H, W),
    'source_mask', 'target', 'target_mask' (1, H, W), and 'source_case'/'source_index',
    'target_case'/'target_index'. The two sides are augmented independently.
    """

    def __init__(
        self,
        source_cases: Sequence[PreparedCase],
        target_cases: Sequence[PreparedCase],
        source: str,
        target: str,
        config: SliceConfig,
        augment: bool = False,
    ) -> None:
        super().__init__(config, augment)
        self.source, self.target = source, target
        self.sources = _kept_slices(source_cases, (source,), config)
        self.targets = _kept_slices(target_cases, (target,), config)

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict[str, object]:
        rng, axis = self._rng(i), self.config.axis
        source_case, source_index = self.sources[i]
        target_case, target_index = self.targets[rng.integers(len(self.targets))]
        source_images = context_slices(source_case.images[self.source], source_index, self.config)
        source, source_mask = self._render(source_images, _cut(source_case.mask, [source_index], axis), rng)
        target_images = _cut(target_case.images[self.target], [target_index], axis)
        target, target_mask = self._render(target_images, _cut(target_case.mask, [target_index], axis), rng)
        return {
            "source": source,
            "source_mask": source_mask,
            "source_case": source_case.case_id,
            "source_index": source_index,
            "target": target,
            "target_mask": target_mask,
            "target_case": target_case.case_id,
            "target_index": target_index,
        }


def _kept_slices(
    cases: Sequence[PreparedCase], keys: tuple[str, ...], config: SliceConfig
) -> list[tuple[PreparedCase, int]]:
    """(case, slice index) of every kept slice; refuses cases without the modalities and empty selections."""
    for case in cases:
        missing = [key for key in keys if key not in case.images]
        if missing:
            present = ", ".join(sorted(case.images)) or "none"
            raise CrossdiffError(f"case {case.case_id!r} has no {', '.join(missing)} image (it has {present})")
    slices = [(case, index) for case in cases for index in slice_indices(case, config)]
    if not slices:
        names = ", ".join(case.case_id for case in cases) or "no cases given"
        raise CrossdiffError(
            f"no slices to train on ({names}): no slice has a mask covering {config.min_mask_fraction:g} of it"
        )
    return slices


def _cut(volume: np.ndarray, indices: Sequence[int] | np.ndarray, axis: int) -> np.ndarray:
    """Slices `indices` along `axis`, stacked first: (len(indices), h, w)."""
    return np.moveaxis(np.take(volume, indices, axis=axis), axis, 0)


def _on_tensor(array: Array, kind: str, transform: Callable[[torch.Tensor], torch.Tensor]) -> Array:
    """Run a float tensor transform on numpy or torch input and hand back the input's type and dtype."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    tensor = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.array(array))
    result = transform(tensor.float()).to(tensor.dtype)
    return result.numpy() if isinstance(array, np.ndarray) else result


def _centre_pads(shape: tuple[int, int], size: tuple[int, int]) -> list[int]:
    """F.pad amounts (left, right, top, bottom) centring an (h, w) slice in `size`; negative amounts crop."""
    pads: list[int] = []
    for have, want in zip(reversed(shape), reversed(size)):
        before = (want - have) // 2
        pads += [before, want - have - before]
    return pads


def _pad(tensor: torch.Tensor, pads: list[int], kind: str) -> torch.Tensor:
    return F.pad(tensor, pads, mode="constant", value=FILL[kind])


def _resize(tensor: torch.Tensor, size: tuple[int, int], kind: str) -> torch.Tensor:
    """Resize the last two axes; antialiased bilinear for images, exact nearest for masks."""
    lead, planes = tensor.shape[:-2], tensor.reshape(-1, 1, *tensor.shape[-2:])
    if kind == "mask":
        resized = F.interpolate(planes, size=tuple(size), mode="nearest-exact")
    else:
        resized = F.interpolate(planes, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)
    return resized.reshape(*lead, *size)


@dataclass(frozen=True)
class _Augmentation:
    flip_h: bool
    flip_v: bool
    angle: float  # radians
    scale: float  # magnification of the content


def _draw_augmentation(rng: np.random.Generator, config: SliceConfig) -> _Augmentation:
    """Always draws the same four numbers, so settings never shift the stream of later draws."""
    flip_h, flip_v = rng.random() < config.flip_h, rng.random() < config.flip_v
    angle = math.radians(rng.uniform(-config.rotation, config.rotation))
    return _Augmentation(bool(flip_h), bool(flip_v), angle, float(rng.uniform(*config.scale)))


def _augment(images: torch.Tensor, mask: torch.Tensor, aug: _Augmentation) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip exactly, then rotate and scale images and mask through one shared affine grid.

    Our own few lines rather than MONAI's RandAffined: the parameters must come from the per-item
    generator, and images need the -1 background that grid_sample's padding modes do not offer.
    """
    flips = [dim for dim, on in ((-1, aug.flip_h), (-2, aug.flip_v)) if on]
    if flips:
        images, mask = images.flip(flips), mask.flip(flips)
    if aug.angle == 0.0 and aug.scale == 1.0:
        return images, mask
    grid = _affine_grid(aug, tuple(images.shape[-2:]))
    fill = FILL["image"]
    shifted = F.grid_sample((images - fill)[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mask = F.grid_sample(mask[None], grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    return shifted[0] + fill, mask


def _random_crop(
    images: torch.Tensor, mask: torch.Tensor, size: tuple[int, int] | None, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One (h, w) patch of images and mask, centred on a random mask pixel (a random place if the mask is
    empty), kept inside the slice: patches of air teach nothing."""
    assert size is not None
    height, width = images.shape[-2:]
    inside = torch.nonzero(mask[0] > 0.5)
    if len(inside):
        row, col = (int(v) for v in inside[int(rng.integers(len(inside)))])
    else:
        row, col = int(rng.integers(height)), int(rng.integers(width))
    top = min(max(row - size[0] // 2, 0), height - size[0])
    left = min(max(col - size[1] // 2, 0), width - size[1])
    window = (..., slice(top, top + size[0]), slice(left, left + size[1]))
    return images[window], mask[window]


def _affine_grid(aug: _Augmentation, shape: tuple[int, int]) -> torch.Tensor:
    """Sampling grid that rotates by `aug.angle` and magnifies by `aug.scale` about the centre, in pixels
    (affine_grid works in [-1, 1] per axis, which would shear a non-square slice)."""
    height, width = shape
    cos, sin = math.cos(aug.angle), math.sin(aug.angle)
    inverse = torch.tensor([[cos, sin], [-sin, cos]], dtype=torch.float32) / aug.scale  # output -> input pixels
    half = torch.tensor([width / 2.0, height / 2.0])
    theta = torch.cat([inverse * half[None, :] / half[:, None], torch.zeros(2, 1)], dim=1)
    return F.affine_grid(theta[None], [1, 1, height, width], align_corners=False)
