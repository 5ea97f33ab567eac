"""`crossdiff benchmark`: train every listed method on the same split with the same budget, translate the
held-out cases, and score them, so methods are compared on equal terms.

Training goes through the `crossdiff train` command (a subprocess per run, exactly what a user runs),
so the benchmark measures the real code path. Everything lands in OUT, laid out so that
`crossdiff evaluate --pred OUT/translations/METHOD --ref OUT/cases/reference --mask OUT/cases/mask`
repeats the scoring:

    folds/FOLD/manifest.json         the split of each fold (held-out cases 'test', the rest 'train')
    runs/FOLD/METHOD/                training runs (checkpoints, metrics.jsonl); a staged method's earlier
                                     stages in runs/FOLD/METHOD/STAGE/
    cases/{source,reference,mask}/   the held-out cases on the reference grid (central slab if asked)
    translations/METHOD/CASE.nii.gz  uncertainty/METHOD/CASE.nii.gz (stochastic methods, >= 2 draws)
    records/METHOD/CASE.json         metrics, cost, sample variability; CASE.noise.json; CASE.timing.json
    evaluation.json                  the evaluation settings that scored them (a resume with others is refused)
    tuning-settings.json             the same for the tuning settings that scored the tuning candidates
An interrupted run, started again, reuses finished training runs (and resumes unfinished ones from their
last checkpoint) and finished translations: a record is written last, only when its case is complete.

A config with several targets gets this layout once per target, in OUT/TARGET/; a multi-target method
(cldm) is trained once per fold for all of them, in OUT/runs/FOLD/METHOD/, and translates to each.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from crossdiff import checkpoints
from crossdiff.acceleration import Acceleration
from crossdiff.atomic import write_json, write_text
from crossdiff.data.cases import family_of, prepare_case
from crossdiff.data.layouts import scan
from crossdiff.data.manifest import Manifest, load_manifest, save_manifest, validation_cases
from crossdiff.errors import CrossdiffError, InputError
from crossdiff.evaluation.benchmark_config import LEAVE_ONE_OUT, BenchmarkConfig, MethodEntry
from crossdiff.evaluation.cost import measure, parameter_count, training_cpu_seconds, training_seconds_per_step
from crossdiff.evaluation.evaluate import plain_json
from crossdiff.evaluation.metrics import HU_SCALE, CaseMetrics, Scale, case_metrics, scale_for
from crossdiff.evaluation.pairing import MANIFEST_SUFFIXES
from crossdiff.evaluation.robustness import noise_robustness
from crossdiff.evaluation.tuning import TuningChoice, choose
from crossdiff.evaluation.variability import calibration_table, sample_spread, uncertainty_error_correlation
from crossdiff.inference import LoadedModel, VolumeTranslation, load_model, translate_volume
from crossdiff.intensity import IntensityScaling
from crossdiff.methods import get_method
from crossdiff.train_command import train_with_command
from crossdiff.training import TrainConfig, resolve_device
from crossdiff.volumes import Geometry, Volume, write_volume

TRAIN_CONFIG = "benchmark-config.yaml"
TRAIN_RECORD = "benchmark-train.json"


@dataclass(frozen=True)
class CaseRun:
    """One method on one held-out case: metrics, per-slice metrics, cost, variability and noise rows."""

    method: str
    fold: str
    case: str
    metrics: dict[str, float]
    slices: list[dict[str, float]]
    cost: dict[str, Any]
    variability: dict[str, Any] | None
    noise: list[dict[str, Any]] | None
    timing: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class MethodInfo:
    """A benchmarked method; the training figures hold one entry per fold where they are known."""

    name: str
    method: str
    stochastic: bool
    parameters: int
    train_seconds_per_step: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    train_cpu_seconds: list[float] = field(default_factory=list)  # the training loop's CPU seconds: the budget used
    train_peak_memory_bytes: list[int] = field(default_factory=list)  # each training process's own peak RSS


@dataclass(frozen=True)
class BenchmarkResult:
    """Everything a report needs; `scale` is how the target was scored (HU, or [0, 1] by a display range or
    the reference percentiles), `planar` whether cases are 2-D slice stacks (SSIM per slice)."""

    config: BenchmarkConfig
    out: Path
    folds: dict[str, list[str]]
    runs: list[CaseRun]
    methods: dict[str, MethodInfo]
    scale: Scale = HU_SCALE
    planar: bool = False
    tuning: list[TuningChoice] = field(default_factory=list)  # each tuned entry's choice per fold

    @property
    def hounsfield(self) -> bool:
        return self.scale.hounsfield


def run_benchmarks(config: BenchmarkConfig, out: Path, log: Callable[[str], None] = print,
                   only: list[str] | None = None) -> list[BenchmarkResult]:
    """One result per target of the config: OUT itself for one target, OUT/TARGET for several. `only` runs just
    those folds (e.g. two processes sharing one OUT, each on its own folds); a later run without it reuses them."""
    if len(config.targets) == 1:
        return [run_benchmark(config, out, log, only=only)]
    return [run_benchmark(config.for_target(target), out / target, log, shared=out, only=only) for target in config.targets]


def run_benchmark(config: BenchmarkConfig, out: Path, log: Callable[[str], None] = print,
                  shared: Path | None = None, only: list[str] | None = None) -> BenchmarkResult:
    """Train, translate and score every (fold, method, held-out case) for config.target, reusing what a
    previous run finished; multi-target methods train in `shared` (default OUT) for all config.targets."""
    manifest = _dataset(config)
    folds = _folds(config, manifest)
    unknown = sorted(set(only or []) - set(folds))
    if unknown:
        raise CrossdiffError(f"no fold {', '.join(unknown)}; the folds are {', '.join(folds)}")
    _same_scoring(config, out)
    if config.budget["train_seconds"] is not None:  # timed on the first fold, whichever folds this run does
        first = next(iter(folds))
        config = _budgeted(config, _fold_manifest(manifest, folds[first], out / "folds" / first / "manifest.json"),
                           shared or out, log)
    if only:
        folds = {name: cases for name, cases in folds.items() if name in only}
    device = resolve_device(config.train["training"].get("device"))
    runs, methods, tuning = [], {}, []
    scale, planar = HU_SCALE, False
    for fold, held_out in folds.items():
        fold_manifest = _fold_manifest(manifest, held_out, out / "folds" / fold / "manifest.json")
        for entry in config.methods:
            every_target = get_method(entry.method).multi_target
            home = (shared or out) if every_target else out
            run_dir = home / "runs" / fold / entry.name
            if entry.tune:
                entry, choice = _tuned(config, entry, fold, held_out, manifest, fold_manifest, run_dir, out, device, log)
                tuning.append(choice)
            train_seconds = _train(config, entry, fold_manifest, run_dir, log, every_target, (shared or out) / "cache")
            saved = _saved_runs(config, entry, fold, held_out, run_dir, out)
            model = None if saved is not None else load_model(run_dir, device)
            summary = _model_summary(run_dir, model, config.target)
            info = methods.setdefault(entry.name, MethodInfo(entry.name, entry.method, summary["stochastic"],
                                                             summary["parameters"]))
            per_step = summary["seconds_per_step"]
            info.train_seconds_per_step.extend([] if per_step is None else [per_step])
            info.train_seconds.extend([] if train_seconds is None else [train_seconds])
            cpu = summary.get("train_cpu_seconds")
            info.train_cpu_seconds.extend([] if cpu is None else [cpu])
            peak = json.loads((run_dir / TRAIN_RECORD).read_text(encoding="utf-8")).get("peak_memory_bytes")
            info.train_peak_memory_bytes.extend([] if peak is None else [int(peak)])
            scoring = _scoring(config, summary["target_units"], bool(summary["planar"]))
            scale, planar = scoring.scale, scoring.planar
            if saved is not None:
                log(f"reusing the scored translations of {entry.name} in {fold}")
                runs += saved
                continue
            assert model is not None
            for index, case_id in enumerate(held_out):
                case = _held_out_case(config, manifest, case_id, model, out)
                with_noise = index == 0 and bool(config.evaluation["noise_levels"])
                run = _case_run(config, entry.name, fold, case, model, out, with_noise, scoring, log)
                if index == 0 and entry.timing:
                    run = replace(run, timing=_timing(config, entry, case, model, out, log))
                runs.append(run)
    return BenchmarkResult(config, out, folds, runs, methods, scale, planar, tuning)


SCORING_RECORDS = {"evaluation": "evaluation.json", "tuning": "tuning-settings.json"}


def _same_scoring(config: BenchmarkConfig, out: Path) -> None:
    """Scored translations and tuning choices are reused on resume, so OUT keeps the settings that scored them
    (evaluation: draws, slices, precision, ...; tuning: how candidates were scored), and a run with other
    settings is refused rather than mixed into one report."""
    for section, name in SCORING_RECORDS.items():
        record, settings = out / name, plain_json(getattr(config, section))
        if not record.is_file():
            write_json(record, settings)
            continue
        before = json.loads(record.read_text(encoding="utf-8"))
        changed = sorted(key for key in set(before) | set(settings) if before.get(key) != settings.get(key))
        if changed:
            differences = ", ".join(f"{key}: {before.get(key)!r}, now {settings.get(key)!r}" for key in changed)
            raise CrossdiffError(f"{out} was scored with other {section} settings ({differences}); its scores would "
                                 "be mixed with new ones: use a fresh --out, or the settings it was run with")


MODEL_SUMMARY = "benchmark-model.json"


def _model_summary(run_dir: Path, model: LoadedModel | None, target: str) -> dict[str, Any]:
    """What the report needs of a trained model (kept in RUN/benchmark-model.json), so a benchmark whose
    translations are all scored can be finished from its records alone, e.g. in a fresh checkout that
    holds the committed records but no checkpoints."""
    path = run_dir / MODEL_SUMMARY
    if model is None:
        return json.loads(path.read_text(encoding="utf-8"))
    summary = {"stochastic": model.method.stochastic, "parameters": parameter_count(model.method),
               "seconds_per_step": training_seconds_per_step(run_dir), "train_cpu_seconds": training_cpu_seconds(run_dir),
               "target_units": model.spec.for_target(target).target_scaling.units, "planar": model.spec.planar}
    write_json(path, summary)
    return summary


def _saved_runs(config: BenchmarkConfig, entry: MethodEntry, fold: str, held_out: list[str], run_dir: Path,
                out: Path) -> list[CaseRun] | None:
    """Every held-out case's run of this method and fold from its records, or None if any record (or the model
    summary) is missing."""
    records = out / "records" / entry.name
    noise = bool(config.evaluation["noise_levels"])
    needed = [run_dir / MODEL_SUMMARY, *(records / f"{case}.json" for case in held_out)]
    needed += [records / f"{held_out[0]}.noise.json"] if noise else []
    needed += [records / f"{held_out[0]}.timing.json"] if entry.timing else []
    if not all(path.is_file() for path in needed):
        return None

    def read(path: Path) -> Any:
        return json.loads(path.read_text(encoding="utf-8"))

    runs = []
    for index, case in enumerate(held_out):
        saved = read(records / f"{case}.json")
        run = CaseRun(entry.name, fold, case, saved["metrics"], saved["slices"], saved["cost"], saved["variability"],
                      read(records / f"{case}.noise.json") if index == 0 and noise else None,
                      read(records / f"{case}.timing.json") if index == 0 and entry.timing else None)
        runs.append(run)
    return runs


# --------------------------------------------------------------------------------------- data, folds


def _dataset(config: BenchmarkConfig) -> Manifest:
    if not config.data.exists():
        raise InputError(config.data, f"does not exist (the 'data' of {config.path})")
    if config.data.is_file() and config.data.name.lower().endswith(MANIFEST_SUFFIXES):
        return load_manifest(config.data)
    return scan(config.data, layout=config.layout)


def _folds(config: BenchmarkConfig, manifest: Manifest) -> dict[str, list[str]]:
    paired = manifest.cases_with(config.source, config.target)
    if len(paired) < 2:
        raise InputError(config.data, f"needs at least two cases with both {config.source} and {config.target}")
    if config.test == LEAVE_ONE_OUT:
        return {case_id: [case_id] for case_id in paired}
    if isinstance(config.test, int):
        return _k_folds(config, paired, config.test)
    missing = [case_id for case_id in config.test if case_id not in paired]
    if missing:
        raise InputError(config.path, f"test case(s) {', '.join(missing)} are not cases of {config.data} with both "
                                      f"{config.source} and {config.target} (cases: {', '.join(paired)})")
    if len(config.test) == len(paired):
        raise InputError(config.path, "every case is held out: nothing is left to train on")
    return {"+".join(config.test): list(config.test)}


def _k_folds(config: BenchmarkConfig, cases: list[str], folds: int) -> dict[str, list[str]]:
    """K folds by case: cases ranked by a seeded hash (as manifest splits are), dealt out in turn, so the
    folds do not depend on file order and sizes differ by at most one."""
    if folds > len(cases):
        raise InputError(config.path, f"{folds} folds need at least {folds} cases with both modalities, not {len(cases)}")
    ranked = sorted(cases, key=lambda cid: hashlib.sha256(f"{config.evaluation['seed']}\0{cid}".encode()).hexdigest())
    return {f"fold{k + 1}": sorted(ranked[k::folds]) for k in range(folds)}


def _fold_manifest(manifest: Manifest, held_out: list[str], path: Path) -> Path:
    fold = Manifest({cid: replace(entry, split="test" if cid in held_out else "train") for cid, entry in manifest.cases.items()})
    save_manifest(fold, path)
    return path


# ------------------------------------------------------------------------------------------ training


def _train(
    config: BenchmarkConfig, entry: MethodEntry, manifest: Path, run_dir: Path, log: Callable[[str], None],
    every_target: bool = False, cache: Path | None = None,
) -> float | None:
    """Train a method's stages one after the other (the last one in run_dir, earlier ones in
    run_dir/STAGE); returns the training seconds (None when unknown for a reused or resumed stage).
    `cache` holds the prepared cases every run of the benchmark shares (default: each run its own)."""
    stages = get_method(entry.method).training_stages
    targets = ",".join(config.targets if every_target else [config.target])
    sections = config.train_sections(entry)
    total: float | None = 0.0
    previous = None
    for stage in stages or [None]:
        stage_dir = run_dir if stage is None or stage == stages[-1] else run_dir / stage
        options = ["--target", targets] + ([] if stage is None else ["--stage", stage])
        seconds = _train_stage(config, entry.name, entry.method, entry.stage_config(stage), sections, manifest, stage_dir,
                               options + (["--cache", str(cache)] if cache is not None else []), previous, log)
        total = None if total is None or seconds is None else total + seconds
        previous = stage_dir
    return total


def _train_stage(
    config: BenchmarkConfig, name: str, method: str, method_config: dict[str, Any], sections: dict[str, dict[str, Any]],
    manifest: Path, run_dir: Path, options: list[str], previous: Path | None, log: Callable[[str], None],
) -> float | None:
    """Train through `crossdiff train` unless a finished run with the same settings is there; resume an
    unfinished one. A stage after the first builds on the `previous` one (cldm's --autoencoder).
    Returns the training seconds (None when they are unknown for a reused run)."""
    record = run_dir / TRAIN_RECORD
    settings = yaml.safe_dump({"method": method_config, **sections}, sort_keys=True)
    saved = run_dir / TRAIN_CONFIG
    if saved.is_file() and saved.read_text(encoding="utf-8") != settings:
        raise CrossdiffError(f"{run_dir} was trained with other settings than {config.path} gives now; "
                             "delete that folder or choose another --out")
    if record.is_file():
        log(f"reusing the finished run {run_dir}")
        return json.loads(record.read_text(encoding="utf-8")).get("seconds")
    write_text(saved, settings)
    log(f"{'resuming' if checkpoints.latest_checkpoint(run_dir) else 'training'} {name} in {run_dir}")
    run = train_with_command(method, manifest, run_dir, saved, ["--source", config.source, *options],
                             [] if previous is None else ["--autoencoder", str(previous)])
    seconds = None if run.resumed else run.seconds  # a resumed run's earlier part went unmeasured
    write_json(record, {"seconds": seconds, "command": run.command, "peak_memory_bytes": run.peak_memory_bytes})
    return seconds


def _budgeted(config: BenchmarkConfig, manifest: Path, out: Path, log: Callable[[str], None]) -> BenchmarkConfig:
    """Every method gets the same training time: its steps = budget x its own steps per second of CPU time,
    measured once on `calibration_steps` steps of the first fold (in OUT/budget/, reused by later runs) and
    recorded, so a rerun trains exactly the same steps. CPU time, because wall time on a shared machine
    depends on what else runs during the few calibration steps; with one thread (OMP_NUM_THREADS=1) a CPU
    second is a wall second of the same machine alone. The rate is the last logged one (after warm-up)."""
    seconds, calibration = float(config.budget["train_seconds"]), int(config.budget["calibration_steps"])
    entries = []
    for entry in config.methods:
        if "steps" in entry.train.get("training", {}):  # the entry says its own steps (e.g. a staged method)
            entries.append(entry)
            continue
        if get_method(entry.method).training_stages:
            raise InputError(config.path, f"a time budget cannot be split over {entry.method}'s training stages; "
                                          "give it steps in its own 'train' section instead")
        record = out / "budget" / f"{entry.name}.json"
        if not record.is_file():
            write_json(record, _calibrate(config, entry, manifest, out / "budget" / "runs" / entry.name, calibration,
                                          out / "cache", log))
        measured = json.loads(record.read_text(encoding="utf-8"))
        unit = "steps_per_s" if measured.get("device", "cpu") == "cuda" else "steps_per_cpu_s"
        rate = float(measured[unit])
        steps = max(1, int(seconds * rate))
        log(f"budget: {entry.name} runs {rate:.3g} steps per {'second' if unit == 'steps_per_s' else 'CPU second'}: "
            f"{steps} steps in {seconds:g} s")
        entries.append(replace(entry, train=_merge_sections(entry.train, {"training": {"steps": steps}})))
    return replace(config, methods=entries)


def _calibrate(config: BenchmarkConfig, entry: MethodEntry, manifest: Path, run_dir: Path, steps: int, cache: Path,
               log: Callable[[str], None]) -> dict[str, Any]:
    """Train `steps` steps in a throw-away run and read the steps per second of its last log interval."""
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    sections = _merge_sections(config.train_sections(entry), {"training": {
        "steps": steps, "log_every": max(1, steps // 2), "validate": False, "checkpoint_every": steps}})
    settings = run_dir / TRAIN_CONFIG
    write_text(settings, yaml.safe_dump({"method": entry.config, **sections}, sort_keys=True))
    log(f"budget: timing {entry.name} on {steps} steps")
    run = train_with_command(entry.method, manifest, run_dir, settings,
                             ["--source", config.source, "--target", config.target, "--cache", str(cache)])
    rows = [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "steps_per_cpu_s" in row]
    if not rows:
        raise CrossdiffError(f"timing {entry.name} in {run_dir} logged no speed")
    device = resolve_device(sections["training"].get("device")).type
    return {"steps_per_cpu_s": rows[-1]["steps_per_cpu_s"], "steps_per_s": rows[-1]["steps_per_s"], "device": device,
            "calibration_steps": steps, "command": run.command}


def _tuned(
    config: BenchmarkConfig, entry: MethodEntry, fold: str, held_out: list[str], manifest: Manifest, fold_manifest: Path,
    run_dir: Path, out: Path, device: Any, log: Callable[[str], None],
) -> tuple[MethodEntry, TuningChoice]:
    """The entry with the candidate of its `tune` list that scores best on this fold's validation cases (each
    candidate trained as the entry would be, in OUT/tuning/FOLD/NAME/K), its run copied to run_dir. The
    validation cases are those `crossdiff train` keeps out of training: one carved out of the fold's training
    cases when there are at least CARVE_FROM, else the training cases themselves."""
    settings = config.tuning
    training_cases = [case for case in manifest.cases_with(config.source, config.target) if case not in held_out]
    seed = TrainConfig.from_dict(config.train_sections(entry)["training"]).seed
    validation = validation_cases(training_cases, [], seed)[1]  # the case(s) `crossdiff train` keeps out of training

    def train(candidate: MethodEntry, candidate_dir: Path) -> None:
        _train(config, candidate, fold_manifest, candidate_dir, log, cache=out / "cache")

    def validate(candidate_dir: Path) -> dict[str, float]:
        model = load_model(candidate_dir, device)
        scoring = _scoring(config, model.spec.for_target(config.target).target_scaling.units, model.spec.planar)
        samples = settings["samples"] if model.method.stochastic else 1
        scores = {}
        for case_id in validation:
            case = _prepared_case(config, manifest, case_id, model, out / "cache", settings["slices"])
            result = _translate(config, model, case.source, case.mask_volume, samples=samples)
            prediction = _scored_scale(config, model, case)(result.mean).array
            scores[case_id] = scoring.values(case.reference.array, prediction, case.mask)[settings["metric"]]
        return scores

    return choose(entry, fold, settings["metric"], out / "tuning" / fold / entry.name,
                  out / "tuning" / fold / f"{entry.name}.json", run_dir, train, validate, log)


def _merge_sections(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = {key: dict(value) for key, value in base.items()}
    for key, value in overrides.items():
        merged[key] = {**merged.get(key, {}), **value}
    return merged


# --------------------------------------------------------------------------------------- held-out cases


@dataclass(frozen=True)
class HeldOutCase:
    case_id: str
    source: Volume
    reference: Volume
    mask: np.ndarray
    reference_scaling: IntensityScaling  # what the preparation fitted to this case's own reference

    @property
    def mask_volume(self) -> Volume:
        """The mask as a volume on the reference grid (what translate_volume and the saved files take)."""
        return self.reference.with_array(self.mask.astype(np.uint8), modality="mask")


def _prepared_case(config: BenchmarkConfig, manifest: Manifest, case_id: str, model: LoadedModel, cache: Path,
                   slices: int | None) -> HeldOutCase:
    """The case prepared as the model's training data was (registration included), on the reference grid,
    cut to its central `slices` slices (None: all)."""
    preparation = replace(model.spec.preparation, modalities=[config.source, config.target], reference=config.target)
    prepared = prepare_case(case_id, manifest.cases[case_id], preparation, cache)
    start, stop = _slab_range(prepared.mask, slices)
    source, reference = (_slab(prepared.physical(key), start, stop) for key in (config.source, config.target))
    return HeldOutCase(case_id, source, reference, prepared.mask[start:stop], prepared.scalings[config.target])


def _held_out_case(config: BenchmarkConfig, manifest: Manifest, case_id: str, model: LoadedModel, out: Path) -> HeldOutCase:
    """The held-out case cut as `evaluation.slices` asks; saved under OUT/cases for `crossdiff evaluate`."""
    case = _prepared_case(config, manifest, case_id, model, out / "cache", config.evaluation["slices"])
    for kind, volume in (("source", case.source), ("reference", case.reference), ("mask", case.mask_volume)):
        target = out / "cases" / kind / f"{case_id}.nii.gz"
        if not target.is_file():
            write_volume(volume, target)
    return case


def _slab_range(mask: np.ndarray, slices: int | None) -> tuple[int, int]:
    """All slices, or `slices` consecutive ones centred in the mask's extent along the first axis."""
    depth = mask.shape[0]
    if slices is None or slices >= depth:
        return 0, depth
    filled = np.flatnonzero(mask.any(axis=(1, 2)))
    centre = int(filled[len(filled) // 2])
    start = min(max(0, centre - slices // 2), depth - slices)
    return start, start + slices


def _slab(volume: Volume, start: int, stop: int) -> Volume:
    """Slices start:stop (first array axis) with the origin moved so that they stay where they are in space."""
    if (start, stop) == (0, volume.shape[0]):
        return volume
    g = volume.geometry
    direction = np.array(g.direction).reshape(3, 3)
    origin = tuple(float(v) for v in np.array(g.origin) + direction[:, 2] * g.spacing[2] * start)
    geometry = Geometry((g.size[0], g.size[1], stop - start), g.spacing, origin, g.direction)  # type: ignore[arg-type]
    return Volume(np.ascontiguousarray(volume.array[start:stop]), geometry, volume.modality, volume.units,
                  planar=volume.planar)


# ------------------------------------------------------------------------------- translation, scoring


@dataclass(frozen=True)
class Scoring:
    """One scoring rule for every prediction of a benchmark: standard, scale, and 2-D or 3-D SSIM."""

    standard: str
    scale: Scale
    planar: bool

    def __call__(self, reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray) -> CaseMetrics:
        return case_metrics(reference, prediction, mask, self.standard, scale=self.scale, planar=self.planar)

    def values(self, reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray) -> dict[str, float]:
        return self(reference, prediction, mask).values


def _scoring(config: BenchmarkConfig, units: str, planar: bool) -> Scoring:
    """The benchmark's scoring rule for a target stored in `units`, from a loaded model or a run's records."""
    return Scoring(config.evaluation["metrics"], scale_for(family_of(config.target), units), planar)


def _case_run(
    config: BenchmarkConfig, name: str, fold: str, case: HeldOutCase, model: LoadedModel, out: Path,
    with_noise: bool, scoring: Scoring, log: Callable[[str], None],
) -> CaseRun:
    record = out / "records" / name / f"{case.case_id}.json"
    if record.is_file():
        log(f"reusing the scored translation {record}")
        saved = json.loads(record.read_text(encoding="utf-8"))
    else:
        log(f"translating {case.case_id} with {name}")
        saved = _translate_and_score(config, name, case, model, out, scoring)
        write_json(record, plain_json(saved))
    noise = _noise(config, name, case, model, out, scoring, log) if with_noise else None
    return CaseRun(name, fold, case.case_id, saved["metrics"], saved["slices"], saved["cost"], saved["variability"], noise)


def on_scored_scale(target_intensity: str, trained: IntensityScaling, own: IntensityScaling) -> Callable[[Volume, bool], Volume]:
    """How a translation (or, with spread=True, its std) is put on the intensity scale it is scored on,
    `evaluation.target_intensity`: 'training' leaves it in the units of the model's training targets;
    'case' maps it through the model's target scaling (`trained`) onto the normalised training scale and
    back through the scaling the preparation fitted to the case's own reference (`own`). MR has no
    physical unit: raw scanner values differ from subject to subject (2-4 times between the brain subjects
    here), and SynDiff-style normalised metrics compare each volume on its own scale; 'case' uses that one
    statistic of the reference (e.g. its mean inside the mask). Both scalings are linear, so a std scales
    by their ratio."""

    def convert(volume: Volume, spread: bool = False) -> Volume:
        if target_intensity == "training":
            return volume
        if spread:
            return volume.with_array((volume.array * (own.high - own.low) / (trained.high - trained.low)).astype(np.float32))
        return volume.with_array(own.invert(trained.apply(volume.array)))

    return convert


def _scored_scale(config: BenchmarkConfig, model: LoadedModel, case: HeldOutCase) -> Callable[[Volume, bool], Volume]:
    return on_scored_scale(config.evaluation["target_intensity"], model.spec.for_target(config.target).target_scaling,
                           case.reference_scaling)


def _translate(config: BenchmarkConfig, model: LoadedModel, source: Volume, mask: Volume, **options: Any) -> VolumeTranslation:
    """Every translation of a benchmark: its seed, target and precision (`evaluation.precision`), on `mask`."""
    return translate_volume(model, source, mask=mask, seed=config.evaluation["seed"], target=config.target,
                            acceleration=Acceleration(precision=config.evaluation["precision"]), **options)


def _translate_and_score(config: BenchmarkConfig, name: str, case: HeldOutCase, model: LoadedModel, out: Path,
                         scoring: Scoring) -> dict[str, Any]:
    settings = config.evaluation
    samples = settings["samples"] if model.method.stochastic else 1
    result, measured = measure(
        lambda: _translate(config, model, case.source, case.mask_volume, samples=samples, keep_samples=samples > 1),
        model.device,
    )
    scaled = _scored_scale(config, model, case)
    mean = scaled(result.mean)
    reference = case.reference.array
    metrics = scoring(reference, mean.array, case.mask)
    write_volume(mean, out / "translations" / name / f"{case.case_id}.nii.gz")
    variability = None
    if result.std is not None and result.samples is not None:
        std = scaled(result.std, True)
        write_volume(std, out / "uncertainty" / name / f"{case.case_id}.nii.gz")
        variability = _variability([scaled(draw) for draw in result.samples], std.array, mean.array, case, scoring)
    translated_slices = int(case.mask.any(axis=(1, 2)).sum())
    cost = {"seconds": measured.seconds, "slices": translated_slices, "s_per_slice": measured.seconds / translated_slices,
            "nfe": result.nfe, "samples": samples, "peak_memory_bytes": measured.peak_memory_bytes,
            "memory": measured.memory_kind}
    return {"metrics": metrics.values, "slices": metrics.slices, "scale": metrics.scale, "cost": cost, "variability": variability}


def _variability(draws: list[Volume], std: np.ndarray, mean: np.ndarray, case: HeldOutCase,
                 scoring: Scoring) -> dict[str, Any]:
    """Metric spread over the single draws, and how the std map relates to the error of the mean."""
    reference = case.reference.array
    spread = sample_spread([draw.array for draw in draws], reference, case.mask, scoring.values)
    error = mean.astype(np.float64) - reference
    correlation = uncertainty_error_correlation(std, error, case.mask)
    bins = calibration_table(std, error, case.mask)
    return {
        "draws": len(draws),
        "spread": {metric: {"mean": m, "sd": s} for metric, (m, s) in spread.items()},
        "spearman": {"rho": correlation.rho, "p_value": correlation.p_value, "voxels": correlation.voxels},
        "calibration": [vars(b) for b in bins],
    }


def _noise(config: BenchmarkConfig, name: str, case: HeldOutCase, model: LoadedModel, out: Path, scoring: Scoring,
           log: Callable[[str], None]) -> list[dict[str, Any]]:
    record = out / "records" / name / f"{case.case_id}.noise.json"
    if record.is_file():
        return json.loads(record.read_text(encoding="utf-8"))
    settings = config.evaluation
    log(f"noise robustness of {name} on {case.case_id}")
    mask_volume, scaled = case.mask_volume, _scored_scale(config, model, case)

    def translate(source: Volume) -> Volume:
        return scaled(_translate(config, model, source, mask_volume).mean)

    rows = noise_robustness(translate, case.source, case.reference.array, case.mask, scoring.values,
                            settings["noise_levels"], seed=settings["seed"])
    payload = [{"level": r.level, "sigma": r.sigma, "scores": r.scores, "drop": r.drop} for r in rows]
    write_json(record, plain_json(payload))
    return payload


def _timing(config: BenchmarkConfig, entry: MethodEntry, case: HeldOutCase, model: LoadedModel, out: Path,
            log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Seconds per slice of one draw with each of the entry's `timing` options (e.g. 1000-step DDPM on the
    model trained for a few-step sampler), on the central `timing_slices` slices: speed only, not scored."""
    record = out / "records" / entry.name / f"{case.case_id}.timing.json"
    if record.is_file():
        return json.loads(record.read_text(encoding="utf-8"))
    start, stop = _slab_range(case.mask, config.evaluation["timing_slices"])
    source = _slab(case.source, start, stop)
    mask = _slab(case.mask_volume, start, stop)
    slices = int(mask.array.any(axis=(1, 2)).sum())
    rows = []
    for options in entry.timing:
        label = " ".join(f"{key}={value}" for key, value in options.items())
        log(f"timing {entry.name} with {label} on {slices} slices of {case.case_id}")
        result, measured = measure(partial(_translate, config, model, source, mask, options=options), model.device)
        rows.append({"options": label, "nfe": result.nfe, "slices": slices, "s_per_slice": measured.seconds / slices})
    write_json(record, plain_json(rows))
    return rows
