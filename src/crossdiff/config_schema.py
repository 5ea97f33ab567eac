"""Typed checks of every setting a user (or a checkpoint) hands crossdiff, naming the key at fault.

YAML and JSON are read through `read_yaml`/`read_json`, which turn every way a file can be unreadable
(bad encoding, syntax, nesting ten thousand levels deep, an alias bomb) into one InputError. The
sections of a config are then checked against what reads them:
- `check_section` validates a settings dataclass's section (training, slices, preparation) by its type
  hints with pydantic: unknown keys, wrong types ('min_mask_fraction: abc'), NaN and infinities;
- `check_method_settings` validates a method section against the method's own defaults (their types,
  and the ranges in SETTING_RANGES), then builds the method on PyTorch's 'meta' device, where nothing is
  allocated, so a setting that would build a network of billions of parameters is refused first;
- `parse_option` and `check_translate_options` do the same for `--option KEY=VALUE` and sampler options.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError, create_model

from crossdiff.errors import CrossdiffError, InputError, error_summary
from crossdiff.file_checks import require_regular_file

MAX_CONFIG_BYTES = 16 << 20  # a config or manifest larger than this is not one a person wrote
MAX_NODES = 200_000  # values in one document, aliases expanded: what an alias bomb is refused by
MAX_DEPTH = 64
MAX_PARAMETERS = 2_000_000_000  # 8 GB of float32 weights: more than any network crossdiff trains
# Bounds of method settings that size something (a network, a schedule, a sampling loop), by name.
SETTING_RANGES: dict[str, tuple[float, float]] = {
    "timesteps": (1, 100_000), "steps": (1, 100_000), "batch": (1, 65_536), "channels": (1, 8192),
    "discriminator_channels": (1, 8192), "filters": (1, 8192), "discriminator_filters": (1, 8192),
    "critic_filters": (1, 8192), "blocks": (0, 1000), "num_res_blocks": (0, 100), "num_res_units": (0, 100),
    "latent": (1, 8192), "embedding": (1, 8192), "latent_channels": (1, 8192), "norm_num_groups": (1, 8192),
    "num_head_channels": (1, 8192), "pool_size": (0, 100_000), "layers": (0, 100), "discriminator_layers": (0, 100),
    "critic_layers": (0, 100), "downsamplings": (0, 16), "strides": (1, 16), "r1_every": (1, 1_000_000),
    "corrector_steps": (0, 1000), "lr": (0, 10), "discriminator_lr": (0, 10), "dropout": (0, 1),
}  # fmt: skip


# ------------------------------------------------------------------------------- reading files


def read_yaml(path: Path, what: str) -> Any:
    """A YAML document (safe loader: no Python objects), or an InputError saying why it cannot be read."""
    text = read_text(path, what)
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise InputError(path, f"{what} is not valid YAML ({str(error).splitlines()[0]})") from None
    except RecursionError:
        raise InputError(path, f"{what} is nested too deeply to be a {what}") from None
    check_size(path, document, what)
    return document


def read_json(path: Path, what: str, object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """A JSON document, or an InputError; `object_pairs_hook` may raise ValueError to refuse a mapping."""
    text = read_text(path, what)
    try:
        document = json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as error:
        raise InputError(path, f"{what} is not valid JSON ({error})") from None
    except RecursionError:
        raise InputError(path, f"{what} is nested too deeply to be a {what}") from None
    except ValueError as error:  # raised by object_pairs_hook, or numbers beyond any float
        raise InputError(path, f"{what} is malformed: {error}") from None
    check_size(path, document, what)
    return document


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file of at most MAX_CONFIG_BYTES, or an InputError naming it."""
    size = require_regular_file(path)
    if size > MAX_CONFIG_BYTES:
        raise InputError(path, f"is {size:,} bytes, too large to be a {what}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(path, f"{what} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise InputError(path, f"{what} cannot be read ({error.strerror or error})") from None


def check_size(path: Path, document: Any, what: str) -> None:
    """Refuse documents with more than MAX_NODES values (counting shared YAML aliases each time they are
    used: an alias bomb expands to billions) or nested deeper than MAX_DEPTH; walked without recursion."""
    stack, seen = [(document, 0)], 0
    while stack:
        value, depth = stack.pop()
        seen += 1
        if seen > MAX_NODES or depth > MAX_DEPTH:
            problem = "nested too deeply" if depth > MAX_DEPTH else f"holds more than {MAX_NODES:,} values"
            raise InputError(path, f"{what} is {problem} to be a {what}")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, list | tuple):
            stack.extend((item, depth + 1) for item in value)


def mapping(path: Path, document: Any, what: str) -> dict[str, Any]:
    """The document as a mapping with string keys (YAML allows others), or an InputError."""
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise InputError(path, f"{what} must be a mapping of settings, not {type(document).__name__}")
    bad = [key for key in document if not isinstance(key, str)]
    if bad:
        raise InputError(path, f"{what} has a key that is not a name: {bad[0]!r}")
    return document


# ----------------------------------------------------------------------------- settings sections


def check_section(section: str, data: Any, cls: type) -> dict[str, Any]:
    """`data` checked against the fields of dataclass `cls` (types, unknown keys); returned unchanged.
    Ranges stay with the dataclass (its __post_init__), which names the key as well."""
    if not isinstance(data, dict):
        raise CrossdiffError(f"{section}: expected a mapping of settings, not {type(data).__name__}")
    try:
        _model(cls).model_validate(data)
    except ValidationError as error:
        raise CrossdiffError(f"invalid {section} settings: {_problems(section, error)}") from None
    return data


@cache
def _model(cls: type) -> Any:
    """A pydantic model of the dataclass's fields; the fields are given by alias, since a setting may be
    named like a method of pydantic's BaseModel (TrainConfig's 'validate')."""
    hints = typing.get_type_hints(cls)
    fields = {f"setting_{f.name}": (_strict(hints[f.name]), Field(None, alias=f.name)) for f in dataclasses.fields(cls)}
    return create_model(f"{cls.__name__}Settings", __config__=ConfigDict(extra="forbid", allow_inf_nan=False), **fields)


def _strict(annotation: Any) -> Any:
    """The annotation with every scalar strict (no '5' for an int, no true for a number), containers as they are."""
    scalars = {int: StrictInt, float: StrictFloat, str: StrictStr, bool: StrictBool}  # StrictFloat takes ints too
    if annotation in scalars:
        return scalars[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is None or not args:
        return annotation
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_strict(arg) for arg in args)]  # noqa: UP007 - built from a tuple
    return origin[tuple(_strict(arg) if arg is not Ellipsis else arg for arg in args)]


def _problems(section: str, error: ValidationError) -> str:
    parts = []
    for item in error.errors()[:4]:
        where = ".".join(str(part) for part in (section, *item["loc"]))
        given = "" if item["type"] == "extra_forbidden" else f" (got {_shown(item.get('input'))})"
        message = "unknown setting" if item["type"] == "extra_forbidden" else item["msg"].lower()
        parts.append(f"{where}: {message}{given}")
    return "; ".join(parts)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------------------ method settings


def check_method_settings(name: str, settings: Any, data: Any = None, build: bool = True) -> dict[str, Any]:
    """The method section of `name` checked against the method's defaults, then (with `build`) the method
    built on the meta device (nothing allocated) with `data` (a DataSpec; 64 x 64, one channel, when None).
    `build` False is for a section that is completed before building (cldm's new diffusion stage gets its
    autoencoder's settings). Returns the settings unchanged."""
    from crossdiff.methods import get_method

    cls = get_method(name)
    if not isinstance(settings, dict):
        raise CrossdiffError(f"method: the {name} settings must be a mapping, not {type(settings).__name__}")
    stage = settings.get("stage")
    if stage is not None and not isinstance(stage, str):
        raise CrossdiffError(f"method.stage: expected a stage name, got {_shown(stage)}")
    defaults = _defaults(cls, stage)
    unknown = sorted(str(key) for key in settings if key not in defaults)
    if unknown:
        raise CrossdiffError(f"method: {name} has no setting(s) {', '.join(unknown)} (it has: {', '.join(defaults)})")
    for key, value in settings.items():
        check_value(f"method.{key}", value, defaults[key])
    if build:
        build_on_meta(cls, settings, data)
    return settings


@cache
def _defaults(cls: type, stage: Any) -> dict[str, Any]:
    """A method's defaults (built once per method and stage: building takes a moment)."""
    return cls.default_settings({} if stage is None else {"stage": stage})


def check_value(where: str, value: Any, default: Any, key: str | None = None) -> None:
    """`value` must have the type of `default` (an int where a float is expected is fine) and lie within
    SETTING_RANGES for its name `key` (the last part of `where`); lists element by element, mappings key
    by key where the default has keys."""
    key = key or where.rsplit(".", 1)[-1].split(" ")[-1]
    if default is None:
        return  # an optional setting without a default type (e.g. a file name): its user decides
    if isinstance(default, bool) or isinstance(default, str):
        if type(value) is not type(default):
            raise CrossdiffError(f"{where}: expected {type(default).__name__}, got {_shown(value)}")
        return
    if isinstance(default, int | float):
        number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        if number is None or (isinstance(default, int) and not isinstance(value, int)) or not math.isfinite(number):
            kind = "a whole number" if isinstance(default, int) else "a finite number"
            raise CrossdiffError(f"{where}: expected {kind}, got {_shown(value)}")
        low, high = SETTING_RANGES.get(key, (-math.inf, math.inf))
        if not low <= number <= high:
            raise CrossdiffError(f"{where}: {number} is outside [{low:g}, {high:g}]")
        return
    if isinstance(default, list | tuple):
        if not isinstance(value, list | tuple):
            raise CrossdiffError(f"{where}: expected a list, got {_shown(value)}")
        if default:
            for index, item in enumerate(value):
                check_value(f"{where}[{index}]", item, default[0], key)
        return
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise CrossdiffError(f"{where}: expected a mapping, got {_shown(value)}")
        for inner, item in value.items():
            if inner in default:
                check_value(f"{where}.{inner}", item, default[inner])


def build_on_meta(cls: type, settings: dict[str, Any], data: Any = None) -> Any:
    """The method built on PyTorch's meta device: any inconsistency of the settings shows, and the
    networks' size is known, before a byte is allocated. Refuses more than MAX_PARAMETERS weights."""
    import torch

    from crossdiff.methods.base import DataSpec

    data = data if data is not None else DataSpec(1, 1, (64, 64))
    try:
        with torch.device("meta"):
            method = cls(settings, data)
    except CrossdiffError:
        raise
    except Exception as error:  # a setting the network builder cannot use: a value of the right type but wrong
        raise CrossdiffError(f"method: the {cls.name} settings cannot build its networks ({error_summary(error)})") from None
    count = sum(p.numel() for module in method.modules().values() for p in module.parameters())
    if count > MAX_PARAMETERS:
        raise CrossdiffError(f"method: these {cls.name} settings build networks of {count:,} parameters, more than "
                             f"{MAX_PARAMETERS:,}")
    return method


# ------------------------------------------------------------------------------ translate options


def parse_option(text: str) -> tuple[str, Any]:
    """KEY=VALUE with VALUE read as YAML (so numbers and booleans arrive typed: eta=0.5, clip=false);
    only a scalar or a short list of scalars is a value."""
    if "=" not in text:
        raise CrossdiffError(f"--option expects KEY=VALUE, got {_shown(text)}")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key.isidentifier():
        raise CrossdiffError(f"--option {_shown(text)}: {_shown(key)} is not an option name")
    try:
        value = yaml.safe_load(raw) if len(raw) <= 1000 else None
    except (yaml.YAMLError, RecursionError):
        value = None
    scalar = (str, int, float, bool)
    if value is None and raw not in ("null", "~", ""):
        raise CrossdiffError(f"--option {key}: {_shown(raw)} is not a value (a number, true/false or a word)")
    if value is not None and not isinstance(value, scalar) and not (
            isinstance(value, list) and len(value) <= 16 and all(isinstance(v, scalar) for v in value)):
        raise CrossdiffError(f"--option {key}: {_shown(raw)} is not a value (a number, true/false or a word)")
    return key, value


def check_translate_options(method: Any, options: dict[str, Any]) -> None:
    """Translation options typed like the method's own settings (sampler, steps, batch) and, for
    diffusion methods, like the chosen sampler's keyword defaults (eta, snr, solver, rtol, ...).
    Unknown names, and samplers of other families (rflow's euler, heun), are left to the method, which
    refuses them by name."""
    from crossdiff.diffusion.samplers import SAMPLERS, sampler_options

    reference = {key: method.config[key] for key in ("sampler", "steps", "batch") if key in method.config}
    if "sampler" in reference:
        chosen = options.get("sampler", reference["sampler"])
        if not isinstance(chosen, str):
            raise CrossdiffError(f"option sampler: expected a sampler name, got {_shown(chosen)}")
        if chosen in SAMPLERS:
            reference |= {key: default for key, default in sampler_options(chosen).items() if default is not None}
    for key, value in options.items():
        if key in reference and value is not None:
            check_value(f"option {key}", value, reference[key])


def check_preparation(config: Any) -> None:
    """Ranges of a PreparationConfig (its types were checked by check_section): what cases.py would
    otherwise only trip over after minutes of reading and registering."""
    from crossdiff.file_checks import SPACING_RANGE_MM
    from crossdiff.intensity import METHODS
    from crossdiff.registration import SLICE_TRANSFORMS, TRANSFORMS

    low, high = SPACING_RANGE_MM
    checks = [
        (bool(config.modalities), "preparation.modalities: at least one modality"),
        (config.reference is None or config.reference in config.modalities,
         f"preparation.reference: {config.reference!r} is not one of the modalities {config.modalities}"),
        (config.registration in ("none", *TRANSFORMS, *SLICE_TRANSFORMS),
         f"preparation.registration: {config.registration!r} is not one of none, {', '.join(TRANSFORMS + SLICE_TRANSFORMS)}"),
        (all(method in METHODS for method in config.scaling.values()),
         f"preparation.scaling: methods must be among {', '.join(METHODS)}, not {config.scaling}"),
        (config.ct_window[0] < config.ct_window[1], f"preparation.ct_window: low must be below high {config.ct_window}"),
        (config.suv_window[0] < config.suv_window[1], f"preparation.suv_window: low must be below high {config.suv_window}"),
        (0.0 <= config.mr_percentiles[0] < config.mr_percentiles[1] <= 100.0,
         f"preparation.mr_percentiles: need 0 <= low < high <= 100, not {config.mr_percentiles}"),
        (config.spacing is None or all(low <= s <= high for s in config.spacing),
         f"preparation.spacing: each must lie in [{low:g}, {high:g}] mm, not {config.spacing}"),
        (config.seed >= 0, f"preparation.seed: must be >= 0, not {config.seed}"),
    ]
    problems = [text for ok, text in checks if not ok]
    if problems:
        raise CrossdiffError("invalid preparation settings: " + "; ".join(problems))
