"""Few-step distillation: a cddpm student in 1-4 steps beside its teacher at 4-1000 steps and SynDiff at 4.

A cddpm (the teacher) and SynDiff are trained with `crossdiff train` for the same number of steps on two
sarcoma patients; `cddpm-distill` then distils the teacher in `--rounds` rounds of `--round-steps` steps
(its YAML sits in its run folder and names the teacher as `../cddpm`, as a benchmark entry does). All are
tested on the central `--slices` slices of the third patient (STS_003 by default), rigidly registered MR
onto its CT grid as in training; metrics follow SynthRAD2023 (crossdiff.evaluation.metrics) inside the body.
Each setting is one draw; the 4-NFE methods and DDIM-50 also as the mean of `--draws` draws.

Run:  nice -n 10 python benchmarks/distillation.py [--train-steps 1200] [--size 64] [--slices 12]
Writes OUT/distillation.md, OUT/distillation.json and OUT/distillation-mae-vs-nfe.png; the runs are kept
under OUT/../runs/distillation-* (ignored by git; reused when finished with the same settings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import yaml
from samplers import DEFAULT_DATA, REPO, _test_slab

from crossdiff.data.layouts import scan
from crossdiff.data.manifest import save_manifest
from crossdiff.evaluation.figures import quality_vs_cost
from crossdiff.evaluation.metrics import synthrad_metrics
from crossdiff.inference import LoadedModel, load_model, translate_volume
from crossdiff.train_command import train_with_command
from crossdiff.volumes import Volume


def main() -> None:
    args = _arguments()
    args.out.mkdir(parents=True, exist_ok=True)
    home = args.out.parent / "runs" / f"distillation-{args.test_case}-{args.size}px-{args.train_steps}"
    manifest = _manifest(args, home)
    seconds = {
        "cddpm": _train(args, "cddpm", {}, args.train_steps, manifest, home / "cddpm"),
        "syndiff": _train(args, "syndiff", {}, args.train_steps, manifest, home / "syndiff"),
        "cddpm-distill": _train(args, "cddpm-distill", {"teacher": "../cddpm", "steps": 4, "rounds": args.rounds,
                                                        "round_steps": args.round_steps},
                                args.rounds * args.round_steps, manifest, home / "cddpm-distill"),
    }
    teacher, student, syndiff = (load_model(home / name, "cpu") for name in ("cddpm", "cddpm-distill", "syndiff"))
    source, reference, mask = _test_slab(args, teacher.spec.preparation)
    settings = [(teacher, "cddpm ddim", {"sampler": "ddim", "steps": n}, 1) for n in (4, 10, 50)]
    settings += [(teacher, "cddpm ddpm", {"sampler": "ddpm", "steps": 1000}, 1)]
    settings += [(student, "cddpm-distill", {"steps": n}, 1) for n in (1, 2, 4)]
    settings += [(syndiff, "syndiff", {}, 1)]
    settings += [(teacher, "cddpm ddim", {"sampler": "ddim", "steps": 50}, args.draws),
                 (student, "cddpm-distill", {"steps": 4}, args.draws), (syndiff, "syndiff", {}, args.draws)]
    rows = [_evaluate(model, label, options, draws, source, reference, mask) for model, label, options, draws in settings]
    _report(args, rows, seconds, home, int(mask.sum()))


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--test-case", default="STS_003")
    parser.add_argument("--train-steps", type=int, default=1200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--round-steps", type=int, default=150)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return parser.parse_args()


def _manifest(args: argparse.Namespace, home: Path) -> Path:
    manifest = scan(args.data, layout="modality-folders")
    for case_id, entry in manifest.cases.items():
        entry.split = "test" if case_id == args.test_case else "train"
    home.mkdir(parents=True, exist_ok=True)
    save_manifest(manifest, home / "manifest.json")
    return home / "manifest.json"


def _train(args: argparse.Namespace, method: str, settings: dict, steps: int, manifest: Path, run_dir: Path) -> float | None:
    """Train through the command line, as a user would; None when a finished run was reused."""
    record = run_dir / "benchmark-train.json"
    if record.is_file():
        return json.loads(record.read_text())["seconds"]
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "method": settings,
        "slices": {"size": [args.size, args.size], "fit": "resize", "min_mask_fraction": 0.05, "seed": args.seed},
        "preparation": {"registration": "rigid", "seed": args.seed},
        "training": {"steps": steps, "batch_size": 8, "ema_decay": 0.99, "val_every": steps, "checkpoint_every": 250,
                     "seed": args.seed, "device": "cpu", "val_options": {"steps": 4} if method != "syndiff" else {}},
    }
    (run_dir / "benchmark-config.yaml").write_text(yaml.safe_dump(config))
    run = train_with_command(method, manifest, run_dir, run_dir / "benchmark-config.yaml", ["--source", "mr", "--target", "ct"])
    record.write_text(json.dumps({"seconds": run.seconds, "command": shlex.join(run.command)}))
    return run.seconds


def _evaluate(model: LoadedModel, label: str, options: dict, draws: int, source: Volume, reference: np.ndarray,
              mask: np.ndarray) -> dict:
    mask_volume = source.with_array(mask.astype(np.uint8), modality="mask")
    start = time.perf_counter()
    result = translate_volume(model, source, samples=draws, options=options, mask=mask_volume, batch_size=16, seed=0)
    seconds = time.perf_counter() - start
    row = {"method": label, "options": options, "draws": draws, "nfe": result.nfe,
           **synthrad_metrics(reference, result.mean.array, mask).as_dict(), "seconds_per_slice": seconds / source.shape[0]}
    print(json.dumps(row), flush=True)
    return row


def _report(args: argparse.Namespace, rows: list[dict], seconds: dict, home: Path, voxels: int) -> None:
    payload = {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.machine()}, nproc {os.cpu_count()}, torch {torch.__version__}, "
                   f"threads {torch.get_num_threads()}",
        "test_case": args.test_case, "size": args.size, "slices": args.slices, "mask_voxels": voxels,
        "train_steps": args.train_steps, "rounds": args.rounds, "round_steps": args.round_steps,
        "train_seconds": seconds, "runs": os.path.relpath(home, REPO), "rows": rows,
    }
    (args.out / "distillation.json").write_text(json.dumps(payload, indent=2) + "\n")
    single = {f"{row['method']} {row['nfe']}": (row["nfe"], row["mae"]) for row in rows if row["draws"] == 1}
    quality_vs_cost(args.out / "distillation-mae-vs-nfe.png", single, "network evaluations per draw (NFE)", "MAE (HU)")

    def minutes(name: str) -> str:
        return "reused run" if seconds[name] is None else f"{seconds[name] / 60:.1f} min"

    lines = [
        f"# Few-step distillation of a cddpm, MR -> CT, tested on {args.test_case}",
        "",
        f"cddpm (default settings: T = 1000, linear schedule, v prediction, small UNet) and syndiff trained "
        f"{args.train_steps} steps each on the other two sarcoma patients ({args.size} x {args.size} slices, batch 8; "
        f"cddpm {minutes('cddpm')}, syndiff {minutes('syndiff')}); cddpm-distill distilled the cddpm in "
        f"{args.rounds} rounds of {args.round_steps} steps (the first student: {4 * 2 ** (args.rounds - 1)} steps taught "
        f"by the teacher's {8 * 2 ** (args.rounds - 1)}; the last: 4; {minutes('cddpm-distill')}). "
        f"Metrics (SynthRAD2023 definitions) on the {args.slices} central slices of the "
        f"test CT inside the body mask ({voxels} voxels). NFE: network evaluations per draw; the student was distilled "
        "for 4 steps, so its 1- and 2-step rows ask it for steps it never learnt.",
        "",
        "| method | sampling | draws | NFE | MAE (HU) | PSNR (dB) | SSIM | s / slice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        sampling = ", ".join(f"{k} {v}" for k, v in row["options"].items()) or "4 large steps"
        lines.append(f"| {row['method']} | {sampling} | {row['draws']} | {row['nfe']} | {row['mae']:.1f} | {row['psnr']:.2f} | "
                     f"{row['ssim']:.4f} | {row['seconds_per_slice']:.3f} |")
    lines += ["", "![MAE against NFE](distillation-mae-vs-nfe.png)", "", f"Command: `{payload['command']}`  ",
              f"Date: {payload['date']}  ", f"Machine: {payload['machine']}", ""]
    (args.out / "distillation.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
