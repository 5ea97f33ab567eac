"""The built-in default job: the bundled sarcoma patient's MR (STS_003) becomes a synthetic CT with an
uncertainty map, by the diffusion model shipped in the package, which never saw this patient.

The demo is what a user would do with their own scan (`crossdiff translate`), plus the check a user
cannot do without a CT: the bundled real CT, rigidly registered onto the MR, scores the result
(SynthRAD2023 metrics inside the body) and tells whether the uncertainty map points at the errors
(Spearman correlation of per-voxel spread and absolute error). Everything lands in one folder,
replaced as a whole only when every file was written.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from crossdiff.acceleration import Acceleration
from crossdiff.atomic import atomic_directory, check_writable, write_json, write_text
from crossdiff.checkpoints import RECORD_FILE
from crossdiff.config_schema import read_json
from crossdiff.data.manifest import CaseEntry
from crossdiff.errors import InputError
from crossdiff.evaluation.metrics import case_metrics
from crossdiff.evaluation.report import Section, Table, write_report
from crossdiff.evaluation.variability import calibration_table, uncertainty_error_correlation
from crossdiff.inference import load_model, translate_volume
from crossdiff.masks import body_mask
from crossdiff.preview import Panel, save_panels
from crossdiff.readers import read_volume
from crossdiff.registration import register
from crossdiff.volumes import Volume, coverage, resample_to, write_volume

SAMPLE_DIR = Path(__file__).parent / "sample"
SAMPLE_CASE = "STS_003"
SAMPLE_MODALITIES = ("ct", "mr", "pet")
MODEL_FOLDER = "model"
DEFAULT_SAMPLES = 8
WINDOW_HU = (-400.0, 600.0)
BONE_HU = 250.0


@dataclass(frozen=True)
class DemoResult:
    out: Path
    metrics: dict[str, float]
    spearman: float
    samples: int
    nfe: int
    seconds: float
    files: list[str]


def sample_entry(sample_dir: Path = SAMPLE_DIR) -> CaseEntry:
    """The bundled case, after checking every bundled file (images and model) against SHA256SUMS."""
    sums = sample_dir / "SHA256SUMS"
    if not sums.is_file():
        raise InputError(sums, "the bundled sample's checksum list is missing; reinstall crossdiff")
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        file = sample_dir / name.strip()
        if not file.is_file():
            raise InputError(file, "bundled sample file is missing; reinstall crossdiff")
        if hashlib.sha256(file.read_bytes()).hexdigest() != digest:
            raise InputError(file, "bundled sample file is damaged (checksum mismatch); reinstall crossdiff")
    return CaseEntry(images={key: sample_dir / SAMPLE_CASE / f"{key}.nii.gz" for key in SAMPLE_MODALITIES})


def scoring_reference(mr: Volume, ct: Volume, body: Volume, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The real CT rigidly registered onto the MR (HU), and where to score: where both scans see the
    body. The CT's own outline (found on its whole field of view, then carried over) removes the
    skin-edge misalignment."""
    aligned = register(mr, ct, "rigid", seed=seed)
    ct_body = resample_to(body_mask(ct), mr, "nearest", 0, transform=aligned.transform).array.astype(bool)
    return aligned.volume.array, body.array.astype(bool) & ct_body & coverage(ct, mr, aligned.transform)


def run_demo(
    out: Path,
    device: str = "cpu",
    samples: int = DEFAULT_SAMPLES,
    steps: int | None = None,
    seed: int = 0,
    sample_dir: Path = SAMPLE_DIR,
    model_dir: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int | None = None,
    acceleration: Acceleration | None = None,
) -> DemoResult:
    """Translate the bundled MR with the bundled model (`samples` Monte-Carlo draws of `steps` sampler
    steps, the model's default when None), score it against the bundled CT and write the report.
    `model_dir` replaces the bundled model (benchmarks/demo.py scores a baseline this way);
    `progress(done, total)` is called as slices are translated; `batch_size` and `acceleration` are
    translate_volume's. The summary's `timings` say where the seconds went."""
    clock = _Laps()
    acceleration = acceleration or Acceleration()
    check_writable(out)  # before minutes of work, not after
    entry = sample_entry(sample_dir)
    model_dir = sample_dir / MODEL_FOLDER if model_dir is None else Path(model_dir)
    model = load_model(model_dir, device)
    precision = acceleration.resolved(model.device)  # fp16 on a CPU fails here, before the work
    clock.lap("checksums and model")
    mr = read_volume(entry.images["mr"], modality="MR")
    body = body_mask(mr)
    clock.lap("MR and body mask")
    options = {} if steps is None else {"steps": steps}
    translation = translate_volume(model, mr, samples=samples, options=options, mask=body, seed=seed,
                                   progress=progress, batch_size=batch_size, acceleration=acceleration)
    clock.lap("translation")
    reference, region = scoring_reference(mr, read_volume(entry.images["ct"], modality="CT"), body, seed)
    clock.lap("CT registration")
    synthetic = translation.mean.array
    metrics = case_metrics(reference, synthetic, region).values
    spread = translation.std.array if translation.std is not None else np.zeros_like(synthetic)
    error = synthetic - reference
    correlation = uncertainty_error_correlation(spread, error, region) if samples > 1 else None
    clock.lap("metrics")
    record_file = model_dir / RECORD_FILE
    record = read_json(record_file, "training record") if record_file.is_file() else {}
    settings = {"case": SAMPLE_CASE, "model": str(model_dir), "method": model.method.name, "device": device,
                "samples": samples, "steps": steps or model.method.config.get("steps"), "seed": seed,
                # methods with one way to sample (bridge, syndiff) name no sampler: theirs is the method's own
                "sampler": model.method.config.get("sampler", model.method.name), "precision": precision}
    with atomic_directory(out) as folder:
        write_volume(translation.mean, folder / "sct.nii.gz")
        files = ["sct.nii.gz"]
        if translation.std is not None:
            write_volume(translation.std, folder / "uncertainty.nii.gz")
            files.append("uncertainty.nii.gz")
        clock.lap("writing volumes")
        _figure(folder / "report.png", mr, reference, synthetic, spread, region)
        clock.lap("figure")
        seconds = clock.total()
        summary = {
            **settings,
            "nfe_per_draw": translation.nfe,
            "metrics": metrics,
            "spearman_uncertainty_error": None if correlation is None else asdict(correlation),
            "seconds": seconds,
            "timings": clock.seconds,
            "machine": platform.machine(),
            "training_record": record,
        }
        write_json(folder / "summary.json", summary)
        write_text(folder / "config.yaml", yaml.safe_dump(settings, sort_keys=False))
        _report(folder, summary, spread, error, region)
        files += ["report.png", "report.html", "report.md", "summary.json", "config.yaml"]
    spearman = float("nan") if correlation is None else correlation.rho
    return DemoResult(Path(out), metrics, spearman, samples, translation.nfe, seconds, files)


class _Laps:
    """Seconds per stage of the demo, for summary.json's `timings` (benchmarks/speed.py reports them)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start


def _figure(path: Path, mr: Volume, reference: np.ndarray, synthetic: np.ndarray, spread: np.ndarray,
            region: np.ndarray) -> None:
    """MR | sCT | real CT | |error| | uncertainty on the axial slice with the most bone in the region."""
    z = int(np.argmax(((reference > BONE_HU) & region).sum(axis=(1, 2))))
    low, high = np.percentile(mr.array[z], [1, 99])
    error = np.where(region[z], np.abs(synthetic[z] - reference[z]), np.nan)
    panels = [
        Panel("MR T1 (input)", mr.array[z], float(low), float(high)),
        Panel("synthetic CT (HU)", synthetic[z], *WINDOW_HU),
        Panel("real CT, registered (HU)", reference[z], *WINDOW_HU),
        Panel("|error| (HU)", error, 0.0, 300.0, "magma"),
        Panel("uncertainty: std of draws (HU)", spread[z], 0.0, max(float(np.percentile(spread[region], 99)), 1.0), "viridis"),
    ]
    spacing = mr.geometry.spacing
    title = f"{SAMPLE_CASE}, axial slice {z}: error and uncertainty inside the body where the CT has data"
    save_panels(panels, path, title=title, aspect=spacing[1] / spacing[0])


def _report(folder: Path, summary: dict[str, Any], spread: np.ndarray, error: np.ndarray, region: np.ndarray) -> None:
    model = summary["training_record"]
    metrics = Table.from_records(
        [{"metric": name, "value": value} for name, value in summary["metrics"].items()],
        caption="SynthRAD2023 metrics of the sCT (mean of the draws) against the registered real CT, inside the body (HU)",
    )
    run = Table.from_records([
        {"setting": "draws", "value": summary["samples"]},
        {"setting": "sampler", "value": f"{summary['sampler']}, {summary['steps']} steps"},
        {"setting": "network evaluations per draw", "value": summary["nfe_per_draw"]},
        {"setting": "seconds (whole demo)", "value": round(summary["seconds"], 1)},
    ])
    sections = [Section("Result", "", [metrics, run], [(folder / "report.png", "MR | sCT | real CT | |error| | uncertainty")])]
    correlation = summary["spearman_uncertainty_error"]
    if correlation is not None:
        bins = calibration_table(spread, error, region)
        text = (f"Spearman correlation of the per-voxel spread of the draws with the absolute error: "
                f"rho = {correlation['rho']:.3f} over {correlation['voxels']} voxels. Voxels binned by predicted spread:")
        calibration = Table.from_records([asdict(b) for b in bins])
        sections.append(Section("Does the uncertainty point at the errors?", text, [calibration]))
    trained = Table.from_records([{"item": key, "value": json.dumps(value) if isinstance(value, (dict, list)) else value}
                                  for key, value in model.items()])
    sections.append(Section("The model", "How the bundled model was trained (training-record.json).", [trained]))
    intro = (f"The bundled MR of sarcoma patient {SAMPLE_CASE} translated into a synthetic CT by the bundled "
             f"{summary['method']} model, which was trained on other patients only.")
    write_report(folder, "crossdiff demo: MR to synthetic CT", sections, intro)
