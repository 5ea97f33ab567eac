"""The `crossdiff` command: one sub-command per job, each a thin layer over the Python API.

User errors (CrossdiffError) become one red line on stderr and exit code 1; no traceback.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

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
from crossdiff.study.cli import study_app

SAMPLER_NAMES = ("ddpm", "ddim", "em", "pc", "ode")  # crossdiff.diffusion.samplers; the CLI names them for --help
BATCH_HELP = "(slice, draw) items per network batch (default: chosen for the device; the result does not depend on it)."
PRECISION_HELP = "Network arithmetic: auto (bf16 on CUDA, fp32 on the CPU), fp32, bf16 or fp16 (GPU)."
COMPILE_HELP = "torch.compile the networks (CUDA graphs on a GPU); pays off for large volumes."

if TYPE_CHECKING:
    from crossdiff.acceleration import Acceleration
    from crossdiff.data.cases import PreparedCase
    from crossdiff.data.manifest import Manifest
    from crossdiff.data.slices import SliceConfig
    from crossdiff.dicom_output import DicomOutput, DicomRequest
    from crossdiff.inference import LoadedModel, ModelSpec, VolumeTranslation
    from crossdiff.intensity import IntensityScaling
    from crossdiff.methods.base import DataSpec
    from crossdiff.volumes import Volume

app = typer.Typer(
    name="crossdiff",
    help="Translate one medical imaging modality into another (MR->CT, MR contrasts, PET->CT/MR).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(study_app, name="study")
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


_SHOWN_WARNINGS: set[str] = set()  # what an InputWarning already said, so `info` does not say it twice


def _show_warning(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
    if issubclass(category, InputWarning):
        _SHOWN_WARNINGS.add(getattr(message, "problem", str(message)))
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
    modality: Annotated[Optional[str], typer.Option(help="CT, MR or PET, when the guess is wrong.")] = None,
    units: Annotated[Optional[str], typer.Option(help="The image's units when crossdiff's decision is wrong (HU, display, "
                                                      "a.u., SUVbw).")] = None,
    colour: Annotated[str, typer.Option(help="Colour images: refuse, or luminance.")] = "refuse",
    key: Annotated[Optional[str], typer.Option(help="Variable of a .npz/.mat file holding several arrays.")] = None,
) -> None:
    """Show size, spacing, orientation, intensities, and the modality and units crossdiff decided (with why)."""
    from crossdiff.readers import read_volume

    volume = read_volume(path, modality=modality, series_uid=series, units=units, colour=colour, key=key)
    geometry = volume.geometry
    array = volume.array
    table = Table(title=str(path), show_header=False)
    rows = {
        "size (x, y, z)": " x ".join(map(str, geometry.size)),
        "spacing (mm)": ", ".join(f"{s:.4g}" for s in geometry.spacing),
        "origin (mm, LPS)": ", ".join(f"{o:.4g}" for o in geometry.origin),
        "orientation": geometry.describe_orientation(),
        "data type": str(array.dtype),
        "intensity min / max": f"{array.min():.6g} / {array.max():.6g}",
        "percentiles 1 / 50 / 99": " / ".join(f"{v:.6g}" for v in np.percentile(array, [1, 50, 99])),
        "modality": f"{volume.modality or 'unknown'}: {volume.evidence.get('modality', '')}",
        "units": f"{volume.units or 'unknown'}: {volume.evidence.get('units', '')}",
        **{name: text for name, text in volume.evidence.items() if name not in ("modality", "units", "first file")},
    }
    for name, value in rows.items():
        table.add_row(name, value)
    out_console.print(table)
    for warning in (w for w in volume.warnings if w not in _SHOWN_WARNINGS):
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)


@app.command()
def prepare(
    root: Annotated[
        Path, typer.Argument(help="Dataset folder (see the README's Datasets table for the layouts recognised).")
    ],
    out: Annotated[Path, typer.Option(help="Manifest to write (.json or .csv).")] = Path("manifest.json"),
    layout: Annotated[Optional[str], typer.Option(help="Force a layout instead of detecting it.")] = None,
    prefer: Annotated[str, typer.Option(help="nifti or dicom, where a case has both.")] = "nifti",
    val: Annotated[float, typer.Option(help="Fraction of cases for validation (carved from training cases where folders fix "
                                            "the splits).")] = 0.0,
    test: Annotated[float, typer.Option(help="Fraction of cases held out for testing.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the case split.")] = 0,
    name: Annotated[Optional[list[str]], typer.Option(help="Rename a modality key, e.g. --name a=mr --name b=ct.")] = None,
    case_pattern: Annotated[Optional[str], typer.Option(help="Regex finding the case (patient) in a slice file name: group "
                                                             "'case', else group 1.")] = None,
    units: Annotated[Optional[list[str]], typer.Option(help="Set a modality's units instead of crossdiff's decision, e.g. "
                                                            "--units ct=display.")] = None,
) -> None:
    """Recognise a dataset's layout and write its manifest (cases, modalities, units, split by case)."""
    from crossdiff.data.layouts import prepare_dataset

    names = {old: new.lower() for old, new in (_key_value(item, "--name") for item in name or [])}
    given_units = dict(_key_value(item, "--units") for item in units or [])
    prepared = prepare_dataset(root, out, layout=layout, prefer=prefer, val=val, test=test, seed=seed, names=names,
                                case_pattern=case_pattern, units=given_units)
    manifest = prepared.manifest
    out_console.print(f"layout: {prepared.layout}", highlight=False)
    table = Table(title=f"{out}: {len(manifest.cases)} cases")
    table.add_column("split")
    table.add_column("cases", justify="right")
    for split in ("train", "val", "test"):
        table.add_row(split, str(len(manifest.split_cases(split))))
    out_console.print(table)
    units_table = Table(title="how each modality is read (change it in the manifest's \"modalities\" or with --units)")
    for column in ("key", "family", "units", "why"):
        units_table.add_column(column)
    for key, decision in prepared.decisions.items():
        units_table.add_row(key, decision.family or "?", decision.reading.units or "?", decision.reading.why or "")
    out_console.print(units_table)
    for note in prepared.notes:
        err_console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    for key, decision in prepared.decisions.items():
        if decision.warning:
            err_console.print(f"[yellow]warning:[/] {key}: {decision.reading.why}", highlight=False, soft_wrap=True)


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


def _key_value(text: str, option: str) -> tuple[str, str]:
    if "=" not in text:
        raise CrossdiffError(f"{option} expects KEY=VALUE, got {text!r}")
    old, new = text.split("=", 1)
    return old.strip().lower(), new.strip()


@app.command(name="register")
def register_command(
    fixed: Annotated[Path, typer.Option(help="Image whose grid the result is on (e.g. the CT).")],
    moving: Annotated[Path, typer.Option(help="Image to move (e.g. the MR).")],
    out: Annotated[Path, typer.Option(help="Moving image resampled onto the fixed grid; OUT.registration.json beside it.")],
    transform: Annotated[str, typer.Option(help="rigid, affine or bspline.")] = "rigid",
    save_transform: Annotated[Optional[Path], typer.Option(help="Also write the transform (.tfm).")] = None,
    iterations: Annotated[int, typer.Option(help="Optimiser iterations per resolution level.")] = 200,
    seed: Annotated[int, typer.Option(help="Seed of the metric's random sampling.")] = 0,
    init: Annotated[str, typer.Option(help="Start: identity (shared frame of reference) or moments (centres of "
                                           "mass).")] = "identity",
    keep_worse: Annotated[bool, typer.Option("--keep-worse", metavar="", help="Keep a registration that lowers NMI.")] = False,
) -> None:
    """Register MOVING to FIXED with Mattes mutual information and resample it onto FIXED's grid.

    A registration that lowers normalised mutual information is not kept (the scanner geometry's resampling
    is written instead, with a warning) unless --keep-worse; the sidecar JSON records both values."""
    from crossdiff.atomic import write_json
    from crossdiff.readers import read_volume
    from crossdiff.registration import register_checked
    from crossdiff.volumes import write_volume

    fixed_volume, moving_volume = read_volume(fixed), read_volume(moving)
    with progress(f"registering ({transform})", total=None) as (bar, task):
        checked = register_checked(
            fixed_volume, moving_volume, transform=transform, seed=seed, iterations=iterations, init=init,
            keep_worse=keep_worse, progress=lambda step, value: bar.update(
                task, completed=step, description=f"registering ({transform}) metric {value:.4f}"
            ),
        )
    if save_transform is not None and checked.transform is not None:
        with atomic_path(save_transform) as tmp:
            sitk.WriteTransform(checked.transform, str(tmp))
    write_volume(checked.volume, out)
    sidecar = out.with_name(out.name.removesuffix(".gz").rsplit(".", 1)[0] + ".registration.json")
    write_json(sidecar, {"fixed": str(fixed), "moving": str(moving), "transform": transform, "init": init,
                         "nmi_before": checked.nmi_before, "nmi_after": checked.nmi_after, "kept": checked.kept})
    out_console.print(f"normalised mutual information: {checked.nmi_before:.4f} before, {checked.nmi_after:.4f} after "
                      f"({transform})")
    if not checked.kept:
        err_console.print(f"[yellow]warning:[/] {checked.describe('the registration')}", highlight=False, soft_wrap=True)
    out_console.print(f"wrote {out} and {sidecar.name}")


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
    from crossdiff.readers import read_labels, read_volume
    from crossdiff.volumes import resample_to, write_volume

    moving = read_labels(path) if interpolation == "nearest" else read_volume(path)  # labels keep their values
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
    out: Annotated[Path, typer.Option(help="Run folder: checkpoints, metrics, effective config.")],
    source: Annotated[str, typer.Option(help="Source modality key in the manifest (e.g. mr).")] = "mr",
    target: Annotated[str, typer.Option(help="Target modality key in the manifest (e.g. ct); cldm takes several: ct,mr.")] = "ct",
    config: Annotated[Optional[Path], typer.Option(help="YAML with sections method, slices, preparation, training.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Total training steps (overrides the config).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Slices per step and process (overrides the config).")] = None,
    resume: Annotated[bool, typer.Option("--resume", metavar="", help="Continue OUT's run from its latest checkpoint.")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or auto (overrides the config).")] = None,
    stage: Annotated[Optional[str], typer.Option(help="cldm: autoencoder (stage 1) or diffusion (stage 2, the default).")] = None,
    autoencoder: Annotated[Optional[Path], typer.Option(help="cldm stage 2: the stage-1 run or checkpoint to build on.")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="Folder of prepared cases to share between runs (default: "
                                                       "RUN/cache).")] = None,
) -> None:
    """Train a method on the manifest's train split, validating on its val split (else on a training case
    carved out, or with few cases on the training cases; never on test cases).

    Under `torchrun --nproc_per_node N -m crossdiff train ...` the N processes train data-parallel."""
    from dataclasses import replace

    from crossdiff.data.cases import PreparationConfig, prepare_cases
    from crossdiff.data.manifest import load_manifest
    from crossdiff.data.slices import PairedSliceDataset, SliceConfig, UnpairedSliceDataset
    from crossdiff.inference import ModelSpec
    from crossdiff.methods import get_method
    from crossdiff.methods.cldm import AutoencoderStage, LatentDiffusion, stage_datasets
    from crossdiff.run_lock import training_lock
    from crossdiff.training import TrainConfig, seed_everything
    from crossdiff.training import train as run_training

    cls = get_method(method)
    staged = bool(cls.training_stages)  # cldm: an autoencoder, then diffusion in its latent space
    targets = _targets(cls, target, stage, autoencoder, resume)
    settings = _run_settings(out, config, resume, source, targets)
    if config is not None:
        settings["method"] = cls.with_paths_from(settings["method"], config.parent)
    if staged:
        settings["method"] |= {"targets": targets, **({"stage": stage} if stage else {})}
    overrides = {k: v for k, v in {"steps": steps, "batch_size": batch_size, "device": device}.items() if v is not None}
    training = TrainConfig.from_dict({**settings["training"], **overrides})
    slices = SliceConfig.from_dict(settings["slices"])
    preparation = PreparationConfig.from_dict(
        {"modalities": [source, *targets], "reference": targets[0], **settings["preparation"]}
    )
    data = cls.training_data(slices)  # patches when the method trains on them: checked and built on the same
    _check_method_section(method, settings["method"], data, autoencoder is None, config or out / "config.yaml")
    loaded = load_manifest(manifest)
    if cls.paired:
        train_ids, val_ids, note = _training_split(loaded, source, targets, training.seed)
    else:
        source_ids, target_ids, val_ids, note = _unpaired_split(loaded, source, target, training.seed)
        train_ids = source_ids + target_ids
    with training_lock(out):  # one trainer per run folder, taken before any case is prepared
        err_console.print(f"validation: {note}", highlight=False, soft_wrap=True)
        with progress("preparing cases", total=len(set(train_ids + val_ids))) as (bar, task):
            unique = list(dict.fromkeys(train_ids + val_ids))  # validation may run on the training cases themselves
            prepared = dict(zip(unique, prepare_cases(
                ((cid, loaded.cases[cid]) for cid in unique), preparation, cache or out / "cache",
                on_case=lambda _: bar.advance(task),
            )))
        train_cases, val_cases = [prepared[cid] for cid in train_ids], [prepared[cid] for cid in val_ids]
        if staged:
            train_set, val_set = stage_datasets(settings["method"], train_cases, val_cases, source, slices)
            spec = ModelSpec.from_cases(train_cases, source, targets, slices, preparation)
        else:
            if cls.paired:
                train_set = PairedSliceDataset(train_cases, source, target, slices, augment=True, crop=cls.patch_training)
                spec = ModelSpec.from_cases(train_cases, source, target, slices, preparation)
            else:  # each side's scaling from its own cases; the source cases describe the grid inference works on
                source_cases, target_cases = train_cases[: len(source_ids)], train_cases[len(source_ids) :]
                train_set = UnpairedSliceDataset(source_cases, target_cases, source, target, slices, augment=True)
                target_scaling = ModelSpec.from_cases(target_cases, target, target, slices, preparation).target_scaling
                spec = replace(ModelSpec.from_cases(source_cases, source, source, slices, preparation),
                               target=target, target_scaling=target_scaling)
            val_set = PairedSliceDataset(val_cases, source, target, slices) if val_cases else None
        seed_everything(training.seed)
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
            values = ", ".join(f"{k} {v:.4f}" for k, v in last.items() if k != "step")
            out_console.print(f"validation (on the [-1, 1] training scale): {values}")
        out_console.print(f"checkpoint: {result.checkpoint}", soft_wrap=True, highlight=False)
        if isinstance(model, AutoencoderStage):
            _report_reconstruction(result.checkpoint, val_cases or train_cases, targets, slices, out)


def _check_method_section(method: str, section: dict, data: DataSpec, build: bool, source: Path) -> None:
    """The method section typed and (unless it is completed later, as cldm's new diffusion stage) built on
    the meta device, before any case is prepared; its errors name the config file they came from."""
    from crossdiff.config_schema import check_method_settings

    try:
        check_method_settings(method, section, data, build=build)
    except InputError:
        raise
    except CrossdiffError as error:
        raise InputError(source, str(error)) from None


def _targets(cls: type, target: str, stage: str | None, autoencoder: Path | None, resume: bool) -> list[str]:
    """--target as a list: several keys (comma-separated) only for a multi-target method (cldm). Also
    refuses, before any case is prepared, stage options that do not fit: only cldm has stages, and only
    its new diffusion stage an --autoencoder (a resumed run keeps its own)."""
    targets = _names(target)
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


def _training_split(manifest: Manifest, source: str, targets: list[str], seed: int) -> tuple[list[str], list[str], str]:
    """Cases holding the source and a target (with several targets, each is learnt from the cases that
    have it): the training cases, the validation cases, and a note saying where validation comes from."""
    from crossdiff.data.manifest import validation_cases

    paired = {cid for target in targets for cid in manifest.cases_with(source, target)}
    split = {name: [cid for cid in manifest.split_cases(name) if cid in paired] for name in ("train", "val")}
    if not split["train"]:
        raise CrossdiffError(f"the manifest has no training case with both {source} and {' or '.join(targets)}")
    return validation_cases(split["train"], split["val"], seed)


def _unpaired_split(manifest: Manifest, source: str, target: str, seed: int) -> tuple[list[str], list[str], list[str], str]:
    """Training cases of an unpaired method: source slices from some cases, target slices from OTHER cases.

    A training case holding only one of the two modalities gives that one. Cases holding both are
    shuffled by `seed` and halved: the first half (rounded up) gives source slices, the rest target
    slices, so no case is seen from both sides. Validation uses val cases holding both; without any,
    as `validation_cases` says (a case carved out gives neither side), or none at all."""
    from crossdiff.data.manifest import validation_cases

    paired = set(manifest.cases_with(source, target))
    val = [cid for cid in manifest.split_cases("val") if cid in paired]
    train = manifest.split_cases("train")
    both_sides = [c for c in train if c in paired]
    if both_sides or val:
        carved, val, note = validation_cases(both_sides, val, seed)
    else:
        carved, note = [], f"none: no val or training case holds both {source} and {target} (test cases are never used)"
    train = [cid for cid in train if cid in carved or cid not in paired]
    both = [str(cid) for cid in np.random.default_rng(seed).permutation(sorted(c for c in train if c in paired))]
    half = (len(both) + 1) // 2
    sources = both[:half] + [cid for cid in train if cid not in paired and source in manifest.cases[cid].images]
    targets = both[half:] + [cid for cid in train if cid not in paired and target in manifest.cases[cid].images]
    if not sources or not targets:
        raise CrossdiffError(f"unpaired training needs {source} images of some training cases and {target} images of "
                             f"other training cases; the manifest's train split gives {len(sources)} and {len(targets)} "
                             "(cases holding both are split in two halves)")
    return sources, targets, val, note


@app.command()
def translate(
    model: Annotated[Path, typer.Option(help="Checkpoint folder, its run folder, or checkpoints/latest.")],
    input: Annotated[Path, typer.Option(help="Source image (file or DICOM folder).")],
    output: Annotated[Optional[Path], typer.Option(help="Translated image to write (NIfTI, MHA, NRRD, or PNG with the window "
                                                        "said).")] = None,
    output_dicom: Annotated[Optional[Path], typer.Option(help="Folder for the sCT as a DICOM CT series (+ uncertainty).")] = None,
    reference_dicom: Annotated[Optional[Path], typer.Option(
        help="MR DICOM series whose patient, study and frame of reference the DICOM output joins (default: the input).")] = None,
    patient: Annotated[Optional[list[str]], typer.Option(help="Replace the DICOM output's Patient module: KEYWORD=VALUE, "
                                                              "e.g. PatientID=123; repeatable.")] = None,
    uncertainty: Annotated[Optional[Path], typer.Option(help="Also write the per-voxel std of the draws (stochastic).")] = None,
    samples: Annotated[int, typer.Option(help="Monte-Carlo draws of a stochastic method; the output is their mean.")] = 1,
    sampler: Annotated[Optional[str], typer.Option(help=f"Sampler of a diffusion method: {', '.join(SAMPLER_NAMES)}.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps of a diffusion method (method option 'steps').")] = None,
    option: Annotated[Optional[list[str]], typer.Option(help="Another method option KEY=VALUE (YAML value); repeatable.")] = None,
    mask: Annotated[str, typer.Option(help="Body mask file on the input grid, 'auto' (the input's automatic body mask) "
                                           "or 'none' (translate everything); outside it is background.")] = "auto",
    match_spacing: Annotated[bool, typer.Option("--match-spacing", metavar="", help="Work at the training in-plane "
                                                                                    "spacing.")] = False,
    batch_size: Annotated[Optional[int], typer.Option(help=BATCH_HELP)] = None,
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
    compile: Annotated[bool, typer.Option("--compile", metavar="", help=COMPILE_HELP)] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or auto.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random draws: the same seed gives the same output.")] = 0,
    target: Annotated[Optional[str], typer.Option(help="Target of a multi-target model (`methods --model`).")] = None,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Translate even an input unlike the training data "
                                                                    "(warns).")] = False,
    units: Annotated[Optional[str], typer.Option(help="The input's units when crossdiff's decision is wrong.")] = None,
    colour: Annotated[str, typer.Option(help="Colour input images: refuse, or luminance.")] = "refuse",
    png_window: Annotated[Optional[str], typer.Option(help="LOW,HIGH mapped to grey 0-255 for PNG output (default: "
                                                            "the target's training window).")] = None,
) -> None:
    """Translate a volume with a trained model; the output has the input's exact geometry.

    The input is compared with what the model was trained on (modality, units, volume or 2-D slices):
    a mismatch is refused, or with --force only warned about."""
    from crossdiff.dicom_output import dicom_request
    from crossdiff.inference import load_model

    if output is None and output_dicom is None:
        raise CrossdiffError("give --output FILE (NIfTI, MHA, NRRD), --output-dicom DIR, or both")
    options = _method_options(option, sampler, steps)
    request = dicom_request(output_dicom, input, reference_dicom, patient or []) if output_dicom is not None else None
    acceleration = _acceleration(precision, compile)
    loaded = load_model(model, device)
    acceleration.resolved(loaded.device)  # fp16 on a CPU fails here, before the input is read
    spec = loaded.spec.for_target(target)  # an unknown target fails here, before the input is read
    if uncertainty is not None and not loaded.method.stochastic:
        raise CrossdiffError(f"{loaded.method.name} is deterministic: it has no spread to write; leave out --uncertainty")
    if uncertainty is not None and samples < 2:
        raise CrossdiffError("--uncertainty needs at least two draws: add --samples N (N >= 2)")
    window = _png_window(png_window, spec.target_scaling) if output is not None and output.name.lower().endswith(".png") else None
    volume = _translation_input(input, spec, units, colour, force)
    if request is not None:
        request.check(volume.geometry, spec.target_modality)
    body = _translation_mask(mask, volume)
    result = _translate_with_progress(
        loaded, volume, f"translating {input.name}", samples=samples, options=options, mask=body, batch_size=batch_size,
        seed=seed, match_spacing=match_spacing, target=target, acceleration=acceleration,
    )
    summary = f"{loaded.method.name}, {result.nfe} network evaluations per draw, {samples} draw(s)"
    if output is not None:
        _write_translation(result.mean, output, window, summary)
    if uncertainty is not None and result.std is not None:
        _write_translation(result.std, uncertainty, None if window is None else (0.0, window[1] - window[0]), "spread")
    if request is not None:
        _write_dicom(loaded, result, request, options, samples, seed)


def _translation_input(path: Path, spec: ModelSpec, units: str | None, colour: str, force: bool) -> Volume:
    """The input read on its own evidence, checked against the training data, then given the model's family."""
    from crossdiff.data.cases import family_of
    from crossdiff.readers import read_volume

    volume = read_volume(path, units=units, colour=colour)
    problems = spec.input_problems(volume)
    if problems and not force:
        raise CrossdiffError(f"{path}: " + "; ".join(problems) + " (pass --force to translate it anyway)")
    for problem in problems:
        err_console.print(f"[yellow]warning:[/] {path}: {problem} (--force)", highlight=False, soft_wrap=True)
    family = family_of(spec.source)
    if family is not None and volume.modality != family:
        volume = read_volume(path, modality=family, units=units, colour=colour)
    return volume


def _translation_mask(mask: str, volume: Volume) -> Volume | None:
    from crossdiff.masks import body_mask
    from crossdiff.readers import read_mask

    if mask == "none":
        return None
    if mask == "auto":
        return body_mask(volume)
    return read_mask(Path(mask), volume)


def _png_window(text: str | None, scaling: IntensityScaling) -> tuple[float, float]:
    if text is None:
        return scaling.low, scaling.high
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise CrossdiffError(f"--png-window expects LOW,HIGH (two numbers), got {text!r}") from None
    return low, high


def _write_translation(volume: Volume, path: Path, window: tuple[float, float] | None, summary: str) -> None:
    from crossdiff.volumes import write_png, write_volume

    if window is None:
        write_volume(volume, path)
        out_console.print(f"wrote {path} ({summary})", soft_wrap=True, highlight=False)
        return
    files = write_png(volume, path, window)
    mapping = f"grey = 255 x ({volume.units or 'value'} - {window[0]:g}) / ({window[1]:g} - {window[0]:g}), clipped"
    out_console.print(f"wrote {len(files)} PNG file(s) from {files[0]} ({summary}); {mapping}; PNG has no geometry",
                      soft_wrap=True, highlight=False)


def _method_options(option: list[str] | None, sampler: str | None, steps: int | None) -> dict[str, object]:
    options = dict(_option(item) for item in option or [])
    return options | {k: v for k, v in (("sampler", sampler), ("steps", steps)) if v is not None}


def _acceleration(precision: str, compile: bool) -> Acceleration:
    from crossdiff.acceleration import Acceleration

    return Acceleration(precision=precision, compile=compile)


def _translate_with_progress(loaded: LoadedModel, volume: Volume, description: str, **settings: Any) -> VolumeTranslation:
    from crossdiff.inference import translate_volume

    with progress(description) as (bar, task):
        return translate_volume(
            loaded, volume, progress=lambda done, total: bar.update(task, completed=done, total=total), **settings
        )


def _write_dicom(
    loaded: LoadedModel, result: VolumeTranslation, request: DicomRequest, options: dict, samples: int, seed: int
) -> DicomOutput:
    """Write the DICOM series of a translation and say what they are; warnings go to stderr."""
    from crossdiff.dicom_output import derivation_of, write_dicom_outputs

    written = write_dicom_outputs(result.mean, result.std, request, derivation_of(loaded, options, samples, seed))
    for note in written.warnings:
        err_console.print(f"[yellow]warning:[/] {note}", highlight=False, soft_wrap=True)
    out_console.print(f"wrote {written.folder}: sCT series {written.sct_series_uid} ({len(written.sct_files)} CT files)",
                      soft_wrap=True, highlight=False)
    if written.uncertainty_series_uid is not None:
        out_console.print(f"  uncertainty series {written.uncertainty_series_uid} (Parametric Map, not for planning)",
                          soft_wrap=True, highlight=False)
    return written


@app.command()
def pacs(
    model: Annotated[Path, typer.Option(help="Checkpoint folder, its run folder, or checkpoints/latest.")],
    study: Annotated[str, typer.Option(help="StudyInstanceUID of the study holding the MR series.")],
    out: Annotated[Path, typer.Option(help="Folder for sct.nii.gz, uncertainty.nii.gz, dicom/ and summary.json.")],
    host: Annotated[str, typer.Option(help="PACS address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="PACS DICOM port.")] = 104,
    aet: Annotated[str, typer.Option(help="The PACS's AE title (called AE).")] = "ORTHANC",
    calling_aet: Annotated[str, typer.Option(help="Our AE title, as the PACS knows us.")] = "CROSSDIFF",
    series: Annotated[Optional[str], typer.Option(help="SeriesInstanceUID when the study holds several MR series.")] = None,
    samples: Annotated[int, typer.Option(help="Monte-Carlo draws; with 2 or more an uncertainty series is stored too.")] = 1,
    sampler: Annotated[Optional[str], typer.Option(help="Sampler of a diffusion method.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Sampling steps of a diffusion method.")] = None,
    patient: Annotated[Optional[list[str]], typer.Option(help="Replace the Patient module: KEYWORD=VALUE; repeatable.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, cuda or auto.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random draws.")] = 0,
) -> None:
    """Pull a study's MR series from a PACS (C-FIND, C-GET), translate it, store the sCT and uncertainty series back (C-STORE)."""
    import tempfile

    from crossdiff.atomic import write_json
    from crossdiff.dicom_output import DicomRequest, check_ct_target, check_destination, patient_values
    from crossdiff.inference import load_model
    from crossdiff.pacs import PacsNode, pull_mr_series, store_outputs
    from crossdiff.volumes import write_volume

    node = PacsNode(host, port, aet, calling_aet)
    options = _method_options(None, sampler, steps)
    replacement = patient_values(patient) if patient else None
    check_destination(out / "dicom")
    with tempfile.TemporaryDirectory(prefix="crossdiff-pacs-") as tmp:
        source, volume = pull_mr_series(node, study, Path(tmp), series)
        out_console.print(f"retrieved MR series {source.series_uid} ({len(source.headers)} instances)", highlight=False)
        loaded = load_model(model, device)
        check_ct_target(loaded.spec.target_modality)
        result = _translate_with_progress(loaded, volume, "translating the MR series", samples=samples, options=options,
                                          seed=seed)
        files = {"sct": write_volume(result.mean, out / "sct.nii.gz")}
        if result.std is not None:
            files["uncertainty"] = write_volume(result.std, out / "uncertainty.nii.gz")
        written = _write_dicom(loaded, result, DicomRequest(out / "dicom", source, replacement), options, samples, seed)
    stored = store_outputs(node, written)
    out_console.print(f"stored on PACS {node}: " + ", ".join(f"{n} instances of series {uid}" for uid, n in stored.items()),
                      soft_wrap=True, highlight=False)
    write_json(out / "summary.json", {
        "pacs": str(node), "study": study, "mr_series": source.series_uid, "mr_instances": len(source.headers),
        "method": loaded.method.name, "model": str(loaded.folder), "samples": samples, "seed": seed, "options": options,
        "nfe_per_draw": result.nfe, "files": {key: str(path) for key, path in files.items()} | {"dicom": str(written.folder)},
        "sct_series": written.sct_series_uid, "uncertainty_series": written.uncertainty_series_uid,
        "frame_of_reference": written.frame_of_reference_uid, "stored": stored,
    })


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
    units: Annotated[Optional[str], typer.Option(help="The references' units when crossdiff's decision is wrong (HU, "
                                                      "display, a.u.).")] = None,
    planar: Annotated[bool, typer.Option("--planar", metavar="", help="SSIM per 2-D slice (automatic for PNG stacks and thin "
                                                                      "cases).")] = False,
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
            progress=lambda name: bar.update(task, description=f"scored {name}", advance=1), units=units, planar=planar,
        )
    out_console.print(evaluation_table(evaluation))
    if pairing.unmatched_references:
        out_console.print(f"{len(pairing.unmatched_references)} reference(s) without a prediction were skipped")
    for file in write_evaluation(evaluation, out) if out is not None else []:
        out_console.print(f"wrote {file}", soft_wrap=True, highlight=False)


def _names(listed: str) -> list[str]:
    """A comma-separated option's names."""
    return [name.strip() for name in listed.split(",") if name.strip()]


@app.command()
def benchmark(
    config: Annotated[Path, typer.Option(help="Benchmark YAML (see benchmarks/configs/).")],
    quick: Annotated[bool, typer.Option("--quick", metavar="", help="Apply the config's 'quick' overrides (a run of "
                                                                    "minutes).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Results folder (default: crossdiff-runs/benchmark-<config "
                                                     "name>[-quick]).")] = None,
    folds: Annotated[Optional[str], typer.Option(help="Only these folds, comma-separated (e.g. fold1,fold2): "
                                                      "parallel runs into one --out; a run without it reuses them.")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Only these method entries (their names), comma-separated; "
                                                        "as --folds, a run without it reuses their work.")] = None,
) -> None:
    """Train every listed method on one split with one budget, translate the held-out cases, score and report.

    Run it again after an interruption: finished training runs and translations are reused."""
    from crossdiff.evaluation.benchmark import run_benchmarks
    from crossdiff.evaluation.benchmark_config import load_benchmark_config
    from crossdiff.evaluation.benchmark_report import write_benchmark_report
    from crossdiff.evaluation.console import benchmark_table

    settings = load_benchmark_config(config, quick=quick)
    out = out or Path("crossdiff-runs") / f"benchmark-{config.stem}{'-quick' if quick else ''}"
    if methods:
        settings = settings.with_methods(_names(methods))
    only = _names(folds) if folds else None
    results = run_benchmarks(settings, out, log=lambda text: err_console.print(text, highlight=False, soft_wrap=True),
                             only=only)
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
    batch_size: Annotated[Optional[int], typer.Option(help=BATCH_HELP)] = None,
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
    compile: Annotated[bool, typer.Option("--compile", metavar="", help=COMPILE_HELP)] = False,
) -> None:
    """The built-in default: the bundled patient's MR -> synthetic CT + uncertainty map, scored against its real CT."""
    from crossdiff.demo import run_demo

    acceleration = _acceleration(precision, compile)
    with progress("demo: MR -> synthetic CT of the bundled patient STS_003") as (bar, task):
        result = run_demo(out, device=device, samples=samples, steps=steps, seed=seed, batch_size=batch_size,
                          acceleration=acceleration,
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
    version: Annotated[bool, typer.Option("--version", metavar="", help="Print the version and exit.")] = False,
) -> None:
    if version:
        out_console.print(f"crossdiff {__version__}")
        raise typer.Exit()
    if context.invoked_subcommand is None:
        out_console.print(context.get_help())
        raise typer.Exit()
