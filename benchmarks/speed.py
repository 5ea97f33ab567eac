"""Where translation and training spend their seconds, per stochastic method, on this machine.

For every stochastic method, a 256 x 256 volume of the bundled patient's MR (its slices resized to
256 x 256) is translated with 10 Monte-Carlo draws at the method's default sampler, through
`translate_volume` exactly as `crossdiff translate` does. Forward hooks time every network call
(network seconds); the same calls are then replayed on their own in the same process (bare network
seconds; of each distinct call, its first REPLAYED calls, scaled to its count), so `overhead` = (total - bare) / bare
is everything the loop adds: slicing, resizing, the sampler's arithmetic, random numbers, copies. The
networks are untrained (speed does not depend on weights) and demo-sized: every UNet denoiser has the demo candidates'
settings (the denoiser defaults; cddpm as benchmarks/configs/demo-model.yaml, the demo model until the bridge),
SynDiff and MUNIT their defaults (the demo's SynDiff
candidate, benchmarks/configs/demo-syndiff.yaml, trains SynDiff's defaults). Seconds are measured on
`--slices` slices and scaled to `--volume-slices` (time is linear in slices: the items are independent;
the `linearity` rows measure SynDiff on 1x and 2x the slices to show it).

Beside crossdiff's cddpm sampling, MONAI's `DiffusionInferer` samples the same network with the same
scheduler (DDPM, linear betas, 1000 training steps, x0 prediction) and steps, on the same batches. Also:
the CPU batch-size sweep behind `crossdiff.acceleration.CPU_BATCH_PIXELS`, bf16 against fp32 on the
CPU, the demo end to end (summary.json's `timings`) and training steps/s per method (64 x 64 slices,
batch 8, the demo's data). Every measurement runs in its own fresh process, whose peak RSS is its
peak memory.

Run:  python benchmarks/speed.py [--slices 1] [--draws 10] [--out benchmarks/results]
Writes OUT/speed.md and OUT/speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from crossdiff.acceleration import Acceleration, BatchSizer, accelerated
from crossdiff.atomic import write_json, write_text
from crossdiff.data.cases import PreparationConfig, PreparedCase, prepare_case
from crossdiff.data.slices import (
    MultiTargetSliceDataset,
    PairedSliceDataset,
    SliceConfig,
    UnpairedSliceDataset,
    context_slices,
)
from crossdiff.demo import SAMPLE_DIR, run_demo, sample_entry
from crossdiff.inference import LoadedModel, ModelSpec, translate_volume
from crossdiff.methods import get_method
from crossdiff.methods.base import DataSpec, Method
from crossdiff.nets.denoiser import DENOISER_DEFAULTS
from crossdiff.training import METRICS_LOG, TrainConfig, seed_everything, train
from crossdiff.volumes import Geometry, Volume

REPO = Path(__file__).resolve().parents[1]
DENOISER = dict(DENOISER_DEFAULTS)
DEMO_METHOD = {**DENOISER, **yaml.safe_load((REPO / "benchmarks" / "configs" / "demo-model.yaml").read_text())["method"]}
# method -> settings beside its defaults; every UNet denoiser is the demo candidates'
SETTINGS: dict[str, dict[str, Any]] = {
    "cddpm": DEMO_METHOD,
    "score-sde": DENOISER,
    "syndiff": {},
    "syndiff-unpaired": {},
    "cldm": {"stage": "diffusion", "targets": ["ct"], "scale_factor": 1.0, **DENOISER},
    "bridge": DENOISER,
    "rflow": DENOISER,
    "cddpm-distill": {"teacher_config": DEMO_METHOD},
    "munit": {},
    "cycle-ddpm": DENOISER,
    "unit-ddpm": DENOISER,
}
PREPARATION = PreparationConfig(modalities=["mr", "ct"], reference="ct")
TRAIN_SLICES = {"size": (64, 64), "fit": "pad-crop", "min_mask_fraction": 0.05}
SIZE = 256
FIRST_SLICE = 18  # the bundled MR's body starts near here; slices from it on all hold body
SWEEP_BATCHES = (1, 2, 4)
REPLAYED = 40  # calls of each distinct kind replayed bare per run, scaled to that kind's count


# ------------------------------------------------------------------------------ network timing


@dataclass
class NetworkClock:
    """Forward hooks on a method's networks: seconds inside them, and one copy of the arguments of
    each distinct call shape with the calls' order, so `replay` can run the same calls bare."""

    method: Method
    seconds: float = 0.0
    calls: list[tuple[str, tuple]] = field(default_factory=list)
    inputs: dict[tuple, tuple[tuple, dict]] = field(default_factory=dict)
    _depth: int = 0
    _since: float = 0.0

    @contextmanager
    def hooked(self) -> Iterator[NetworkClock]:
        handles = []
        for name, module in _timed_modules(self.method):
            handles.append(module.register_forward_pre_hook(self._enter(name), with_kwargs=True))
            handles.append(module.register_forward_hook(self._leave))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _enter(self, name: str) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            self._depth += 1
            if self._depth > 1:  # a timed module inside another: already counted
                return
            key = (name, _signature(args), _signature(tuple(kwargs.values())))
            self.calls.append((name, key))
            if key not in self.inputs:
                self.inputs[key] = (_detached(args), {k: _detached((v,))[0] for k, v in kwargs.items()})
            _synchronize()
            self._since = time.perf_counter()
        return hook

    def _leave(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            _synchronize()
            self.seconds += time.perf_counter() - self._since

    def replay(self, device: torch.device, acceleration: Acceleration) -> float:
        """Seconds for the recorded calls alone, same modules and shapes: per distinct call (module and
        shapes), its first REPLAYED calls timed one by one and their mean scaled to that call's count. Per
        call, because one run mixes calls of very different cost (cldm: one full-size decoder call beside
        50 latent denoiser calls), which a mean over the first calls of the run would misweigh."""
        modules = dict(_timed_modules(self.method))
        counts = Counter(key for _, key in self.calls)
        seconds: dict[tuple, list[float]] = {key: [] for key in counts}
        with accelerated(self.method, device, acceleration):
            for name, key in self.calls:
                if len(seconds[key]) == REPLAYED:
                    continue
                args, kwargs = self.inputs[key]
                _synchronize()
                start = time.perf_counter()
                modules[name](*args, **kwargs)
                _synchronize()
                seconds[key].append(time.perf_counter() - start)
        return sum(counts[key] * sum(times) / len(times) for key, times in seconds.items())


def _timed_modules(method: Method) -> Iterator[tuple[str, torch.nn.Module]]:
    """The method's networks and their direct children (an autoencoder's decoder is called on its own)."""
    for name, module in method.modules().items():
        yield name, module
        for child_name, child in module.named_children():
            yield f"{name}.{child_name}", child


def _signature(values: tuple) -> tuple:
    return tuple((tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else repr(v) for v in values)


def _detached(values: tuple) -> tuple:
    return tuple(v.detach().clone() if isinstance(v, torch.Tensor) else v for v in values)


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------- measurements


def bundled_case(cache: Path) -> PreparedCase:
    return prepare_case("STS_003", sample_entry(SAMPLE_DIR), PREPARATION, cache_dir=cache)


def mr_at_256(slices: int) -> Volume:
    """`slices` axial slices of the bundled MR, each resized to 256 x 256 (a 1 mm grid)."""
    from crossdiff import read_volume

    mr = read_volume(sample_entry(SAMPLE_DIR).images["mr"], modality="MR")
    stack = torch.from_numpy(mr.array[FIRST_SLICE : FIRST_SLICE + slices].astype(np.float32))[:, None]
    array = F.interpolate(stack, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0].numpy()
    geometry = Geometry(size=(SIZE, SIZE, slices), spacing=(1.0, 1.0, mr.geometry.spacing[2]), origin=(0.0, 0.0, 0.0))
    return Volume(array, geometry, modality="MR", units=mr.units)


def build_model(name: str, case: PreparedCase, device: torch.device, size: int = SIZE) -> LoadedModel:
    paired = get_method(name).paired
    slices = SliceConfig(size=(size, size), fit="resize", context=1 if paired else 0)
    seed_everything(0)
    method = get_method(name)(SETTINGS[name], DataSpec(slices.channels, 1, slices.size))
    for module in method.modules().values():
        module.to(device).eval()
    spec = ModelSpec.from_cases([case], "mr", "ct", slices, PREPARATION)
    return LoadedModel(method, spec, Path("untrained"), None, device)


def time_translation(model: LoadedModel, volume: Volume, draws: int, acceleration: Acceleration,
                     batch_size: int | None = None) -> dict[str, Any]:
    clock = NetworkClock(model.method)
    with clock.hooked():
        start = time.perf_counter()
        result = translate_volume(model, volume, samples=draws, mask=None, batch_size=batch_size, seed=0,
                                  acceleration=acceleration)
        total = time.perf_counter() - start
    bare = clock.replay(model.device, acceleration)
    return {"seconds": total, "network_seconds": clock.seconds, "bare_network_seconds": bare,
            "overhead": (total - bare) / bare, "network_calls": len(clock.calls), "nfe_per_draw": result.nfe,
            "slices": volume.shape[0], "draws": draws,
            "batch": batch_size or BatchSizer(None, model.device, model.method.sampling_pixels((SIZE, SIZE))).batch}


def monai_sampling(model: LoadedModel, volume: Volume, draws: int, batch: int) -> dict[str, Any]:
    """MONAI's DiffusionInferer on crossdiff's cddpm network: DDPM scheduler of the same betas, x0
    prediction, the same steps, source slices concatenated to the noisy image (mode 'concat'), the
    same batches of (slice, draw) items."""
    from monai.inferers import DiffusionInferer
    from monai.networks.schedulers import DDPMScheduler

    config = model.method.config
    scheduler = DDPMScheduler(num_train_timesteps=int(config["timesteps"]), schedule="linear_beta",
                              prediction_type="sample", clip_sample=True)
    scheduler.set_timesteps(int(config["steps"]))
    inferer = DiffusionInferer(scheduler)
    lo, hi = np.percentile(volume.array, (1, 99))
    scaled = np.clip((volume.array - lo) / (hi - lo) * 2 - 1, -1, 1).astype(np.float32)
    items = [(i, d) for i in range(volume.shape[0]) for d in range(draws)]
    generator = torch.Generator(model.device).manual_seed(0)
    start = time.perf_counter()
    with torch.inference_mode():
        for first in range(0, len(items), batch):
            chunk = items[first : first + batch]
            source = torch.from_numpy(np.stack([context_slices(scaled, i, model.spec.slices) for i, _ in chunk]))
            noise = torch.randn((len(chunk), 1, SIZE, SIZE), generator=generator, device=model.device)
            inferer.sample(noise, model.method.net.unet, scheduler, conditioning=source.to(model.device), mode="concat",
                           verbose=False)
    _synchronize()
    return {"seconds": time.perf_counter() - start, "slices": volume.shape[0], "draws": draws, "batch": batch}


def training_rate(name: str, case: PreparedCase, steps: int, device: torch.device) -> dict[str, Any]:
    """Steps/s and samples/s over the second half of `steps` training steps (the first half warms up)."""
    paired = get_method(name).paired
    slices = SliceConfig(**TRAIN_SLICES, context=1 if paired else 0)
    if name == "cldm":
        data = MultiTargetSliceDataset([case], "mr", ["ct"], slices, augment=True)
    elif paired:
        data = PairedSliceDataset([case], "mr", "ct", slices, augment=True)
    else:
        data = UnpairedSliceDataset([case], [case], "mr", "ct", slices, augment=True)
    seed_everything(0)
    method = get_method(name)(SETTINGS[name], DataSpec(slices.channels, 1, slices.size))
    batch, half = 8, steps // 2
    config = TrainConfig(steps=2 * half, batch_size=batch, log_every=half, checkpoint_every=10**9,
                         val_every=10**9, device=device.type)
    with tempfile.TemporaryDirectory() as run:
        train(method, data, None, config, Path(run) / "run")
        lines = (Path(run) / "run" / METRICS_LOG).read_text().splitlines()
    rate = json.loads(lines[-1])["steps_per_s"]
    return {"steps_per_s": rate, "samples_per_s": rate * batch, "batch": batch, "size": list(slices.size),
            "parameters": _parameters(method)}


def _parameters(method: Method) -> int:
    return sum(p.numel() for module in method.modules().values() for p in module.parameters())


def demo_profile(out: Path, acceleration: Acceleration) -> dict[str, Any]:
    start = time.perf_counter()
    result = run_demo(out, device="cpu", acceleration=acceleration)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds": wall, "timings": summary["timings"], "mae": result.metrics["mae"],
            "samples": result.samples, "nfe_per_draw": result.nfe, "precision": summary["precision"]}


# ------------------------------------------------------------------------------- one measurement


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One job in this (fresh) process; its peak RSS is the job's peak memory."""
    torch.set_num_threads(job["threads"])
    device = torch.device(job.get("device", "cpu"))
    cache = Path(job["cache"])
    kind = job["kind"]
    acceleration = Acceleration(precision=job.get("precision", "fp32"), channels_last=job.get("channels_last", True))
    if kind == "demo":
        result = demo_profile(Path(job["scratch"]) / f"demo-{acceleration.precision}", acceleration)
    else:
        case = bundled_case(cache)
        if kind == "train":
            result = training_rate(job["method"], case, job["steps"], device)
        else:
            model = build_model(job["method"], case, device)
            volume = mr_at_256(job["slices"])
            result = {"parameters": _parameters(model.method)}
            if kind == "translate":
                result |= time_translation(model, volume, job["draws"], acceleration, job.get("batch"))
            elif kind == "monai":
                result |= monai_sampling(model, volume, job["draws"], job["batch"])
            if device.type == "cuda":
                result["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    completed = subprocess.run([sys.executable, __file__, "--job", json.dumps(job)], capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": str(job["threads"])})
    if completed.returncode != 0:
        raise SystemExit(f"job {job} failed:\n{completed.stderr[-3000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    print(f"{job['kind']:9} {job.get('method', ''):17} {json.dumps(_brief(result))}", flush=True)
    return {**job, **result}


def _brief(result: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items() if k != "timings"}


# ------------------------------------------------------------------------------------ the report


def main() -> None:
    args = _arguments()
    if args.job:
        print(json.dumps(measure(json.loads(args.job))))
        return
    if args.rewrite:  # the markdown again from the measurements, e.g. after the report's wording changed
        write_text(args.out / "speed.md", _markdown(json.loads((args.out / "speed.json").read_text())))
        return
    with tempfile.TemporaryDirectory() as scratch:
        cache = Path(scratch) / "cache"
        cache.mkdir()
        base = {"threads": args.threads, "cache": str(cache), "scratch": scratch, "draws": args.draws}
        run_job({**base, "kind": "train", "method": "cddpm", "steps": 2})  # fills the case cache
        jobs = [{**base, "kind": "translate", "method": name, "slices": args.slices} for name in args.methods]
        rows = [run_job(job) for job in jobs]
        cddpm = next((row for row in rows if row["method"] == "cddpm"), None)
        monai = [run_job({**base, "kind": "monai", "method": "cddpm", "slices": args.slices, "batch": cddpm["batch"]})
                 ] if cddpm else []
        linearity = [run_job({**base, "kind": "translate", "method": "syndiff", "slices": n * args.slices})
                     for n in (1, 2)] if "syndiff" in args.methods else []
        sweep = [run_job({**base, "kind": "translate", "method": "cddpm", "slices": args.slices, "batch": b})
                 for b in SWEEP_BATCHES] if args.sweep else []
        precision = [run_job({**base, "kind": "translate", "method": name, "slices": args.slices, "precision": p,
                              "channels_last": layout}) for name in ("cddpm", "syndiff")
                     for p, layout in (("fp32", True), ("fp32", False), ("bf16", True))] if args.sweep else []
        demo = [run_job({**base, "kind": "demo", "precision": p}) for p in ("fp32", "bf16")] if args.demo else []
        training = [run_job({**base, "kind": "train", "method": name, "steps": args.train_steps})
                    for name in args.methods] if args.train_steps else []
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": _machine(args.threads),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "volume_slices": args.volume_slices,
              "translation": rows, "monai": monai, "linearity": linearity, "batch_sweep": sweep,
              "precision": precision, "demo": demo, "training": training, "note": args.note}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "speed.json", report)
    write_text(args.out / "speed.md", _markdown(report))
    print(f"wrote {args.out / 'speed.md'} and {args.out / 'speed.json'}")


def _machine(threads: int) -> dict[str, Any]:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    return {"cpu": model, "threads": threads, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _scaled(row: dict[str, Any], slices: int) -> float:
    return row["seconds"] * slices / row["slices"]


def _noise_note(report: dict[str, Any]) -> str:
    """How far the same job's seconds spread within this run: the cddpm job (fp32, channels_last, batch 1)
    runs in the translation table, the batch sweep and the precision table."""
    same = [row["seconds"] for row in report["translation"] if row["method"] == "cddpm" and row["batch"] == 1]
    same += [row["seconds"] for row in report["batch_sweep"] if row["batch"] == 1]
    same += [row["seconds"] for row in report["precision"]
             if row["method"] == "cddpm" and row["precision"] == "fp32" and row["channels_last"]]
    spread = (f"the same cddpm job (fp32, channels_last, batch 1) ran {len(same)} times in this run in "
              f"{min(same):.1f}-{max(same):.1f} s. " if len(same) > 1 else "")
    return (f"Read differences of a few percent as noise: {spread}A negative overhead is such noise (the bare replay "
            "ran slower than the loop). cddpm-distill is an untrained student, which samples with its first round's "
            "16 steps; a finished one samples with its last round's (4 by default), a quarter of the seconds.")


def _section(title: str, columns: list[str], rows: list[list[str]], intro: str = "") -> list[str]:
    """A markdown section: heading, optional paragraph, table."""
    return ["", f"## {title}", "", *([intro, ""] if intro else []), "| " + " | ".join(columns) + " |",
            "|" + "---|" * len(columns), *("| " + " | ".join(row) + " |" for row in rows)]


def _markdown(report: dict[str, Any]) -> str:
    n = report["volume_slices"]
    machine = report["machine"]
    rows = report["translation"]
    command = report["command"].split(" --note ")[0] + (" --note ..." if report["note"] else "")
    lines = ["# Speed", "",
             f"Measured {report['date']} by `{command}` on {machine['cpu']} ({machine['cores']} cores), "
             f"{machine['threads']} thread(s) (torch {machine['torch']}; GPU: {machine['gpu'] or 'none'}). "
             f"{report['note']}".rstrip()]
    if len(rows) > 1 or report["batch_sweep"]:
        lines += ["", _noise_note(report)]
    if rows:
        lines += _section(
            f"Translation: 256 x 256 x {n}, {rows[0]['draws']} draws, default sampler, fp32",
            ["method", "parameters", "NFE per draw", "batch", f"seconds, {n} slices", "network s (in loop)",
             "bare network s", "everything else s", "overhead", "peak RSS MB"],
            [[row["method"], f"{row['parameters']:,}", str(row["nfe_per_draw"]), str(row["batch"]),
              f"{_scaled(row, n):.1f}", f"{row['network_seconds'] * n / row['slices']:.1f}",
              f"{row['bare_network_seconds'] * n / row['slices']:.1f}",
              f"{(row['seconds'] - row['bare_network_seconds']) * n / row['slices']:.1f}",
              f"{100 * row['overhead']:.1f}%", f"{row['peak_rss_mb']:.0f}"] for row in rows],
            f"Measured on {rows[0]['slices']} slice(s) and scaled to {n} (time is linear in slices, see below). "
            "`overhead` = (total - bare network) / bare network, the bare network being the same calls replayed "
            "alone in the same process; `everything else` = total - bare network.")
    if report["monai"]:
        cddpm, monai = next(row for row in rows if row["method"] == "cddpm"), report["monai"][0]
        lines += _section(
            "cddpm beside MONAI's DiffusionInferer (same network, scheduler, steps and batches)",
            ["sampler", "seconds on the measured slices", f"per {n} slices", "peak RSS MB"],
            [[label, f"{row['seconds']:.2f}", f"{_scaled(row, n):.1f}", f"{row['peak_rss_mb']:.0f}"]
             for label, row in (("crossdiff translate_volume (the whole path)", cddpm),
                                ("MONAI DiffusionInferer.sample (network and scheduler only)", monai))])
        lines += ["", f"crossdiff / MONAI: {cddpm['seconds'] / monai['seconds']:.3f}."]
    if report["linearity"]:
        lines += _section("Time is linear in slices (SynDiff)", ["slices", "seconds", "seconds per slice"],
                          [[str(row["slices"]), f"{row['seconds']:.2f}", f"{row['seconds'] / row['slices']:.2f}"]
                           for row in report["linearity"]])
    if report["batch_sweep"]:
        lines += _section("Batch size on the CPU (cddpm, 256 x 256 items)", ["items per batch", "seconds", "overhead"],
                          [[str(row["batch"]), f"{row['seconds']:.2f}", f"{100 * row['overhead']:.1f}%"]
                           for row in report["batch_sweep"]])
    if report["precision"]:
        lines += _section("Precision and memory format on the CPU (measured slices only)",
                          ["method", "precision", "memory format", "seconds", "bare network s"],
                          [[row["method"], row["precision"], "channels_last" if row["channels_last"] else "contiguous",
                            f"{row['seconds']:.2f}", f"{row['bare_network_seconds']:.2f}"] for row in report["precision"]])
    if report["demo"]:
        demos = report["demo"]
        lines += _section(f"`crossdiff demo` end to end ({demos[0]['samples']} draws, {demos[0]['nfe_per_draw']} steps)",
                          ["stage", *(f"seconds, {demo['precision']}" for demo in demos)],
                          [*([stage, *(f"{demo['timings'][stage]:.2f}" for demo in demos)] for stage in demos[0]["timings"]),
                           ["**total (run_demo, in process)**", *(f"**{demo['seconds']:.2f}**" for demo in demos)],
                           ["MAE inside the body, HU", *(f"{demo['mae']:.2f}" for demo in demos)],
                           ["peak RSS, MB", *(f"{demo['peak_rss_mb']:.0f}" for demo in demos)]])
    if report["training"]:
        lines += _section("Training on the CPU (64 x 64 slices of the bundled case, batch 8, fp32)",
                          ["method", "parameters", "steps/s", "samples/s", "peak RSS MB"],
                          [[row["method"], f"{row['parameters']:,}", f"{row['steps_per_s']:.2f}",
                            f"{row['samples_per_s']:.1f}", f"{row['peak_rss_mb']:.0f}"] for row in report["training"]])
    return "\n".join(lines) + "\n"


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(SETTINGS))
    parser.add_argument("--slices", type=int, default=1, help="slices measured")
    parser.add_argument("--volume-slices", type=int, default=100, help="slices the table scales to")
    parser.add_argument("--draws", type=int, default=10)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--train-steps", type=int, default=20, help="0: no training rates")
    parser.add_argument("--no-demo", dest="demo", action="store_false")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false")
    parser.add_argument("--note", default="", help="what else ran on the machine")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--rewrite", action="store_true", help="rewrite OUT/speed.md from OUT/speed.json, measure nothing")
    parser.add_argument("--job", help=argparse.SUPPRESS)
    return parser.parse_args()


if __name__ == "__main__":
    main()
