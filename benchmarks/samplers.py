"""Which sampler, how many steps? Quality, network evaluations and time of every sampler of one cddpm.

One conditional DDPM (MR -> CT) is trained with `crossdiff train` on two sarcoma patients and tested
on the third (STS_003 by default; `--test-case` picks another fold). The test MR, rigidly registered
onto its CT grid as in training, is translated with each sampler at 4, 10, 50, 250 and 1000 steps
(where sensible: predictor-corrector and Heun cost two network calls per step, so they stop at 250;
the adaptive RK45 ODE chooses its own steps and is run at two tolerances), then Monte-Carlo averaging
of 10 draws is compared with a single draw. Metrics follow SynthRAD2023 (crossdiff.evaluation.metrics)
on the central `--slices` slices of the test volume inside the body mask.

Run:  python benchmarks/samplers.py [--train-steps 2000] [--size 64] [--slices 16] [--out benchmarks/results]
Writes OUT/samplers.md and OUT/samplers.json; the model's run folder is kept under OUT/../runs (reused
when it already holds a finished run with the same settings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import yaml

from crossdiff.data.cases import PreparationConfig, prepare_case
from crossdiff.data.layouts import scan
from crossdiff.data.manifest import save_manifest
from crossdiff.evaluation.metrics import synthrad_metrics
from crossdiff.inference import load_model, translate_volume
from crossdiff.train_command import train_with_command
from crossdiff.volumes import Geometry, Volume

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "sarcoma-ct-mr-pet"
STEP_COUNTS = (4, 10, 50, 250, 1000)
TWO_CALLS_PER_STEP_LIMIT = 250
ODE_TOLERANCES = (1e-2, 1e-3)
MC_SETTINGS = (("ddpm", 50), ("ddim", 50))


def main() -> None:
    args = _arguments()
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = args.out.parent / "runs" / f"cddpm-{args.test_case}-{args.size}px-{args.train_steps}"
    train_seconds = _train(args, run_dir)
    model = load_model(run_dir, "cpu")
    source, reference, mask = _test_slab(args, model.spec.preparation)
    rows = [_evaluate(model, source, reference, mask, sampler, steps, 1, opts) for sampler, steps, opts in _settings()]
    rows += [_evaluate(model, source, reference, mask, s, n, draws, {}) for s, n in MC_SETTINGS for draws in (1, 10)]
    _report(args, rows, train_seconds, run_dir, int(mask.sum()))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--test-case", default="STS_003")
    parser.add_argument("--train-steps", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return parser.parse_args()


def _settings() -> list[tuple[str, int, dict]]:
    """(sampler, steps, options) to run once each."""
    settings: list[tuple[str, int, dict]] = []
    for steps in STEP_COUNTS:
        settings += [("ddpm", steps, {}), ("ddim", steps, {"eta": 0.0}), ("em", steps, {})]
        if steps <= TWO_CALLS_PER_STEP_LIMIT:
            settings += [("pc", steps, {}), ("ode", steps, {"solver": "heun"})]
    settings += [("ode", 0, {"solver": "rk45", "rtol": tol, "atol": tol}) for tol in ODE_TOLERANCES]
    return settings


def _train(args: argparse.Namespace, run_dir: Path) -> float | None:
    """Train through the command line, as a user would; None when a finished run was reused."""
    record = run_dir / "benchmark-train.json"
    if record.is_file():
        return json.loads(record.read_text())["seconds"]
    manifest = scan(args.data, layout="modality-folders")
    for case_id, entry in manifest.cases.items():
        entry.split = "test" if case_id == args.test_case else "train"
    run_dir.mkdir(parents=True, exist_ok=True)
    save_manifest(manifest, run_dir / "manifest.json")
    config = {
        "method": {"sampler": "ddim", "steps": 50},
        "slices": {"size": [args.size, args.size], "fit": "resize", "min_mask_fraction": 0.05, "seed": args.seed},
        "preparation": {"registration": "rigid", "seed": args.seed},
        "training": {
            "steps": args.train_steps,
            "batch_size": 8,
            "precision": "fp32",
            "val_every": 500,
            "checkpoint_every": 500,
            "seed": args.seed,
            "device": "cpu",
            "val_options": {"steps": 10},
        },
    }
    (run_dir / "benchmark-config.yaml").write_text(yaml.safe_dump(config))
    run = train_with_command("cddpm", run_dir / "manifest.json", run_dir, run_dir / "benchmark-config.yaml",
                             ["--source", "mr", "--target", "ct"])
    record.write_text(json.dumps({"seconds": run.seconds, "command": shlex.join(run.command)}))
    return run.seconds


def _test_slab(args: argparse.Namespace, preparation: PreparationConfig) -> tuple[Volume, np.ndarray, np.ndarray]:
    """The test MR on its CT grid (registered as in training), the CT in HU and the mask, central slices."""
    manifest = scan(args.data, layout="modality-folders")
    config = replace(preparation, modalities=["mr", "ct"], reference="ct")
    case = prepare_case(args.test_case, manifest.cases[args.test_case], config)
    filled = np.flatnonzero(case.mask.any(axis=(1, 2)))
    centre = int(filled[len(filled) // 2])
    start = max(int(filled[0]), centre - args.slices // 2)
    stop = min(int(filled[-1]) + 1, start + args.slices)
    mr = case.physical("mr")
    slab = _slab(mr, start, stop)
    return slab, case.physical("ct").array[start:stop], case.mask[start:stop]


def _slab(volume: Volume, start: int, stop: int) -> Volume:
    """Slices start:stop of a volume, with the origin moved so they stay where they were in space."""
    g = volume.geometry
    direction = np.array(g.direction).reshape(3, 3)
    origin = np.array(g.origin) + direction[:, 2] * g.spacing[2] * start
    geometry = Geometry((g.size[0], g.size[1], stop - start), g.spacing, tuple(origin), g.direction)  # type: ignore[arg-type]
    return Volume(volume.array[start:stop].copy(), geometry, volume.modality, volume.units)


def _evaluate(
    model, source: Volume, reference: np.ndarray, mask: np.ndarray, sampler: str, steps: int, draws: int, options: dict
) -> dict:
    request = {"sampler": sampler, **options, **({"steps": steps} if steps else {})}
    mask_volume = source.with_array(mask.astype(np.uint8), modality="mask")
    torch.manual_seed(0)
    start = time.perf_counter()
    result = translate_volume(model, source, samples=draws, options=request, mask=mask_volume, batch_size=16, seed=0)
    seconds = time.perf_counter() - start
    metrics = synthrad_metrics(reference, result.mean.array, mask)
    label = options.get("solver", sampler) if sampler == "ode" else sampler
    row = {
        "sampler": sampler,
        "variant": label,
        "steps": steps or None,
        "tolerance": options.get("rtol"),
        "draws": draws,
        "nfe": result.nfe,
        **metrics.as_dict(),
        "seconds": seconds,
        "seconds_per_slice": seconds / source.shape[0],
    }
    print(json.dumps(row), flush=True)
    return row


def _report(args: argparse.Namespace, rows: list[dict], train_seconds: float | None, run_dir: Path, voxels: int) -> None:
    payload = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.machine()}, nproc {os.cpu_count()}, torch {torch.__version__}, "
                   f"threads {torch.get_num_threads()}",
        "test_case": args.test_case,
        "size": args.size,
        "slices": args.slices,
        "mask_voxels": voxels,
        "train_steps": args.train_steps,
        "train_seconds": train_seconds,
        "run_dir": os.path.relpath(run_dir, REPO),
        "rows": rows,
    }
    (args.out / "samplers.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        f"# Samplers of one cddpm, MR -> CT, tested on {args.test_case}",
        "",
        f"cddpm (T = 1000, linear schedule, v prediction, {args.size} x {args.size} slices, default small UNet) trained "
        f"{args.train_steps} steps on the other two sarcoma patients (fp32, batch 8; "
        f"{'reused run' if train_seconds is None else f'{train_seconds / 60:.1f} min'}). Metrics (SynthRAD2023 definitions) on "
        f"the {args.slices} central slices of the test CT inside the body mask ({voxels} voxels). "
        "NFE: network evaluations per draw.",
        "",
        "| sampler | steps / tol | draws | NFE | MAE (HU) | PSNR (dB) | SSIM | s / slice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        steps = row["steps"] if row["steps"] else f"tol {row['tolerance']:g}"
        lines.append(
            f"| {row['variant']} | {steps} | {row['draws']} | {row['nfe']} | {row['mae']:.1f} | {row['psnr']:.2f} | "
            f"{row['ssim']:.4f} | {row['seconds_per_slice']:.3f} |"
        )
    lines += ["", f"Command: `{payload['command']}`  ", f"Date: {payload['date']}  ", f"Machine: {payload['machine']}", ""]
    (args.out / "samplers.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
