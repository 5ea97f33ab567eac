"""Volume in, translated volume out, in the input's exact geometry: the same for every method.

A trained model remembers how its training data was made (`ModelSpec`: which modalities, how they
were scaled, how slices were cut, on what grid orientation and spacing). Translating a volume
repeats that preparation on the new input, runs the method slice by slice in batches (several
Monte-Carlo draws for stochastic methods), puts every slice back where it came from, and returns
the result in physical units (HU for CT) on the input's own grid.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossdiff import checkpoints
from crossdiff.acceleration import Acceleration, BatchSizer, accelerated
from crossdiff.config_schema import build_on_meta, check_method_settings, check_section, check_translate_options
from crossdiff.data.cases import PreparationConfig, PreparedCase, family_of
from crossdiff.data.slices import MAX_SIZE as MAX_SLICE
from crossdiff.data.slices import SliceConfig, context_slices, fit_slice, unfit_slice
from crossdiff.diffusion.streams import ItemStreams
from crossdiff.errors import CrossdiffError, InputError
from crossdiff.file_checks import geometry_problem
from crossdiff.intensity import IntensityScaling, fit_scaling
from crossdiff.masks import body_mask
from crossdiff.methods import get_method
from crossdiff.methods.base import DataSpec, Method
from crossdiff.training import MODEL_FORMAT, resolve_device
from crossdiff.volumes import Geometry, Volume, background_value, resample_to

MAX_CHANNELS = 64  # source channels (2k + 1 slices of 2.5-D context) a model may take
FITTED_SCALINGS = ("percentile", "mean")  # refitted on every input; the others are fixed windows
SPACING_TOLERANCE = 0.01  # relative in-plane spacing difference that --match-spacing resamples for


# ------------------------------------------------------------------------------- model description


@dataclass(frozen=True)
class ModelSpec:
    """What a model was trained on, saved in its config.yaml so inference repeats it.

    `source_scaling`/`target_scaling` are the training cases' scalings (their median window where
    each case had its own, e.g. MR percentiles): fixed windows (CT HU, PET SUV) are reused as they
    are, fitted ones are refitted on each input; a fitted target comes back in typical training
    units. `spacing` (x, y, z) and `direction` describe the training grid. A model that makes several
    targets (cldm) has `target` as its default and the others, with their scalings, in `other_targets`.
    """

    source: str
    target: str
    slices: SliceConfig
    preparation: PreparationConfig
    source_scaling: IntensityScaling
    target_scaling: IntensityScaling
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    other_targets: dict[str, IntensityScaling] = field(default_factory=dict)
    planar: bool = False  # trained on stacks of 2-D images (PNG slices) rather than volumes

    @property
    def target_modality(self) -> str | None:
        return family_of(self.target)

    @property
    def targets(self) -> list[str]:
        """Every target the model makes, the default first."""
        return [self.target, *self.other_targets]

    def for_target(self, target: str | None) -> ModelSpec:
        """This description with `target` (None: the default) as its target; one the model does not make is an error."""
        if target is None or target == self.target:
            return self
        if target not in self.other_targets:
            made = " or ".join(self.targets)
            raise CrossdiffError(f"this model translates {self.source} to {made}, not to {target!r}")
        scalings = {self.target: self.target_scaling, **self.other_targets}
        return replace(self, target=target, target_scaling=scalings.pop(target), other_targets=scalings)

    @classmethod
    def from_cases(
        cls,
        cases: Sequence[PreparedCase],
        source: str,
        target: str | Sequence[str],
        slices: SliceConfig,
        preparation: PreparationConfig,
    ) -> ModelSpec:
        """`target` is one modality key or several (the first is the default); each scaling is typical of
        the cases that hold that modality."""
        if not cases:
            raise CrossdiffError("a model needs at least one training case")
        first, *others = [target] if isinstance(target, str) else list(target)
        spacing = np.median([case.geometry.spacing for case in cases], axis=0)

        def typical(key: str) -> IntensityScaling:
            held = [case.scalings[key] for case in cases if key in case.scalings]
            if not held:
                raise CrossdiffError(f"no training case has a {key} image")
            return _typical(held)

        return cls(
            source, first, slices, preparation, typical(source), typical(first),
            tuple(float(s) for s in spacing),  # type: ignore[arg-type]
            cases[0].geometry.direction,
            {key: typical(key) for key in others},
            all(case.planar for case in cases),
        )

    def to_sections(self) -> dict[str, Any]:
        """config.yaml sections: 'model', 'slices', 'preparation'."""
        model = {
            "source": self.source,
            "target": self.target,
            "scalings": {"source": self.source_scaling.to_dict(), "target": self.target_scaling.to_dict()},
            "spacing": list(self.spacing),
            "direction": list(self.direction),
            "other_targets": {key: scaling.to_dict() for key, scaling in self.other_targets.items()},
            "planar": self.planar,
        }
        return {"model": model, "slices": self.slices.to_dict(), "preparation": self.preparation.to_dict()}

    @classmethod
    def from_sections(cls, config: dict[str, Any]) -> ModelSpec:
        model = config["model"]
        scalings = [model["scalings"]["source"], model["scalings"]["target"], *model.get("other_targets", {}).values()]
        for scaling in scalings:
            check_section("scaling", scaling, IntensityScaling)
        spacing, direction = [float(v) for v in model["spacing"]], [float(v) for v in model["direction"]]
        problem = geometry_problem(spacing, (), direction) if (len(spacing), len(direction)) == (3, 9) else "is not 3-D"
        if problem:
            raise CrossdiffError(f"model: the training grid {problem}")
        return cls(
            model["source"],
            model["target"],
            SliceConfig.from_dict(config["slices"]),
            PreparationConfig.from_dict(config["preparation"]),
            IntensityScaling.from_dict(model["scalings"]["source"]),
            IntensityScaling.from_dict(model["scalings"]["target"]),
            tuple(float(s) for s in model["spacing"]),  # type: ignore[arg-type]
            tuple(float(d) for d in model["direction"]),
            {key: IntensityScaling.from_dict(value) for key, value in model.get("other_targets", {}).items()},
            bool(model.get("planar", False)),
        )

    def input_problems(self, volume: Volume) -> list[str]:
        """How `volume` (read without forcing a modality) differs from what this model was trained on:
        another modality, other units, a volume for a model of 2-D slices or the other way round."""
        problems = []
        family = family_of(self.source)
        if family is not None and volume.modality is not None and volume.modality != family:
            why = volume.evidence.get("modality", "")
            problems.append(f"the input looks like {volume.modality} ({why}) but the model translates {family} ({self.source})")
        trained_units = self.source_scaling.units
        if trained_units is not None and volume.units is not None and volume.units != trained_units:
            problems.append(f"the input's units are {volume.units} ({volume.evidence.get('units', '')}) but the model was "
                            f"trained on {trained_units}")
        if volume.planar != self.planar:
            have, want = ("2-D image(s)", "volumes") if volume.planar else ("a volume", "2-D image slices")
            problems.append(f"the input is {have} but the model was trained on {want}")
        return problems


def _typical(scalings: list[IntensityScaling]) -> IntensityScaling:
    first = scalings[0]
    low = float(np.median([s.low for s in scalings]))
    high = float(np.median([s.high for s in scalings]))
    return IntensityScaling(first.method, low, high, first.units)


# ----------------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    method: Method
    spec: ModelSpec
    folder: Path
    step: int | None
    device: torch.device


def load_model(checkpoint: str | Path, device: str | torch.device | None = None) -> LoadedModel:
    """Rebuild the method from a checkpoint's config.yaml and load its EMA weights (no pickle).

    `checkpoint` is a checkpoint folder, a `latest` link or a run folder. A missing, corrupt or
    mismatched file is an InputError that names it.
    """
    device = _device(device)
    method, config, folder, step = load_method(checkpoint, device)
    with _well_formed(folder):
        spec = ModelSpec.from_sections(config)
    return LoadedModel(method, spec, folder, step, device)


def load_method(
    checkpoint: str | Path, device: str | torch.device | None = None
) -> tuple[Method, dict[str, Any], Path, int | None]:
    """The method of a checkpoint with its EMA weights on `device`, its config.yaml, folder and step.

    Unlike `load_model` it needs no model description, so a checkpoint that does not translate (a cldm
    autoencoder) loads too. The config is checked, and the networks it describes are built on the meta
    device and compared with the weights file's shapes, before anything is allocated: a crafted config
    cannot make crossdiff build a network larger than the weights it ships."""
    device = _device(device)
    folder = checkpoints.checkpoint_folder(Path(checkpoint))
    config = checkpoints.read_config(folder)
    if config.get("format") != MODEL_FORMAT:
        found = config.get("format")
        raise InputError(folder / checkpoints.CONFIG_FILE, f"not a crossdiff model configuration (format {found!r})")
    with _well_formed(folder):
        spec_data = data_spec(config["data"])
        name, settings = config["method"]["name"], config["method"]["config"]
        check_method_settings(str(name), settings, build=False)
        blueprint = build_on_meta(get_method(str(name)), settings, spec_data)
    model_file = folder / checkpoints.MODEL_FILE
    _check_weights_fit(model_file, checkpoints.tensor_shapes(model_file), blueprint)
    method = get_method(name)(settings, spec_data)
    tensors, metadata = checkpoints.read_tensors(model_file)
    weights = checkpoints.split_prefix(tensors, "ema")
    for module_name, module in method.modules().items():
        module.load_state_dict(weights[module_name])
        module.to(device).eval()
    step = metadata.get("step", "")
    return method, config, folder, int(step) if step.isdecimal() else None


def data_spec(data: Any) -> DataSpec:
    """The `data` section of a checkpoint as a DataSpec, its types and sizes checked."""
    check_section("data", data, DataSpec)
    spec = DataSpec(int(data["source_channels"]), int(data["target_channels"]), tuple(data["size"]))  # type: ignore[arg-type]
    if not (1 <= spec.source_channels <= MAX_CHANNELS and 1 <= spec.target_channels <= MAX_CHANNELS):
        channels = f"{spec.source_channels}, {spec.target_channels}"
        raise CrossdiffError(f"data: channels must lie in [1, {MAX_CHANNELS}], not {channels}")
    if not all(1 <= side <= MAX_SLICE for side in spec.size):
        raise CrossdiffError(f"data.size: each side must lie in [1, {MAX_SLICE}] pixels, not {spec.size}")
    return spec


def _check_weights_fit(model_file: Path, shapes: dict[str, tuple[int, ...]], blueprint: Method) -> None:
    """Every network of the (meta-built) method must find weights of its exact shapes in the file."""
    for name, module in blueprint.modules().items():
        wanted = {key: tuple(value.shape) for key, value in module.state_dict().items()}
        found = {key.split("/", 2)[2]: shape for key, shape in shapes.items() if key.startswith(f"ema/{name}/")}
        if not found:
            raise InputError(model_file, f"holds no weights for the {name!r} network")
        wrong = sorted(key for key in wanted if found.get(key) != wanted[key]) + sorted(set(found) - set(wanted))
        if wrong:
            key = wrong[0]
            raise InputError(model_file, f"weights do not fit the {name!r} network its config describes ({key}: "
                                         f"file {found.get(key)}, network {wanted.get(key)}; {len(wrong)} tensor(s) differ)")


def _device(device: str | torch.device | None) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(device)


@contextlib.contextmanager
def _well_formed(folder: Path) -> Iterator[None]:
    """A missing, mistyped or refused entry of the checkpoint's config.yaml becomes an InputError naming the file."""
    try:
        yield
    except InputError:
        raise
    except CrossdiffError as error:
        raise InputError(folder / checkpoints.CONFIG_FILE, f"checkpoint configuration is invalid: {error}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        message = f"checkpoint configuration is incomplete or malformed ({error!r})"
        raise InputError(folder / checkpoints.CONFIG_FILE, message) from None


# ------------------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class Reorientation:
    """Exact axis permutation and flips that bring an array into the training grid's orientation
    (so axial slices stay axial whatever the input's storage order), and back."""

    order: tuple[int, int, int]
    flips: tuple[int, ...]

    @classmethod
    def between(cls, direction: Sequence[float], training: Sequence[float]) -> Reorientation:
        have, want = _axis_codes(direction), _axis_codes(training)
        if sorted(a for a, _ in have) != [0, 1, 2] or sorted(a for a, _ in want) != [0, 1, 2]:
            return cls((0, 1, 2), ())  # oblique beyond telling the axes apart: keep the storage order
        source_axis = {axis: (index, sign) for index, (axis, sign) in enumerate(have)}
        order, flips = [0, 0, 0], []
        for index, (axis, sign) in enumerate(want):
            from_index, from_sign = source_axis[axis]
            order[2 - index] = 2 - from_index  # arrays are (z, y, x): numpy axis = 2 - index axis
            if from_sign != sign:
                flips.append(2 - index)
        return cls(tuple(order), tuple(sorted(flips)))  # type: ignore[arg-type]

    def forward(self, array: np.ndarray, lead: int = 0) -> np.ndarray:
        """Input order -> training order; `lead` leading axes (e.g. draws) are left alone."""
        moved = np.transpose(array, (*range(lead), *(lead + a for a in self.order)))
        return np.flip(moved, [lead + a for a in self.flips]) if self.flips else moved

    def backward(self, array: np.ndarray, lead: int = 0) -> np.ndarray:
        flipped = np.flip(array, [lead + a for a in self.flips]) if self.flips else array
        inverse = np.argsort(self.order)
        return np.transpose(flipped, (*range(lead), *(lead + int(a) for a in inverse)))

    def spacing(self, spacing: Sequence[float]) -> tuple[float, float, float]:
        """The (x, y, z) spacing of the reoriented grid."""
        numpy_order = [spacing[2 - a] for a in self.order]  # spacing along each working numpy axis
        return (numpy_order[2], numpy_order[1], numpy_order[0])


def _axis_codes(direction: Sequence[float]) -> list[tuple[int, int]]:
    """Per index axis (x, y, z): the patient axis it mostly runs along, and which way."""
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    codes = []
    for column in matrix.T:
        axis = int(np.argmax(np.abs(column)))
        codes.append((axis, 1 if column[axis] > 0 else -1))
    return codes


def training_grid(spec: ModelSpec, geometry: Geometry, turn: Reorientation) -> Geometry | None:
    """The input's grid with the training in-plane spacing (slice spacing kept), or None when it already has it."""
    trained = np.array(spec.spacing)
    have = np.array(turn.spacing(geometry.spacing))
    in_plane = [2 - a for a in range(3) if a != spec.slices.axis]  # index axes of the slice plane
    if np.all(np.abs(have[in_plane] - trained[in_plane]) <= SPACING_TOLERANCE * trained[in_plane]):
        return None
    wanted = have.copy()
    wanted[in_plane] = trained[in_plane]
    # back to the input's own axis order: working index axis w comes from input index axis 2 - order[2 - w]
    spacing = list(geometry.spacing)
    for working in range(3):
        spacing[2 - turn.order[2 - working]] = float(wanted[working])
    return geometry.with_spacing(tuple(spacing))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------- translation


@dataclass
class VolumeTranslation:
    """`mean` in physical units; `std` the per-voxel spread of the draws (same units), None for a
    deterministic method or a single draw; `samples` the draws when asked for; `nfe` per draw."""

    mean: Volume
    std: Volume | None
    samples: list[Volume] | None
    nfe: int


def translate_volume(
    model: LoadedModel,
    volume: Volume,
    samples: int = 1,
    options: dict[str, Any] | None = None,
    mask: Volume | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    keep_samples: bool = False,
    match_spacing: bool = False,
    target: str | None = None,
    acceleration: Acceleration | None = None,
) -> VolumeTranslation:
    """Translate a whole volume into `target` (default: the model's own); the result has `volume`'s exact geometry.

    The source is scaled like the training data (fitted scalings refitted inside `mask`, else inside
    the automatic body mask). With `match_spacing` an input whose in-plane spacing differs from the
    training spacing is resampled for the network and the result resampled back; by default the
    network works on the input grid, unless the model was trained at a fixed working spacing
    (preparation 'spacing'), which every input is then resampled to. Outside `mask` the output is the
    target's background (-1024 HU for CT) and slices without mask are not translated. A model with
    several targets is told which one through the method option 'target'.

    `batch_size` counts (slice, draw) items per network batch (None: chosen for the device);
    `acceleration` sets precision, memory format and compilation (default: Acceleration()). The same
    seed and precision give the same result whatever the batch size and, for each draw, whatever the
    number of draws.
    """
    model = replace(model, spec=model.spec.for_target(target))
    check_translate_options(model.method, options or {})
    options = {**(options or {}), **({"target": model.spec.target} if model.spec.other_targets else {})}
    _check_request(model, volume, samples, mask)
    body = mask.array.astype(bool) if mask is not None else None
    scaling = source_scaling(model.spec, volume, body)
    turn = Reorientation.between(volume.geometry.direction, model.spec.direction)
    match_spacing = match_spacing or model.spec.preparation.spacing is not None  # a model with a working spacing needs it
    grid = training_grid(model.spec, volume.geometry, turn) if match_spacing else None
    working = volume if grid is None else resample_to(volume, grid)
    region = body if grid is None or mask is None else resample_to(mask, grid, "nearest", 0).array.astype(bool)
    draws, nfe = _translate_array(
        model,
        turn.forward(scaling.apply(working.array)),
        None if region is None else turn.forward(region),
        samples, options, batch_size, acceleration or Acceleration(), seed, progress,
    )
    _refuse_non_finite(model, draws)
    draws = turn.backward(draws, lead=1)
    if grid is not None:
        draws = np.stack([resample_to(Volume(d, grid), volume.geometry, default_value=-1.0).array for d in draws])
    return _assemble(model.spec, volume.geometry, draws, body, keep_samples, nfe)


def _refuse_non_finite(model: LoadedModel, draws: np.ndarray) -> None:
    """Inputs with NaN are refused when read, so NaN out means broken weights (a diverged training): an sCT
    with holes of NaN must not be written, scored or planned on."""
    bad = int(np.count_nonzero(~np.isfinite(draws)))
    if bad:
        raise CrossdiffError(f"{model.folder}: the model's output holds {bad} non-finite values (NaN or infinity) of "
                             f"{draws.size}; its weights are broken (a training that diverged?): retrain it")


def source_scaling(spec: ModelSpec, volume: Volume, mask: np.ndarray | None) -> IntensityScaling:
    """Training's scaling for this input: fixed windows as saved, fitted ones refitted inside the body."""
    saved = spec.source_scaling
    if saved.method not in FITTED_SCALINGS:
        return saved
    region = mask if mask is not None else body_mask(volume).array.astype(bool)
    return fit_scaling(volume, region, saved.method, percentiles=spec.preparation.mr_percentiles)


def _check_request(model: LoadedModel, volume: Volume, samples: int, mask: Volume | None) -> None:
    if samples < 1:
        raise CrossdiffError(f"samples must be >= 1, not {samples}")
    if samples > 1 and not model.method.stochastic:
        raise CrossdiffError(
            f"{model.method.name} is deterministic: it gives one translation per input and no Monte-Carlo samples"
        )
    if mask is not None and not mask.geometry.matches(volume.geometry):
        raise InputError(mask.path, f"mask does not match the input's grid: {mask.geometry.describe_difference(volume.geometry)}")


def inference_slices(config: SliceConfig, plane: tuple[int, int]) -> SliceConfig:
    """The slice size the network runs at. 'resize' repeats training exactly; 'pad-crop' keeps the pixel
    spacing, so a slice larger than the trained size gets a larger canvas (rounded up to the trained
    size's power-of-two factor, which the network's downsampling already divides) instead of losing
    its border to the crop: convolutional networks run at any such size."""
    if config.fit == "resize":
        return config
    size = []
    for have, trained in zip(plane, config.size):
        step = trained & -trained
        size.append(max(trained, -(-have // step) * step))
    return replace(config, size=tuple(size))


def _translate_array(
    model: LoadedModel,
    array: np.ndarray,
    region: np.ndarray | None,
    samples: int,
    options: dict[str, Any],
    batch_size: int | None,
    acceleration: Acceleration,
    seed: int,
    progress: Callable[[int, int], None] | None,
) -> tuple[np.ndarray, int]:
    """(samples, *array.shape) draws in [-1, 1]; slices outside `region` stay background (-1).

    Every (slice, draw) pair is one item with its own random stream, keyed by (seed, slice, draw);
    items go through the method in batches sized for the device (slice by slice, so a slice's draws
    finish together), each batch one `translate` call with one draw per row. The result depends on
    neither the batch size nor the number of other draws."""
    config = model.spec.slices
    axis = config.axis
    plane = tuple(s for i, s in enumerate(array.shape) if i != axis)
    working = inference_slices(config, plane)  # type: ignore[arg-type]
    indices = [i for i in range(array.shape[axis]) if region is None or np.take(region, i, axis=axis).any()]
    items = [(i, d) for i in indices for d in range(samples)]
    draws = np.full((samples, *array.shape), -1.0, dtype=np.float32)
    by_slice = np.moveaxis(draws, axis + 1, 1)  # a view: (samples, slice, h, w)
    sizer = BatchSizer(batch_size, model.device, model.method.sampling_pixels(working.size))
    nfe, done = 0, 0
    with accelerated(model.method, model.device, acceleration):
        while done < len(items):
            chunk = items[done : done + sizer.batch]
            padding = sizer.batch - len(chunk) if acceleration.compile else 0  # one shape for compiled networks
            rows = torch.from_numpy(np.stack([context_slices(array, i, config) for i, _ in chunk + chunk[-1:] * padding]))
            streams = ItemStreams(seed, chunk + chunk[-1:] * padding, model.device)
            with sizer.measuring(len(rows)), streams.drawing():
                result = model.method.translate(fit_slice(rows, working).to(model.device), streams, samples=1, **options)
            planes = unfit_slice(result.samples[0, : len(chunk), 0].float().cpu(), plane, working).numpy()  # type: ignore[arg-type]
            slices, draw = (list(index) for index in zip(*chunk, strict=True))
            by_slice[draw, slices] = planes
            nfe, done = result.nfe, done + len(chunk)
            if progress is not None:
                progress(done // samples, len(indices))
    return draws, nfe


def _assemble(
    spec: ModelSpec, geometry: Geometry, draws: np.ndarray, body: np.ndarray | None, keep_samples: bool, nfe: int
) -> VolumeTranslation:
    """Draws in [-1, 1] -> mean, spread and samples in physical units, background outside the mask."""
    target = spec.target_scaling
    modality = spec.target_modality
    background = background_value(modality, target.units)

    def physical(unit: np.ndarray) -> Volume:
        values = target.invert(unit)
        if body is not None:
            values[~body] = background
        return Volume(values, geometry, modality, target.units)

    spread = None
    if draws.shape[0] > 1:
        values = (draws.std(axis=0, ddof=1) * (target.high - target.low) / 2.0).astype(np.float32)
        if body is not None:
            values[~body] = 0.0
        spread = Volume(values, geometry, modality, target.units)
    kept = [physical(draw) for draw in draws] if keep_samples else None
    return VolumeTranslation(physical(draws.mean(axis=0)), spread, kept, nfe)
