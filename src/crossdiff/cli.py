"""The `crossdiff` command: one sub-command per job, each a thin layer over the Python API.

User errors (CrossdiffError) become one red line on stderr and exit code 1; no traceback.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import numpy as np
import SimpleITK as sitk
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from crossdiff import __version__
from crossdiff.atomic import atomic_path
from crossdiff.errors import CrossdiffError, InputError, InputWarning
from crossdiff.methods import available_methods

if TYPE_CHECKING:
    from crossdiff.data.cases import PreparedCase
    from crossdiff.data.manifest import Manifest
    from crossdiff.data.slices import SliceConfig

app = typer.Typer(
    name="crossdiff",
    help="Translate one medical imaging modality into another (MR->CT, MR contrasts, PET->CT/MR).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out_console = Console()
err_console = Console(stderr=True)

InputPath = Annotated[Path, typer.Argument(help="Image file (NIfTI, MHA, NRRD, PNG) or folder (DICOM series, PNG slices).")]


def main() -> None:
    """Console-script entry point: user errors print one clear line and exit 1, and so do the system's
    refusals (a full disk, a read-only folder, no memory left); warnings about inputs print one line each."""
    warnings.simplefilter("always", InputWarning)
    warnings.showwarning = _show_warning
    try:
        app()
    except CrossdiffError as error:
        _fail(str(error))
    except OSError as error:
        _fail(f"{error.filename}: {error.strerror}" if error.filename and error.strerror else str(error))
    except MemoryError:
        _fail("out of memory: the input or the settings need more memory than this machine has")
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(1)


_python_showwarning = warnings.showwarning


def _show_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    if issubclass(category, InputWarning):
        err_console.print(f"[bold yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
    else:
        _python_showwarning(message, category, *args, **kwargs)  # type: ignore[arg-type]


@contextlib.contextmanager
def progress(description: str, total: float | None = None) -> Iterator[tuple[Progress, int]]:
    """A rich progress bar on stderr, so stdout stays clean for tables and paths."""
    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=err_console, transient=True) as bar:
        yield bar, bar.add_task(description, total=total)


@app.command()
def info(
    path: InputPath,
    series: Annotated[Optional[str], typer.Option(help="SeriesInstanceUID when a DICOM folder holds several series.")] = None,
) -> None:
    """Show shape, spacing, orientation, intensity range and a modality guess."""
    from crossdiff.readers import read_volume

    volume = read_volume(path, series_uid=series)
    geometry = volume.geometry
    array = volume.array
    table = Table(title=str(path), show_header=False)
    rows = {
        "size (x, y, z)": " x ".join(map(str, geometry.size)),
        "spacing (mm)": ", ".join(f"{s:.4g}" for s in geometry.spacing),
        "origin (mm, LPS)": ", ".join(f"{o:.4g}" for o in geometry.origin),
        "orientation": geometry.orientation,
        "data type": str(array.dtype),
        "intensity min / max": f"{array.min():.6g} / {array.max():.6g}",
        "percentiles 1 / 50 / 99": " / ".join(f"{v:.6g}" for v in np.percentile(array, [1, 50, 99])),
        "modality (guess)": f"{volume.modality or 'unknown'} ({volume.units or 'units unknown'})",
    }
    for key, value in rows.items():
        table.add_row(key, value)
    out_console.print(table)


@app.command()
def prepare(
    root: Annotated[
        Path, typer.Argument(help="Dataset folder (SynthRAD, pix2pix A/B, BraTS, or <case>/<MODALITY>/nifti|dicom).")
    ],
    out: Annotated[Path, typer.Option(help="Manifest to write (.json or .csv).")] = Path("manifest.json"),
    layout: Annotated[Optional[str], typer.Option(help="Force a layout instead of detecting it.")] = None,
    prefer: Annotated[str, typer.Option(help="nifti or dicom, where a case has both.")] = "nifti",
    val: Annotated[float, typer.Option(help="Fraction of cases for validation.")] = 0.0,
    test: Annotated[float, typer.Option(help="Fraction of cases held out for testing.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the case split.")] = 0,
    name: Annotated[Optional[list[str]], typer.Option(help="Rename a modality key, e.g. --name a=mr --name b=ct.")] = None,
) -> None:
    """Recognise a dataset's layout and write its manifest (cases, modalities, masks, split by case)."""
    from crossdiff.data.layouts import prepare_manifest

    names = dict(_key_value(item) for item in name or [])
    manifest = prepare_manifest(root, out, layout=layout, prefer=prefer, val=val, test=test, seed=seed, names=names)
    table = Table(title=f"{out}: {len(manifest.cases)} cases")
    table.add_column("split")
    table.add_column("cases", justify="right")
    for split in ("train", "val", "test"):
        table.add_row(split, str(len(manifest.split_cases(split))))
    out_console.print(table)
    out_console.print(f"modalities: {', '.join(manifest.modalities())}")


@app.command()
def check(
    manifest: Annotated[Path, typer.Argument(help="Manifest (.json or .csv) to check.")],
    reference: Annotated[
        Optional[str], typer.Option(help="Modality whose grid body masks must match (default: ct, else the first).")
    ] = None,
) -> None:
    """Check a manifest before training: every file exists and reads, every mask matches its image."""
    from crossdiff.data.cases import check_case
    from crossdiff.data.manifest import load_manifest

    loaded = load_manifest(manifest)
    with progress("checking cases", total=len(loaded.cases)) as (bar, task):
        for case_id, entry in loaded.cases.items():
            bar.update(task, description=f"checking {case_id}")
            check_case(case_id, entry, reference)
            bar.advance(task)
    modalities = ", ".join(loaded.modalities())
    out_console.print(f"{manifest}: {len(loaded.cases)} cases, modalities {modalities}: all files read, masks match")


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise CrossdiffError(f"--name expects OLD=NEW, got {text!r}")
    old, new = text.split("=", 1)
    return old.strip().lower(), new.strip().lower()


@app.command(name="register")
def register_command(
    fixed: Annotated[Path, typer.Option(help="Image whose grid the result is on (e.g. the CT).")],
    moving: Annotated[Path, typer.Option(help="Image to move (e.g. the MR).")],
    out: Annotated[Path, typer.Option(help="Moving image resampled onto the fixed grid.")],
    transform: Annotated[str, typer.Option(help="rigid, affine or bspline.")] = "rigid",
    save_transform: Annotated[Optional[Path], typer.Option(help="Also write the transform (.tfm).")] = None,
    iterations: Annotated[int, typer.Option(help="Optimiser iterations per resolution level.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the metric's random sampling.")] = 0,
) -> None:
    """Register MOVING to FIXED with Mattes mutual information and resample it onto FIXED's grid."""
    from crossdiff.readers import read_volume
    from crossdiff.registration import normalized_mutual_information, register
    from crossdiff.volumes import coverage, resample_to, write_volume

    fixed_volume, moving_volume = read_volume(fixed), read_volume(moving)
    with progress(f"registering ({transform})", total=None) as (bar, task):
        result = register(
            fixed_volume, moving_volume, transform=transform, seed=seed, iterations=iterations,
            progress=lambda step, value: bar.update(
                task, completed=step, description=f"registering ({transform}) metric {value:.4f}"
            ),
        )
    before = resample_to(moving_volume, fixed_volume)
    overlap = coverage(moving_volume, fixed_volume) & coverage(moving_volume, fixed_volume, result.transform)
    nmi_before = normalized_mutual_information(fixed_volume.array, before.array, overlap)
    nmi_after = normalized_mutual_information(fixed_volume.array, result.volume.array, overlap)
    write_volume(result.volume, out)
    if save_transform is not None:
        with atomic_path(save_transform) as tmp:
            sitk.WriteTransform(result.transform, str(tmp))
    out_console.print(f"normalised mutual information: {nmi_before:.4f} before, {nmi_after:.4f} after ({transform})")
    out_console.print(f"wrote {out}")


@app.command()
def mask(
    path: InputPath,
    out: Annotated[Path, typer.Option(help="Mask to write (NIfTI or MHA).")],
    modality: Annotated[Optional[str], typer.Option(help="CT, MR or PET when the guess is wrong.")] = None,
) -> None:
    """Compute an automatic body (foreground) mask; training and metrics reuse it."""
    from crossdiff.masks import body_mask
    from crossdiff.readers import read_volume
    from crossdiff.volumes import write_volume

    volume = read_volume(path, modality=modality.upper() if modality else None)
    result = body_mask(volume)
    write_volume(result, out)
    out_console.print(f"wrote {out}: {int(result.array.sum())} foreground voxels ({100 * result.array.mean():.1f}%)")


@app.command()
def resample(
    path: InputPath,
    reference: Annotated[Path, typer.Option(help="Image whose grid to resample onto.")],
    out: Annotated[Path, typer.Option(help="Where to write the result.")],
    interpolation: Annotated[str, typer.Option(help="linear, bspline, or nearest (for masks and labels).")] = "linear",
) -> None:
    """Resample an image onto another image's grid through physical space (no registration)."""
    from crossdiff.readers import read_mask, read_volume
    from crossdiff.volumes import resample_to, write_volume

    moving = read_mask(path) if interpolation == "nearest" else read_volume(path)
    write_volume(resample_to(moving, read_volume(reference), interpolation), out)
    out_console.print(f"wrote {out}")


@app.command()
def methods(
    model: Annotated[Optional[Path], typer.Option(help="A trained run or checkpoint: show what it translates into.")] = None,
) -> None:
    """List the translation methods this installation knows, or (--model) the targets of a trained model."""
    if model is not None:
        _describe_model(model)
        return
    names = available_methods()
    if not names:
        out_console.print("No translation method is available in this version yet.")
        return
    table = Table(title="methods")
    table.add_column("name")
    table.add_column("description")
    for method_name, description in names.items():
        table.add_row(method_name, description)
    out_console.print(table)


def _describe_model(model: Path) -> None:
    """Method, source and every target (with its units) of a checkpoint, read from its config.yaml alone."""
    from crossdiff import checkpoints
    from crossdiff.inference import ModelSpec

    folder = checkpoints.checkpoint_folder(model)
    config = checkpoints.read_config(folder)
    try:
        spec = ModelSpec.from_sections(config)
        method = config["method"]
    except (KeyError, TypeError, ValueError) as error:
        raise CrossdiffError(f"{folder}: not a crossdiff model description ({error!r})") from None
    stage = method["config"].get("stage")
    table = Table(title=f"{model}: {method['name']}{f' ({stage} stage)' if stage else ''} from {spec.source}")
    table.add_column("--target")
    table.add_column("units")
    for key in spec.targets:
        table.add_row(key + (" (default)" if key == spec.target else ""), spec.for_target(key).target_scaling.units or "")
    out_console.print(table)


TRAIN_SECTIONS = ("method", "slices", "preparation", "training")


@app.command()
def train(
    method: Annotated[str, typer.Option(help="Method name from `crossdiff methods`.")],
    manifest: Annotated[Path, typer.Option(help="Dataset manifest from `crossdiff prepare`.")],
    out: Annotated[Optional[Path], typer.Option(help="Run folder (required): checkpoints, metrics, effective config.")] = None,
    source: Annotated[str, typer.Option(help="Source modality key in the manifest (e.g. mr).")] = "mr",
    target: Annotated[str, typer.Option(help="Target modality key in the manifest (e.g. ct); cldm takes several: ct,mr.")] = "ct",
    config: Annotated[Optional[Path], typer.Option(help="YAML with sections method, slices, preparation, training.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Total training steps (overrides the config).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Slices per step and process (overrides the config).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue OUT's run from its latest checkpoint.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or auto (overrides the config).")] = None,
    stage: Annotated[Optional[str], typer.Option(help="cldm: autoencoder (stage 1) or diffusion (stage 2, the default).")] = None,
    autoencoder: Annotated[Optional[Path], typer.Option(help="cldm stage 2: the stage-1 run or checkpoint to build on.")] = None,
) -> None:
    """Train a method on the manifest's train split, validating on its val split (else test).

    Under `torchrun --nproc_per_node N -m crossdiff train ...` the N processes train data-parallel."""
    from dataclasses import replace

    from crossdiff.data.cases import PreparationConfig, prepare_cases
    from crossdiff.data.manifest import load_manifest
    from crossdiff.data.slices import PairedSliceDataset, SliceConfig, UnpairedSliceDataset
    from crossdiff.inference import ModelSpec
    from crossdiff.methods import get_method
    from crossdiff.methods.base import DataSpec
    from crossdiff.methods.cldm import AutoencoderStage, LatentDiffusion, stage_datasets
    from crossdiff.training import TrainConfig, seed_everything
    from crossdiff.training import train as run_training

    cls = get_method(method)
    if out is None:
        raise CrossdiffError("crossdiff train needs --out RUN_DIR, the folder for checkpoints and logs")
    staged = bool(cls.training_stages)  # cldm: an autoencoder, then diffusion in its latent space
    targets = _targets(cls, target, stage, autoencoder, resume)
    settings = _run_settings(out, config, resume, source, targets)
    if staged:
        settings["method"] |= {"targets": targets, **({"stage": stage} if stage else {})}
    overrides = {k: v for k, v in {"steps": steps, "batch_size": batch_size, "device": device}.items() if v is not None}
    training = TrainConfig.from_dict({**settings["training"], **overrides})
    slices = SliceConfig.from_dict(settings["slices"])
    preparation = PreparationConfig.from_dict(
        {"modalities": [source, *targets], "reference": targets[0], **settings["preparation"]}
    )
    _check_method_section(method, settings["method"], slices, autoencoder is None, config or out / "config.yaml")
    loaded = load_manifest(manifest)
    if cls.paired:
        train_ids, val_ids = _training_split(loaded, source, targets)
    else:
        source_ids, target_ids, val_ids = _unpaired_split(loaded, source, target, training.seed)
        train_ids = source_ids + target_ids
    with progress("preparing cases", total=len(train_ids) + len(val_ids)) as (bar, task):
        cases = prepare_cases(
            ((cid, loaded.cases[cid]) for cid in train_ids + val_ids), preparation, out / "cache",
            on_case=lambda _: bar.advance(task),
        )
    train_cases, val_cases = cases[: len(train_ids)], cases[len(train_ids) :]
    if staged:
        train_set, val_set = stage_datasets(settings["method"], train_cases, val_cases, source, slices)
        spec = ModelSpec.from_cases(train_cases, source, targets, slices, preparation)
    else:
        if cls.paired:
            train_set = PairedSliceDataset(train_cases, source, target, slices, augment=True)
            spec = ModelSpec.from_cases(train_cases, source, target, slices, preparation)
        else:  # each side's scaling from its own cases; the source cases describe the grid inference works on
            source_cases, target_cases = train_cases[: len(source_ids)], train_cases[len(source_ids) :]
            train_set = UnpairedSliceDataset(source_cases, target_cases, source, target, slices, augment=True)
            target_scaling = ModelSpec.from_cases(target_cases, target, target, slices, preparation).target_scaling
            spec = replace(ModelSpec.from_cases(source_cases, source, source, slices, preparation),
                           target=target, target_scaling=target_scaling)
        val_set = PairedSliceDataset(val_cases, source, target, slices) if val_cases else None
    seed_everything(training.seed)
    data = DataSpec(slices.channels, 1, slices.size)
    if autoencoder is not None:
        model = LatentDiffusion.from_autoencoder(autoencoder, settings["method"], data, train_set)
    else:
        model = cls(settings["method"], data)
    validation = f"validating on {len(val_set)} slices of {len(val_cases)}" if val_set else "no validation cases"
    err_console.print(f"training {method} on {len(train_set)} slices of {len(train_cases)} cases, {validation}")
    result = run_training(model, train_set, val_set, training, out, resume=resume, extra_config=spec.to_sections())
    out_console.print(f"step {result.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.losses.items()))
    if result.validation:
        last = result.validation[-1]
        out_console.print("validation: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "step"))
    out_console.print(f"checkpoint: {result.checkpoint}", soft_wrap=True, highlight=False)
    if isinstance(model, AutoencoderStage):
        _report_reconstruction(result.checkpoint, val_cases or train_cases, targets, slices, out)


def _check_method_section(method: str, section: dict, slices: SliceConfig, build: bool, source: Path) -> None:
    """The method section typed and (unless it is completed later, as cldm's new diffusion stage) built on
    the meta device, before any case is prepared; its errors name the config file they came from."""
    from crossdiff.config_schema import check_method_settings
    from crossdiff.methods.base import DataSpec

    try:
        check_method_settings(method, section, DataSpec(slices.channels, 1, slices.size), build=build)
    except InputError:
        raise
    except CrossdiffError as error:
        raise InputError(source, str(error)) from None


def _targets(cls: type, target: str, stage: str | None, autoencoder: Path | None, resume: bool) -> list[str]:
    """--target as a list: several keys (comma-separated) only for a multi-target method (cldm). Also
    refuses, before any case is prepared, stage options that do not fit: only cldm has stages, and only
    its new diffusion stage an --autoencoder (a resumed run keeps its own)."""
    targets = [key.strip() for key in target.split(",") if key.strip()]
    if not cls.multi_target and len(targets) != 1:
        raise CrossdiffError(f"{cls.name} translates to one target, not {target!r}; cldm makes several (--target ct,mr)")
    if not cls.training_stages and (stage is not None or autoencoder is not None):
        raise CrossdiffError("--stage and --autoencoder are cldm's (latent diffusion) options")
    new_diffusion = bool(cls.training_stages) and stage != "autoencoder" and not resume
    if (autoencoder is not None) != new_diffusion:
        raise CrossdiffError("cldm's diffusion stage starts from a trained autoencoder: pass --autoencoder RUN to a new "
                             "diffusion run, and only there (`--stage autoencoder` trains one)")
    return targets


def _report_reconstruction(
    checkpoint: Path | None, cases: list[PreparedCase], targets: list[str], slices: SliceConfig, out: Path
) -> None:
    """Score a trained cldm autoencoder per modality on `cases`; print the table, write RUN/reconstruction.json."""
    from crossdiff.atomic import write_json
    from crossdiff.data.slices import MultiTargetSliceDataset
    from crossdiff.inference import load_method
    from crossdiff.methods.cldm import reconstruction_quality

    method = load_method(checkpoint or out)[0]
    scores = reconstruction_quality(method.reconstruct, MultiTargetSliceDataset(cases, None, targets, slices))
    write_json(out / "reconstruction.json", {"cases": [case.case_id for case in cases], "scores": scores})
    table = Table(title=f"reconstruction on {', '.join(case.case_id for case in cases)} ([-1, 1] scale)")
    for column in ("modality", "MAE (mask)", "PSNR dB (mask)", "SSIM"):
        table.add_column(column)
    for code, values in scores.items():
        table.add_row(code, f"{values['mae']:.4f}", f"{values['psnr']:.2f}", f"{values['ssim']:.3f}")
    out_console.print(table)


def _run_settings(out: Path, config: Path | None, resume: bool, source: str, targets: list[str]) -> dict[str, dict]:
    """The sections of a new run's YAML, or the saved settings of the run being resumed."""
    from crossdiff.config_schema import mapping, read_yaml
    from crossdiff.data.cases import PreparationConfig
    from crossdiff.data.slices import SliceConfig
    from crossdiff.training import RUN_CONFIG, TrainConfig

    if resume:
        if config is not None:
            raise CrossdiffError("--resume continues with the run's saved settings; leave out --config")
        saved_file = out / RUN_CONFIG
        if not saved_file.is_file():
            raise CrossdiffError(f"{out}: nothing to resume ({RUN_CONFIG} is missing)")
        saved = mapping(saved_file, read_yaml(saved_file, "run configuration"), "run configuration")
        try:
            model = saved["model"]
            made = [model["target"], *model.get("other_targets", {})]
            sections = {"method": dict(saved["method"]["config"]), **{key: dict(saved[key]) for key in TRAIN_SECTIONS[1:]}}
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(saved_file, f"is not a crossdiff run configuration (missing or malformed {error})") from None
        if (model["source"], made) != (source, targets):
            raise CrossdiffError(f"{out} translates {model['source']} to {','.join(made)}, not {source} to {','.join(targets)}")
        return sections
    if config is None:
        return {section: {} for section in TRAIN_SECTIONS}
    loaded = mapping(config, read_yaml(config, "config"), "config")
    unknown = sorted(set(loaded) - set(TRAIN_SECTIONS))
    if unknown:
        raise CrossdiffError(f"{config}: unknown section(s) {', '.join(unknown)}; use {', '.join(TRAIN_SECTIONS)}")
    sections = {section: dict(mapping(config, loaded.get(section), f"section {section!r}")) for section in TRAIN_SECTIONS}
    try:  # checked here too (train builds them again with the command's overrides), so errors name the file
        TrainConfig.from_dict(sections["training"])
        SliceConfig.from_dict(sections["slices"])
        PreparationConfig.from_dict({"modalities": [source, *targets], "reference": targets[0], **sections["preparation"]})
    except CrossdiffError as error:
        raise InputError(config, str(error)) from None
    return sections


def _training_split(manifest: Manifest, source: str, targets: list[str]) -> tuple[list[str], list[str]]:
    """Cases holding the source and a target (with several targets, each is learnt from the cases that
    have it): the train split, and val (else test) for validation."""
    paired = {cid for target in targets for cid in manifest.cases_with(source, target)}
    split = {name: [cid for cid in manifest.split_cases(name) if cid in paired] for name in ("train", "val", "test")}
    if not split["train"]:
        raise CrossdiffError(f"the manifest has no training case with both {source} and {' or '.join(targets)}")
    return split["train"], split["val"] or split["test"]


def _unpaired_split(manifest: Manifest, source: str, target: str, seed: int) -> tuple[list[str], list[str], list[str]]:
    """Training cases of an unpaired method: source slices from some cases, target slices from OTHER cases.

    A training case holding only one of the two modalities gives that one. Cases holding both are
    shuffled by `seed` and halved: the first half (rounded up) gives source slices, the rest target
    slices, so no case is seen from both sides. Validation uses val (else test) cases holding both."""
    train, paired = manifest.split_cases("train"), set(manifest.cases_with(source, target))
    both = [str(cid) for cid in np.random.default_rng(seed).permutation(sorted(c for c in train if c in paired))]
    half = (len(both) + 1) // 2
    sources = both[:half] + [cid for cid in train if cid not in paired and source in manifest.cases[cid].images]
    targets = both[half:] + [cid for cid in train if cid not in paired and target in manifest.cases[cid].images]
    if not sources or not targets:
        raise CrossdiffError(f"unpaired training needs {source} images of some training cases and {target} images of "
                             f"other training cases; the manifest's train split gives {len(sources)} and {len(targets)} "
                             "(cases holding both are split in two halves)")
    held = {name: [cid for cid in manifest.split_cases(name) if cid in paired] for name in ("val", "test")}
    return sources, targets, held["val"] or held["test"]


@app.command()
def translate(
    model: Annotated[Path, typer.Option(help="Checkpoint folder, its run folder, or checkpoints/latest.")],
    input: Annotated[Path, typer.Option(help="Source image (file or DICOM folder).")],
    output: Annotated[Path, typer.Option(help="Translated image to write (NIfTI, MHA, NRRD).")],
    uncertainty: Annotated[Optional[Path], typer.Option(help="Also write the per-voxel std of the draws (stochastic).")] = None,
    samples: Annotated[int, typer.Option(help="Monte-Carlo draws of a stochastic method; the output is their mean.")] = 1,
    sampler: Annotated[Optional[str], typer.Option(help="Sampler of a diffusion method (method option 'sampler').")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps of a diffusion method (method option 'steps').")] = None,
    option: Annotated[Optional[list[str]], typer.Option(help="Another method option KEY=VALUE (YAML value); repeatable.")] = None,
    mask: Annotated[Optional[Path], typer.Option(help="Body mask on the input grid; outside it is background.")] = None,
    match_spacing: Annotated[bool, typer.Option("--match-spacing", help="Work at the training in-plane spacing.")] = False,
    batch_size: Annotated[int, typer.Option(help="Slices per network call.")] = 8,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or auto.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random draws: the same seed gives the same output.")] = 0,
    target: Annotated[Optional[str], typer.Option(help="Target of a multi-target model (`methods --model`).")] = None,
) -> None:
    """Translate a volume with a trained model; the output has the input's exact geometry."""
    from crossdiff.data.cases import family_of
    from crossdiff.inference import load_model, translate_volume
    from crossdiff.readers import read_mask, read_volume
    from crossdiff.volumes import write_volume

    options = dict(_option(item) for item in option or [])
    options |= {k: v for k, v in (("sampler", sampler), ("steps", steps)) if v is not None}
    loaded = load_model(model, device)
    loaded.spec.for_target(target)  # an unknown target fails here, before the input is read
    if uncertainty is not None and not loaded.method.stochastic:
        raise CrossdiffError(f"{loaded.method.name} is deterministic: it has no spread to write; leave out --uncertainty")
    if uncertainty is not None and samples < 2:
        raise CrossdiffError("--uncertainty needs at least two draws: add --samples N (N >= 2)")
    volume = read_volume(input, modality=family_of(loaded.spec.source))
    body = read_mask(mask, volume) if mask is not None else None
    with progress(f"translating {input.name}") as (bar, task):
        result = translate_volume(
            loaded, volume, samples=samples, options=options, mask=body, batch_size=batch_size, seed=seed,
            match_spacing=match_spacing, progress=lambda done, total: bar.update(task, completed=done, total=total),
            target=target,
        )
    write_volume(result.mean, output)
    summary = f"{loaded.method.name}, {result.nfe} network evaluations per draw, {samples} draw(s)"
    out_console.print(f"wrote {output} ({summary})", soft_wrap=True, highlight=False)
    if uncertainty is not None and result.std is not None:
        write_volume(result.std, uncertainty)
        out_console.print(f"wrote {uncertainty}", soft_wrap=True, highlight=False)


@app.command()
def export(
    model: Annotated[Path, typer.Option(help="Checkpoint folder, its run folder, or checkpoints/latest.")],
    out: Annotated[Path, typer.Option(help="Folder to write: config.yaml and model.safetensors (EMA weights).")],
    record: Annotated[Optional[Path], typer.Option(help="JSON training record to ship beside the weights.")] = None,
) -> None:
    """Write a trained model without its training state, to share or ship; `translate --model` reads it."""
    from crossdiff.checkpoints import export_checkpoint
    from crossdiff.config_schema import read_json

    details = read_json(record, "training record") if record is not None else None
    export_checkpoint(model, out, details)
    out_console.print(f"wrote {out}", soft_wrap=True, highlight=False)


def _option(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as YAML, so numbers and booleans arrive typed (eta=0.5, clip=false)."""
    from crossdiff.config_schema import parse_option

    return parse_option(text)


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Option(help="Synthetic image, folder of images, or manifest.")],
    ref: Annotated[Path, typer.Option(help="Reference image, folder of images (matched by file name), or manifest.")],
    mask: Annotated[Optional[Path], typer.Option(help="Body mask, or folder of masks named like the references.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for metrics.csv, slices.csv, summary.csv and summary.json.")] = None,
    metrics: Annotated[str, typer.Option(help="synthrad2023 (SSIM) or synthrad2025 (masked MS-SSIM).")] = "synthrad2023",
    modality: Annotated[str, typer.Option(help="auto, ct (HU) or mr (normalised [0, 1] scale).")] = "auto",
    key: Annotated[str, typer.Option(help="Modality key of the images in a manifest.")] = "ct",
    split: Annotated[Optional[str], typer.Option(help="Only this split of a manifest (train, val, test).")] = None,
) -> None:
    """Score synthetic images against references: MAE, ME, PSNR, SSIM / MS-SSIM, MAE per tissue class."""
    from crossdiff.atomic import check_writable
    from crossdiff.evaluation.console import evaluation_table
    from crossdiff.evaluation.evaluate import evaluate_cases, write_evaluation
    from crossdiff.evaluation.pairing import pair_inputs

    if out is not None:
        check_writable(out)  # before the scoring, not after it
    pairing = pair_inputs(pred, ref, mask, key=key.lower(), split=split)
    with progress("scoring", total=len(pairing.cases)) as (bar, task):
        evaluation = evaluate_cases(
            pairing.cases, metrics.lower(), modality.lower(),
            progress=lambda name: bar.update(task, description=f"scored {name}", advance=1),
        )
    out_console.print(evaluation_table(evaluation))
    if pairing.unmatched_references:
        out_console.print(f"{len(pairing.unmatched_references)} reference(s) without a prediction were skipped")
    for file in write_evaluation(evaluation, out) if out is not None else []:
        out_console.print(f"wrote {file}", soft_wrap=True, highlight=False)


@app.command()
def benchmark(
    config: Annotated[Path, typer.Option(help="Benchmark YAML (see benchmarks/configs/).")],
    quick: Annotated[bool, typer.Option("--quick", help="Apply the config's 'quick' overrides (a run of minutes).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Results folder (default: benchmark-<config name>[-quick]).")] = None,
) -> None:
    """Train every listed method on one split with one budget, translate the held-out cases, score and report.

    Run it again after an interruption: finished training runs and translations are reused."""
    from crossdiff.evaluation.benchmark import run_benchmarks
    from crossdiff.evaluation.benchmark_config import load_benchmark_config
    from crossdiff.evaluation.benchmark_report import write_benchmark_report
    from crossdiff.evaluation.console import benchmark_table

    settings = load_benchmark_config(config, quick=quick)
    out = out or Path(f"benchmark-{config.stem}{'-quick' if quick else ''}")
    results = run_benchmarks(settings, out, log=lambda text: err_console.print(text, highlight=False, soft_wrap=True))
    for result in results:
        files = write_benchmark_report(result)
        out_console.print(benchmark_table(result))
        out_console.print(f"wrote {len(files)} files; the report: {result.out / 'report.html'}", soft_wrap=True, highlight=False)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the results (replaced as a whole on success).")] = Path("crossdiff-demo"),
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "cpu",
    samples: Annotated[int, typer.Option(help="Monte-Carlo draws: their mean is the sCT, their spread the uncertainty.")] = 8,
    steps: Annotated[Optional[int], typer.Option(help="Sampler steps per draw (default: the model's).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
) -> None:
    """The built-in default: the bundled patient's MR -> synthetic CT + uncertainty map, scored against its real CT."""
    from crossdiff.demo import run_demo

    with progress("demo: MR -> synthetic CT of the bundled patient STS_003") as (bar, task):
        result = run_demo(out, device=device, samples=samples, steps=steps, seed=seed,
                          progress=lambda done, total: bar.update(task, completed=done, total=total))
    metrics = result.metrics
    out_console.print(
        f"synthetic CT from {result.samples} draw(s) x {result.nfe} network evaluations: MAE {metrics['mae']:.1f} HU, "
        f"PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.3f} against the real CT; uncertainty-error "
        f"Spearman {result.spearman:.3f} ({result.seconds:.1f} s)"
    )
    for file in result.files:
        out_console.print(f"  {out / file}", soft_wrap=True, highlight=False)
    out_console.print(f"[bold]demo output written to {out.resolve()}[/]", soft_wrap=True)


@app.callback(invoke_without_command=True)
def _root(
    context: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        out_console.print(f"crossdiff {__version__}")
        raise typer.Exit()
    if context.invoked_subcommand is None:
        out_console.print(context.get_help())
        raise typer.Exit()
