"""Choose the demo model's settings on the training patients only: train each candidate config on sarcoma
STS_001, score it on STS_002 as the demo scores STS_003 (the real CT rigidly registered onto the MR,
inside both bodies: MAE, bone MAE, Spearman of the draws' spread with the error), and rank them.

STS_003, the bundled demo patient, is never seen here: the shipped model is then trained on STS_001 and
STS_002 with the chosen config (benchmarks/train_demo_model.py) and measured on STS_003 once
(benchmarks/demo.py).

Run:  python benchmarks/demo_selection.py [--candidates cddpm=demo-model.yaml bridge=demo-bridge.yaml ...] [--steps 2000]
Writes benchmarks/results/demo-selection.md and .json; runs in benchmarks/runs/demo-selection/ (resumable).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml
from train_demo_model import DEMO_CONFIGS

from crossdiff.atomic import write_json, write_text
from crossdiff.data.layouts import scan
from crossdiff.data.manifest import save_manifest
from crossdiff.demo import DEFAULT_SAMPLES, scoring_reference
from crossdiff.evaluation.metrics import case_metrics
from crossdiff.evaluation.variability import uncertainty_error_correlation
from crossdiff.inference import load_model, translate_volume
from crossdiff.masks import body_mask
from crossdiff.methods import get_method
from crossdiff.provenance import describe_code_version
from crossdiff.readers import read_volume
from crossdiff.train_command import train_with_command

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "sarcoma-ct-mr-pet"
CONFIGS = REPO / "benchmarks" / "configs"
TRAIN, VALIDATE = "STS_001", "STS_002"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", nargs="+",  # the demo reports uncertainty: the stochastic methods only
                        default=[f"{m}={c}" for m, c in DEMO_CONFIGS.items() if get_method(m).stochastic],
                        help="METHOD=CONFIG (a file in benchmarks/configs) per candidate")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    runs = REPO / "benchmarks" / "runs" / "demo-selection"
    manifest = scan(DATA, layout="modality-folders")
    for case_id, entry in manifest.cases.items():
        entry.split = "train" if case_id == TRAIN else "val" if case_id == VALIDATE else "test"
    runs.mkdir(parents=True, exist_ok=True)
    save_manifest(manifest, runs / "manifest.json")
    rows = [_candidate(name, args.steps, runs) for name in args.candidates]
    rows.sort(key=lambda row: row["mae"])
    write_json(args.out / "demo-selection.json", {"train": TRAIN, "validate": VALIDATE, "steps": args.steps, "rows": rows})
    write_text(args.out / "demo-selection.md", _markdown(rows, args.steps))
    print(_markdown(rows, args.steps))


def _candidate(candidate: str, steps: int, runs: Path) -> dict[str, object]:
    method, _, name = candidate.partition("=")
    settings = yaml.safe_load((CONFIGS / name).read_text())
    settings["training"] = {**settings["training"], "steps": steps}
    run_dir = runs / f"{method}-{Path(name).stem}"
    config = run_dir / "config-request.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(config, yaml.safe_dump(settings, sort_keys=False))
    if not (run_dir / "selection.json").is_file():
        train_with_command(method, runs / "manifest.json", run_dir, config, ["--source", "mr", "--target", "ct"])
        write_json(run_dir / "selection.json", _score(run_dir))
    return {"candidate": name, "method": method, **json.loads((run_dir / "selection.json").read_text())}


def _score(run_dir: Path) -> dict[str, float]:
    """The demo's scoring, on the validation patient."""
    model = load_model(run_dir, "cpu")
    mr = read_volume(DATA / VALIDATE / "MR_T1/nifti/image/image.nii.gz", modality="MR")
    ct = read_volume(DATA / VALIDATE / "CT/nifti/image/image.nii.gz", modality="CT")
    body = body_mask(mr)
    samples = DEFAULT_SAMPLES if model.method.stochastic else 1
    translation = translate_volume(model, mr, samples=samples, mask=body, seed=0)
    reference, region = scoring_reference(mr, ct, body)
    values = case_metrics(reference, translation.mean.array, region).values
    rho = float("nan")
    if translation.std is not None:
        rho = uncertainty_error_correlation(translation.std.array, translation.mean.array - reference, region).rho
        values["median_spread"] = float(np.median(translation.std.array[region]))
    values["median_abs_error"] = float(np.median(np.abs(translation.mean.array - reference)[region]))
    return {**values, "spearman": rho}


def _markdown(rows: list[dict[str, object]], steps: int) -> str:
    lines = [
        "# Demo model: settings chosen on the training patients",
        "",
        f"Each candidate trained {steps} steps on {TRAIN}, scored on {VALIDATE} as the demo scores STS_003 (real CT "
        f"rigidly registered onto the MR, inside both bodies; mean of {DEFAULT_SAMPLES} draws). STS_003 is not used. "
        f"Code: {describe_code_version()}.",
        "",
        "| candidate | method | MAE (HU) | bone MAE (HU) | PSNR | SSIM | Spearman (std, abs error) | median spread / median "
        "error (HU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        spread = f"{row.get('median_spread', float('nan')):.1f} / {row['median_abs_error']:.1f}"
        lines.append(f"| {row['candidate']} | {row['method']} | {row['mae']:.1f} | {row['mae_bone']:.0f} | {row['psnr']:.2f} | "
                     f"{row['ssim']:.3f} | {row['spearman']:.3f} | {spread} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
