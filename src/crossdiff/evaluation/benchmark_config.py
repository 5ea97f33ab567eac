"""The benchmark's YAML: which data, which held-out cases, which methods, one training budget for all.

```yaml
data: ../data/sarcoma-ct-mr-pet      # dataset folder or manifest, relative to this file
layout: modality-folders              # optional; detected otherwise
source: mr
target: ct                            # or several, [ct, pet]: one report per target, in OUT/<target>/
test: [STS_003]                       # held-out cases (one split), `test: leave-one-out` (one fold per case),
                                      # or `test: {folds: 5}` (5 folds by case, seeded by evaluation.seed)
groups: {brain: [P01, P02], body: [P10]}  # optional: summaries per group of cases (e.g. body region)
budget: {train_seconds: 600}          # optional: every method trains for the same wall time: its steps are
                                      # set from its own speed, measured on calibration_steps (default 20)
methods:
  - {method: unet}
  - {method: cddpm, name: cddpm-ddim20, config: {sampler: ddim, steps: 20},
     timing: [{sampler: ddpm, steps: 1000}]}   # also time other samplers of the trained model (speed only)
  - {method: cldm, stages: {diffusion: {sampler: ddim, steps: 20}}}   # one model for every target; each
                                      # stage trained with `config` plus its own `stages` section
  - {method: pix2pix, train: {training: {batch_size: 4}}}   # per-method overrides of the shared sections
  - {method: cyclegan, tune: [{lr: 1.0e-3}, {lr: 2.0e-3}]}  # candidates, one chosen per fold on its validation
                                      # cases (crossdiff.evaluation.tuning); the held-out cases choose nothing
tuning: {slices: 16, samples: 1, metric: mae}   # how candidates are scored: central slices of each validation
                                      # case, draws per stochastic translation, the metric (mae, psnr or ssim)
train:                                # `crossdiff train --config` sections shared by every method
  slices: {size: [64, 64], fit: resize}
  preparation: {registration: rigid}
  training: {steps: 2000, batch_size: 8}
evaluation:
  metrics: synthrad2023               # or synthrad2025
  slices: null                        # translate only this many central slices per test case (null: all)
  samples: 4                          # draws of stochastic methods: output = their mean, std = uncertainty
  noise_levels: [0.03, 0.09, 0.15, 0.21]   # noise robustness on each fold's first test case ([] skips it)
  fid_features: null                  # VGG16 weights (.safetensors or .pth) for FID (null: not computed)
  timing_slices: 2                    # central slices that each `timing` entry translates
  target_intensity: training          # or 'case': translations put on each held-out reference's own intensity
                                      # scale before scoring (MR in scanner units that differ between subjects)
  precision: auto                     # of every translation: fp32 on a CPU, bf16 on CUDA; or fp32, bf16, fp16
  seed: 0
quick:                                # merged over the above with --quick
  train: {training: {steps: 20}}
  evaluation: {slices: 8, noise_levels: [0.09]}
```
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from crossdiff.acceleration import PRECISIONS
from crossdiff.config_schema import check_method_settings, check_section, mapping, read_yaml
from crossdiff.data.cases import PreparationConfig
from crossdiff.data.slices import SliceConfig
from crossdiff.errors import CrossdiffError, InputError
from crossdiff.evaluation.metrics import STANDARDS
from crossdiff.file_checks import path_name_problem
from crossdiff.methods import get_method
from crossdiff.training import TrainConfig

TOP_LEVEL = ("data", "layout", "source", "target", "test", "methods", "train", "evaluation", "quick", "groups", "budget",
             "tuning")
BUDGET_DEFAULTS: dict[str, Any] = {"train_seconds": None, "calibration_steps": 20}
TUNING_DEFAULTS: dict[str, Any] = {"slices": 16, "samples": 1, "metric": "mae"}
TUNING_METRICS = {"mae": "lower", "psnr": "higher", "ssim": "higher"}  # what tuning may choose by, and which way
TRAIN_SECTIONS = ("slices", "preparation", "training")


@dataclass(frozen=True)
class EvaluationSettings:
    """The `evaluation` section's settings and their types (ranges are checked in `_evaluation`)."""

    metrics: str = "synthrad2023"
    slices: int | None = None
    samples: int = 1
    noise_levels: list[float] = field(default_factory=list)
    fid_features: str | None = None
    seed: int = 0
    timing_slices: int = 2
    target_intensity: str = "training"
    precision: str = "auto"  # of every translation: crossdiff.acceleration's ('auto': fp32 on a CPU, bf16 on CUDA)


EVALUATION_DEFAULTS: dict[str, Any] = asdict(EvaluationSettings())
TARGET_INTENSITIES = ("training", "case")
LEAVE_ONE_OUT = "leave-one-out"


@dataclass(frozen=True)
class MethodEntry:
    """One benchmarked method: a registered `method`, its `name` in tables, its method section (plus a
    section per training stage, for staged methods), and translation options (e.g. another sampler)
    whose speed alone is measured on the same trained model."""

    method: str
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    timing: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    train: dict[str, dict[str, Any]] = field(default_factory=dict)
    tune: list[dict[str, Any]] = field(default_factory=list)  # candidate overrides of `config`, chosen per fold

    def stage_config(self, stage: str | None) -> dict[str, Any]:
        """The method section one training stage (None: an unstaged method) is given."""
        return {**self.config, **self.stages.get(stage or "", {})}


@dataclass(frozen=True)
class BenchmarkConfig:
    path: Path
    data: Path
    layout: str | None
    source: str
    target: str  # the target this config's report is about; `targets` holds every one it asks for
    test: list[str] | str
    methods: list[MethodEntry]
    train: dict[str, dict[str, Any]]
    evaluation: dict[str, Any]
    targets: tuple[str, ...] = ()
    groups: dict[str, list[str]] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=lambda: dict(BUDGET_DEFAULTS))
    tuning: dict[str, Any] = field(default_factory=lambda: dict(TUNING_DEFAULTS))

    def train_sections(self, entry: MethodEntry) -> dict[str, dict[str, Any]]:
        """The shared training sections with the entry's own overrides merged over them."""
        return _merged(self.train, entry.train)

    def for_target(self, target: str) -> BenchmarkConfig:
        """The same benchmark about one of its targets."""
        return replace(self, target=target)

    def with_methods(self, names: list[str]) -> BenchmarkConfig:
        """The same benchmark with only the named method entries (in the config's order), e.g. to share one
        fold's work between processes; a run with all of them later reuses theirs."""
        known = [entry.name for entry in self.methods]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise InputError(self.path, f"no method entry {', '.join(unknown)}; the entries are {', '.join(known)}")
        return replace(self, methods=[entry for entry in self.methods if entry.name in names])

    @property
    def fid_features(self) -> Path | None:
        value = self.evaluation["fid_features"]
        return None if value is None else _relative(self.path, value)


def load_benchmark_config(path: Path, quick: bool = False) -> BenchmarkConfig:
    """Read and check the YAML; every problem is an InputError naming the file."""
    raw = dict(mapping(path, read_yaml(path, "benchmark config"), "benchmark config"))
    unknown = sorted(set(raw) - set(TOP_LEVEL))
    if unknown:
        raise InputError(path, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(TOP_LEVEL)}")
    overrides = mapping(path, raw.pop("quick", None), "'quick'")
    if quick and not overrides:
        raise InputError(path, "--quick asks for the config's 'quick:' overrides, and it has none")
    if quick:
        raw = _merged(raw, overrides)
    for key in ("data", "source", "target", "test", "methods"):
        if key not in raw:
            raise InputError(path, f"needs a {key!r} entry")
    for key in ("data", "source", "layout"):
        if key in raw and not (isinstance(raw[key], str) and raw[key]) and not (key == "layout" and raw[key] is None):
            raise InputError(path, f"{key!r} must be a text, not {raw[key]!r}")
    targets = _targets(path, raw["target"])
    try:
        config = BenchmarkConfig(
            path=path,
            data=_relative(path, raw["data"]),
            layout=raw.get("layout"),
            source=raw["source"].lower(),
            target=targets[0],
            targets=targets,
            test=_test_cases(path, raw["test"]),
            methods=_methods(path, raw["methods"]),
            train=_train_sections(path, raw.get("train") or {}),
            evaluation=_evaluation(path, raw.get("evaluation") or {}),
            groups=_groups(path, raw.get("groups") or {}),
            budget=_budget(path, raw.get("budget") or {}),
            tuning=_tuning(path, raw.get("tuning") or {}),
        )
        for entry in config.methods:
            _check_training(config, entry)
    except InputError:
        raise
    except CrossdiffError as error:  # a section's own check (types, ranges, method settings): name the file
        raise InputError(path, str(error)) from None
    return config


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Mappings merged key by key, anything else replaced."""
    result = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = _merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _relative(config: Path, value: Any) -> Path:
    path = Path(str(value))
    with contextlib.suppress(RuntimeError):  # '~user/...' of an unknown user stays as written
        path = path.expanduser()
    return path if path.is_absolute() else Path(os.path.normpath(config.parent / path))


def _targets(path: Path, value: Any) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values) or len({v.lower() for v in values}) != len(values):
        raise InputError(path, f"'target' must be a modality key or a list of distinct ones, not {value!r}")
    return tuple(v.lower() for v in values)


def _test_cases(path: Path, value: Any) -> list[str] | str | int:
    if value == LEAVE_ONE_OUT:
        return LEAVE_ONE_OUT
    if isinstance(value, dict):
        folds = value.get("folds")
        if set(value) != {"folds"} or not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
            raise InputError(path, f"'test: {{folds: K}}' needs a whole number K >= 2, not {value!r}")
        return folds
    cases = [value] if isinstance(value, str) else value
    if not isinstance(cases, list) or not cases or not all(isinstance(v, str) for v in cases):
        raise InputError(path, f"'test' must list held-out case ids, be {LEAVE_ONE_OUT!r} or {{folds: K}}")
    for case in cases:
        if problem := path_name_problem(case):
            raise InputError(path, f"'test': the case id {case!r} {problem}")
    return list(cases)


def _groups(path: Path, value: Any) -> dict[str, list[str]]:
    if not isinstance(value, dict) or not all(
        isinstance(name, str) and isinstance(ids, list) and ids and all(isinstance(i, str) for i in ids)
        for name, ids in value.items()
    ):
        raise InputError(path, "'groups' must map group names to lists of case ids")
    return {name: list(ids) for name, ids in value.items()}


def _budget(path: Path, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) - set(BUDGET_DEFAULTS):
        raise InputError(path, f"'budget' may hold only {', '.join(BUDGET_DEFAULTS)}")
    settings = {**BUDGET_DEFAULTS, **value}
    seconds, steps = settings["train_seconds"], settings["calibration_steps"]
    if seconds is not None and (not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds <= 0):
        raise InputError(path, f"budget train_seconds must be a positive number of seconds, not {seconds!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 5:
        raise InputError(path, f"budget calibration_steps must be a whole number >= 5, not {steps!r}")
    return settings


def _tuning(path: Path, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) - set(TUNING_DEFAULTS):
        raise InputError(path, f"'tuning' may hold only {', '.join(TUNING_DEFAULTS)}")
    settings = {**TUNING_DEFAULTS, **value}
    for key in ("slices", "samples"):
        if not isinstance(settings[key], int) or isinstance(settings[key], bool) or settings[key] < 1:
            raise InputError(path, f"tuning {key} must be a whole number >= 1, not {settings[key]!r}")
    if settings["slices"] < 7:
        raise InputError(path, "tuning slices must be at least 7 (the SSIM window)")
    if settings["metric"] not in TUNING_METRICS:
        raise InputError(path, f"tuning metric must be one of {', '.join(TUNING_METRICS)}, not {settings['metric']!r}")
    return settings


def _tune(path: Path, name: str, value: Any, multi_target: bool) -> list[dict[str, Any]]:
    """Candidate overrides of a method section: none, or at least two distinct non-empty mappings."""
    if value is None:
        return []
    if (not isinstance(value, list) or len(value) < 2 or not all(isinstance(c, dict) and c for c in value)
            or len({repr(sorted(c.items())) for c in value}) != len(value)):
        raise InputError(path, f"'tune' of {name} must list at least two distinct candidate overrides of its "
                               "method section, e.g. [{lr: 1.0e-3}, {lr: 2.0e-3}]")
    if multi_target:
        raise InputError(path, f"'tune' of {name}: a method trained once for every target cannot be tuned per "
                               "target's score")
    return [dict(candidate) for candidate in value]


def _methods(path: Path, value: Any) -> list[MethodEntry]:
    if not isinstance(value, list) or not value:
        raise InputError(path, "'methods' must be a non-empty list of {method: NAME, name: ..., config: {...}}")
    entries = []
    for item in value:
        item = {"method": item} if isinstance(item, str) else item
        if not isinstance(item, dict) or "method" not in item or set(item) - {"method", "name", "config", "timing", "stages",
                                                                              "train", "tune"}:
            raise InputError(path, f"method entry {item!r} must have 'method' and optionally 'name', 'config', 'timing', "
                                   "'stages', 'train' and 'tune'")
        stages = item.get("stages") or {}
        if not isinstance(stages, dict) or not all(isinstance(section, dict) for section in stages.values()):
            raise InputError(path, f"'stages' of {item['method']} must map stage names to method sections")
        try:
            registered = get_method(str(item["method"]))
        except CrossdiffError as error:
            raise InputError(path, str(error)) from None
        known = registered.training_stages
        if set(stages) - set(known):
            raise InputError(path, f"{item['method']} has no training stage {', '.join(sorted(set(stages) - set(known)))}; "
                                   f"its stages: {', '.join(known) or 'none (it trains in one go)'}")
        timing = item.get("timing") or []
        if not isinstance(timing, list) or not all(isinstance(options, dict) and options for options in timing):
            raise InputError(path, f"'timing' of {item['method']} must list translation options, e.g. "
                                   "[{sampler: ddpm, steps: 1000}]")
        name = item.get("name", item["method"])
        if problem := path_name_problem(name):
            raise InputError(path, f"method name {name!r} {problem}")
        config = item.get("config") or {}
        if not isinstance(config, dict):
            raise InputError(path, f"'config' of {name} must be a mapping of method settings")
        entries.append(MethodEntry(str(item["method"]), name, dict(config), [dict(options) for options in timing],
                                   {str(stage): dict(section) for stage, section in stages.items()},
                                   _train_sections(path, item.get("train") or {}),
                                   _tune(path, name, item.get("tune"), registered.multi_target)))
    names = [entry.name for entry in entries]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InputError(path, f"method name(s) {', '.join(duplicates)} appear twice; give each entry its own 'name'")
    return entries


def _check_training(config: BenchmarkConfig, entry: MethodEntry) -> None:
    """The sections one method is trained with (the shared ones, its own merged over them) checked as
    `crossdiff train` will check them, and its method section (each stage's) typed and built on the meta
    device (a new cldm diffusion stage, and a method built on another run of the benchmark, only typed:
    they are built from what that run trains)."""
    sections = config.train_sections(entry)
    slices = SliceConfig.from_dict(sections["slices"])
    TrainConfig.from_dict(sections["training"])
    modalities = [config.source, *config.targets]
    PreparationConfig.from_dict({"modalities": modalities, "reference": modalities[1], **sections["preparation"]})
    method = get_method(entry.method)
    data = method.training_data(slices)
    for candidate in entry.tune or [{}]:
        for stage in method.training_stages or (None,):
            settings = entry.stage_config(stage) | candidate | ({"stage": stage} if stage else {})
            check_method_settings(entry.method, settings, data, build=stage != "diffusion" and not method.builds_on_a_run)


def _train_sections(path: Path, value: Any) -> dict[str, dict[str, Any]]:
    if not isinstance(value, dict) or set(value) - set(TRAIN_SECTIONS):
        raise InputError(path, f"'train' may hold only the sections {', '.join(TRAIN_SECTIONS)}")
    return {section: dict(mapping(path, value.get(section), f"'train.{section}'")) for section in TRAIN_SECTIONS}


def _evaluation(path: Path, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or set(value) - set(EVALUATION_DEFAULTS):
        raise InputError(path, f"'evaluation' may hold only {', '.join(EVALUATION_DEFAULTS)}")
    check_section("evaluation", value, EvaluationSettings)
    settings = {**EVALUATION_DEFAULTS, **value}
    if settings["metrics"] not in STANDARDS:
        raise InputError(path, f"evaluation metrics must be one of {', '.join(STANDARDS)}")
    if not isinstance(settings["samples"], int) or settings["samples"] < 1:
        raise InputError(path, "evaluation samples must be a whole number >= 1")
    if settings["slices"] is not None and (not isinstance(settings["slices"], int) or settings["slices"] < 7):
        raise InputError(path, "evaluation slices must be null (all) or at least 7 (the SSIM window)")
    if not isinstance(settings["timing_slices"], int) or settings["timing_slices"] < 1:
        raise InputError(path, "evaluation timing_slices must be a whole number >= 1")
    if settings["target_intensity"] not in TARGET_INTENSITIES:
        raise InputError(path, f"evaluation target_intensity must be one of {', '.join(TARGET_INTENSITIES)}")
    if settings["precision"] not in PRECISIONS:
        raise InputError(path, f"evaluation precision must be one of {', '.join(PRECISIONS)}, not {settings['precision']!r}")
    if settings["precision"] == "fp16" and not torch.cuda.is_available():
        raise InputError(path, "evaluation precision fp16 needs a CUDA GPU, and this machine has none; use bf16 or fp32")
    settings["noise_levels"] = [float(level) for level in settings["noise_levels"] or []]
    if any(level < 0 for level in settings["noise_levels"]) or settings["seed"] < 0:
        raise InputError(path, "evaluation noise_levels and seed must be >= 0")
    return settings
