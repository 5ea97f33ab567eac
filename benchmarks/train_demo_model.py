"""Train the model `crossdiff demo` ships, and bundle it with its config and a training record.

The model learns MR -> CT from sarcoma patients STS_001 and STS_002 only: STS_003, the patient bundled
with the package, is held out and never read here (validation runs on the training patients, to watch for
collapse; the last step is shipped). Which method and config to ship is chosen on the training patients
by benchmarks/demo_selection.py. Training goes through `crossdiff train`, as a user's
would; the result is exported (config.yaml + EMA weights, no training state) into
src/crossdiff/sample/model/ with training-record.json, and SHA256SUMS is rewritten so the demo can
tell a damaged copy.

Run:  python benchmarks/train_demo_model.py [--method bridge] [--config benchmarks/configs/demo-bridge.yaml]
      [--out src/crossdiff/sample/model]   (a killed run resumes from its last checkpoint)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

import torch

from crossdiff.checkpoints import export_checkpoint, latest_checkpoint, read_config, read_state
from crossdiff.data.layouts import scan
from crossdiff.data.manifest import save_manifest
from crossdiff.demo import SAMPLE_CASE, SAMPLE_DIR
from crossdiff.train_command import train_with_command

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "sarcoma-ct-mr-pet"
TRAINING_CASES = ("STS_001", "STS_002")
# method -> its config (benchmarks/configs) on the demo model's data, grid, slices and budget: the candidates
# benchmarks/demo_selection.py chooses from, and the UNet baseline benchmarks/demo.py scores beside them
DEMO_CONFIGS = {"cddpm": "demo-model.yaml", "bridge": "demo-bridge.yaml", "syndiff": "demo-syndiff.yaml",
                "unet": "demo-unet.yaml"}


def main() -> None:
    args = _arguments()
    run_dir = REPO / "benchmarks" / "runs" / f"demo-{args.method}"
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = scan(args.data, layout="modality-folders")
    for case_id, entry in manifest.cases.items():
        entry.split = "train" if case_id in TRAINING_CASES else "test"
    save_manifest(manifest, run_dir / "manifest.json")
    run = train_with_command(args.method, run_dir / "manifest.json", run_dir, args.config, ["--source", "mr", "--target", "ct"])
    checkpoint = latest_checkpoint(run_dir)
    record = _record(args, run_dir, checkpoint, run.seconds, run.resumed)
    export_checkpoint(checkpoint, args.out, record)
    if args.out.resolve().parent == SAMPLE_DIR.resolve():
        _write_checksums(SAMPLE_DIR)
    print(json.dumps(record, indent=2))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shipped = read_config(SAMPLE_DIR / "model")["method"]["name"]  # demo_selection.py's choice, retrained by default
    parser.add_argument("--method", default=shipped, choices=sorted(DEMO_CONFIGS))
    parser.add_argument("--config", type=Path, help="default: the method's demo config in benchmarks/configs")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=SAMPLE_DIR / "model")
    args = parser.parse_args()
    args.config = args.config or REPO / "benchmarks" / "configs" / DEMO_CONFIGS[args.method]
    return args


def _record(args: argparse.Namespace, run_dir: Path, checkpoint: Path, seconds: float, resumed: bool) -> dict:
    """What a reader of the shipped model needs to know: data, budget, hardware, time, validation."""
    state = read_state(checkpoint)
    config = read_config(checkpoint)
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [(m["step"], m["steps_per_s"]) for m in logged if "steps_per_s" in m]
    # time spent in training steps, from the logged rates: true across resumed sessions too
    step_seconds = sum((step - before) / rate for (before, _), (step, rate) in zip([(0, 0.0), *rates], rates))
    return {
        "method": args.method,
        "data": f"sarcoma-ct-mr-pet (../shared/data), MR T1 -> CT, trained on {', '.join(TRAINING_CASES)}; "
                f"{SAMPLE_CASE} held out (not used in training or validation)",
        "steps": state["step"],
        "batch_size": config["training"]["batch_size"],
        "slices": config["slices"],
        "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                    + (f"CUDA {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "no GPU"),
        "device": config["training"]["device"],
        "training_step_seconds": round(step_seconds, 1),
        "wall_seconds_this_session": round(seconds, 1),
        "resumed": resumed,
        "validation": state["validation"],
        "command": f"python benchmarks/train_demo_model.py --method {args.method} --config "
                   f"{args.config.relative_to(REPO) if args.config.is_relative_to(REPO) else args.config}",
        "trained": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _write_checksums(sample_dir: Path) -> None:
    files = sorted(p for p in sample_dir.rglob("*") if p.is_file() and p.name not in ("SHA256SUMS", "README.md"))
    lines = [f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(sample_dir).as_posix()}" for p in files]
    (sample_dir / "SHA256SUMS").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
