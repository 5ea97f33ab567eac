"""Does the built-in demo meet its targets? Wall time, sCT quality and uncertainty on the bundled patient.

1. `crossdiff demo` runs `--repeat` times in a fresh process each (wall time includes Python start-up,
   imports, model loading, translation, registration of the real CT and the report).
2. Its summary.json gives the MAE/PSNR/SSIM of the sCT inside the body against the registered real CT
   and the Spearman correlation of the uncertainty map with the absolute error.
3. The other candidates for the shipped model (benchmarks/demo_selection.py), and the UNet regression
   baseline, are trained on the same patients with the same grid, slices and budget
   (benchmarks/train_demo_model.py --method M, with M's config in DEMO_CONFIGS) and scored by the same
   demo pipeline.

Targets (issue 15): under 60 s on 2 CPU cores, MAE under 100 HU, bone MAE under 300 HU, Spearman >= 0.3.
Run:  python benchmarks/demo.py [--repeat 2] [--out benchmarks/results]
Writes OUT/demo.md and OUT/demo.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from train_demo_model import DEMO_CONFIGS

from crossdiff.demo import DEFAULT_SAMPLES, run_demo
from crossdiff.methods import get_method

REPO = Path(__file__).resolve().parents[1]
TARGETS = {"seconds": 60.0, "mae": 100.0, "mae_bone": 300.0, "spearman": 0.3}


def main() -> None:
    args = _arguments()
    with tempfile.TemporaryDirectory() as scratch:
        runs = [_timed_demo(Path(scratch) / f"demo-{i}") for i in range(args.repeat)]
        demo = runs[-1]["summary"]
        compared = {method: _compared(method, Path(scratch) / method) for method in DEMO_CONFIGS if method != demo["method"]}
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "command": "crossdiff demo",
        "wall_seconds": [round(r["seconds"], 1) for r in runs],
        "demo": {key: demo[key] for key in ("method", "samples", "sampler", "steps", "nfe_per_draw", "metrics",
                                             "spearman_uncertainty_error", "training_record")},
        "compared": compared,
        "targets": TARGETS,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "demo.md").write_text(_markdown(result))
    print(_markdown(result))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return parser.parse_args()


def _timed_demo(out: Path) -> dict:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "crossdiff", "demo", "--out", str(out)], check=True)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "summary": json.loads((out / "summary.json").read_text())}


def _compared(method: str, out: Path) -> dict:
    """Train (or reuse) `method` on the demo model's data and budget, then score it like the demo (a
    stochastic method with the demo's number of draws)."""
    model = REPO / "benchmarks" / "runs" / f"demo-{method}" / "model"
    if not model.is_dir():
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_demo_model.py"), "--method", method,
                        "--out", str(model)], check=True)
    result = run_demo(out, samples=DEFAULT_SAMPLES if get_method(method).stochastic else 1, model_dir=model)
    record = json.loads((model / "training-record.json").read_text())
    return {"metrics": result.metrics, "samples": result.samples, "nfe_per_draw": result.nfe,
            "spearman": None if math.isnan(result.spearman) else result.spearman, "seconds": round(result.seconds, 1),
            "training_record": record}


def _markdown(result: dict) -> str:
    demo = result["demo"]
    record = demo["training_record"]
    spearman = demo["spearman_uncertainty_error"]
    metrics = demo["metrics"]
    rows = [_row(f"{demo['method']}, shipped (mean of {demo['samples']} draws, {demo['sampler']} {demo['steps']} steps)",
                 metrics, spearman["rho"])]
    for method, other in result["compared"].items():
        drawn = f"mean of {other['samples']} draws, {other['nfe_per_draw']} steps" if other["samples"] > 1 else "one pass"
        rows.append(_row(f"{method} ({drawn}; same data and budget)", other["metrics"], other["spearman"]))
    return "\n".join([
        "# crossdiff demo: targets and measurements",
        "",
        f"Measured {result['when']} on {result['machine']} by `python benchmarks/demo.py`.",
        "",
        f"- wall time of `{result['command']}` (fresh process each): "
        f"{', '.join(f'{s:.1f} s' for s in result['wall_seconds'])} (target < {TARGETS['seconds']:.0f} s)",
        f"- MAE inside the body of the held-out bundled patient: {metrics['mae']:.1f} HU "
        f"(target < {TARGETS['mae']:.0f} HU)",
        f"- MAE inside the real CT's bone (>= 300 HU): {metrics['mae_bone']:.1f} HU (target < {TARGETS['mae_bone']:.0f} HU)",
        f"- Spearman correlation of the uncertainty map with the absolute error: {spearman['rho']:.3f} "
        f"over {spearman['voxels']} voxels (target >= {TARGETS['spearman']})",
        "",
        "| model | MAE (HU) | bone MAE (HU) | PSNR (dB) | SSIM | Spearman (std, abs error) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"The shipped model: {record['method']}, {record['steps']} steps of batch {record['batch_size']} on "
        f"{record['data']}; {record['hardware']}; {record['training_step_seconds'] / 60:.1f} min of training steps.",
        "",
    ])


def _row(model: str, metrics: dict, spearman: float | None) -> str:
    rho = "n/a (deterministic)" if spearman is None else f"{spearman:.3f}"
    return (f"| {model} | {metrics['mae']:.1f} | {metrics['mae_bone']:.0f} | {metrics['psnr']:.2f} | {metrics['ssim']:.3f} | "
            f"{rho} |")


if __name__ == "__main__":
    main()
