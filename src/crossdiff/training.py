"""One training loop for every method: seeded batches, AMP, clipping, EMA, validation, checkpoints,
exact resume and multi-process data parallelism (torchrun).

The method decides how a batch is learned from (`Method.training_step`); the loop does everything
around it, so a new method gets all of this by being one file. Reproducibility is by construction:
the batch of step s depends only on (seed, s), the per-step generator on (seed, s, rank), and a
checkpoint holds every other piece of state (weights, EMA, optimisers, scaler, global RNGs), so a run
resumed from step N continues bit for bit like the run that was never stopped.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from crossdiff import checkpoints
from crossdiff.atomic import write_text
from crossdiff.config_schema import check_section, check_translate_options
from crossdiff.diffusion.streams import stream_seed
from crossdiff.errors import CrossdiffError, InputError, error_summary
from crossdiff.methods.base import Method, StepContext

PRECISIONS = ("fp32", "bf16", "fp16")
MODEL_FORMAT = "crossdiff-model"
MODEL_VERSION = 1
RUN_CONFIG = "config.yaml"
METRICS_LOG = "metrics.jsonl"
# A validation prediction whose spread inside the mask is below this fraction of the target's is a collapse.
COLLAPSE_FRACTION = 0.05
VALIDATION_STREAM = 2**32 - 1  # the "rank" slot of the validation generator's seed: no real rank has it


@dataclass
class TrainConfig:
    """How to train, independent of the method. `steps` counts optimisation steps (one batch each);
    `batch_size` is per process, so a torchrun job with W processes learns from W x batch_size slices
    per step. `ema_decay` 0 disables the EMA (inference then uses the raw weights); `grad_clip` 0
    disables clipping. 'bf16' autocasts on CPU and GPU; 'fp16' (with loss scaling) needs CUDA."""

    steps: int = 10_000
    batch_size: int = 8
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    precision: str = "fp32"
    val_every: int = 500
    val_options: dict[str, Any] = field(default_factory=dict)
    validate: bool = True  # False skips validation altogether (timing runs)
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 50
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        problems = [text for ok, text in self._checks() if not ok]
        if problems:
            raise CrossdiffError("invalid training configuration: " + "; ".join(problems))

    def _checks(self) -> list[tuple[bool, str]]:
        positive = ("steps", "batch_size", "val_every", "checkpoint_every", "keep_checkpoints", "log_every")
        return [
            *((getattr(self, name) >= 1, f"{name} must be >= 1, not {getattr(self, name)}") for name in positive),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay must lie in [0, 1), not {self.ema_decay}"),
            (self.grad_clip >= 0.0, f"grad_clip must be >= 0 (0 disables it), not {self.grad_clip}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}"),
            (self.seed >= 0 and self.num_workers >= 0, "seed and num_workers must be >= 0"),
            (isinstance(self.val_options, dict), "val_options must be a mapping of translation options"),
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return cls(**check_section("training", data, cls))


@dataclass
class TrainResult:
    step: int
    losses: dict[str, float]
    validation: list[dict[str, float]]
    checkpoint: Path | None


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; call before building a method so its initial weights are reproducible."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str | None) -> torch.device:
    """'auto' (or None) picks CUDA when present; asking for CUDA without it is an error, not a silent CPU run."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CrossdiffError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CrossdiffError("device 'cuda' was asked for, but no CUDA GPU is available (use --device cpu)")
    return device


# ------------------------------------------------------------------------------------ batch order


def steps_per_epoch(dataset_size: int, global_batch: int) -> int:
    if dataset_size < global_batch:
        raise CrossdiffError(
            f"the training set has {dataset_size} slices, fewer than one batch of {global_batch}; lower batch_size"
        )
    return dataset_size // global_batch


class SeededBatches(Sampler[list[int]]):
    """This process's share of each step's batch in one epoch, from step `first` of the epoch on.

    The epoch's order is a permutation drawn from (seed, epoch) alone; step j of the epoch takes the
    j-th run of world x batch_size indices and rank r its r-th part, so the union over ranks is
    exactly the batch a single process with world x batch_size would see (the last partial batch is
    dropped so every step has the same size).
    """

    def __init__(self, size: int, batch_size: int, seed: int, epoch: int, first: int, rank: int = 0, world: int = 1):
        self.size, self.batch_size, self.seed, self.epoch = size, batch_size, seed, epoch
        self.first, self.rank, self.world = first, rank, world
        self.steps = steps_per_epoch(size, batch_size * world)

    def __len__(self) -> int:
        return self.steps - self.first

    def __iter__(self) -> Iterator[list[int]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        step_size = self.batch_size * self.world
        for step in range(self.first, self.steps):
            start = step * step_size + self.rank * self.batch_size
            yield order[start : start + self.batch_size].tolist()


def _batches(dataset: Dataset, config: TrainConfig, done: int, rank: int, world: int,
             pin: bool = False) -> Iterator[dict[str, Any]]:
    """Endless batches for steps done+1, done+2, ... (each epoch gets its own loader and augmentation draws).
    `pin` (CUDA): batches in page-locked memory, so their copies to the GPU overlap the step."""
    per_epoch = steps_per_epoch(len(dataset), config.batch_size * world)  # type: ignore[arg-type]
    position = done
    while True:
        epoch, first = divmod(position, per_epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        sampler = SeededBatches(len(dataset), config.batch_size, config.seed, epoch, first, rank, world)  # type: ignore[arg-type]
        # its own generator: a DataLoader otherwise draws its workers' base seed from the global RNG
        # when iteration starts, which would make the global stream depend on where a run resumed
        generator = torch.Generator().manual_seed(stream_seed(config.seed, epoch))
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=config.num_workers, generator=generator,
                            pin_memory=pin)
        for batch in loader:
            yield batch
            position += 1


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()}


# ---------------------------------------------------------------------------------- EMA and steps


class EMA:
    """Exponential moving averages of the trained networks, the weights inference uses.

    The decay warms up as min(decay, (1 + step) / (10 + step)), so short runs are not dominated by
    the random initial weights. Networks no optimiser trains (a frozen autoencoder), and every network
    when decay is 0, are their own "average".
    """

    def __init__(self, modules: dict[str, nn.Module], decay: float, trained: set[str]) -> None:
        self.decay = decay
        self._sources = modules
        self.modules = {
            name: _frozen_copy(module) if decay > 0 and name in trained else module for name, module in modules.items()
        }

    @torch.no_grad()
    def update(self, names: list[str], step: int) -> None:
        if self.decay == 0:
            return
        weight = 1.0 - min(self.decay, (1.0 + step) / (10.0 + step))
        for name in names:
            average, source = self.modules[name], self._sources[name]
            for mean, value in zip(average.parameters(), source.parameters()):
                mean.lerp_(value.detach(), weight)
            for mean, value in zip(average.buffers(), source.buffers()):
                mean.copy_(value)


def _frozen_copy(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).eval().requires_grad_(False)


class _TrainingState:
    """Everything a step changes, and so everything a checkpoint holds: the networks, their EMA, the
    optimisers and the loss scaler. `apply` is what `StepContext.optimize` does: zero, backward
    (scaled), unscale, clip, step, EMA."""

    def __init__(self, method: Method, modules: dict[str, nn.Module], config: TrainConfig, device: torch.device):
        self.modules, self.clip = modules, config.grad_clip
        self.optimizers = method.optimizers()
        trained = {name for _, names in self.optimizers.values() for name in names}
        unknown = sorted(trained - set(modules))
        if unknown:
            raise CrossdiffError(f"method {method.name!r} optimises unknown modules: {', '.join(unknown)}")
        self.ema = EMA(modules, config.ema_decay, trained)
        self.scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")

    def apply(self, name: str, loss: torch.Tensor, step: int) -> None:
        if name not in self.optimizers:
            raise CrossdiffError(f"no optimiser named {name!r} (have: {', '.join(self.optimizers)})")
        optimizer, names = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(loss.device.type, enabled=False):
            self.scaler.scale(loss).backward()
        if self.clip > 0:
            self.scaler.unscale_(optimizer)
            parameters = [p for module in names for p in self.modules[module].parameters()]
            nn.utils.clip_grad_norm_(parameters, self.clip)
        self.scaler.step(optimizer)
        self.scaler.update()
        self.ema.update(names, step)

    def save(self, run_dir: Path, step: int, history: list[dict[str, float]], described: dict[str, Any], keep: int) -> Path:
        weights = {
            f"{prefix}/{name}/{key}": value
            for prefix, modules in (("ema", self.ema.modules), ("raw", self.modules))
            for name, module in modules.items()
            for key, value in module.state_dict().items()
        }
        training, optimizers = {}, {}
        for name, (optimizer, _) in self.optimizers.items():
            tensors, optimizers[name] = checkpoints.optimizer_state(name, optimizer)
            training |= tensors
        rng_tensors, rng = checkpoints.rng_state()
        state = {
            "step": step,
            "optimizers": optimizers,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "rng": rng,
            "validation": history,
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        }
        return checkpoints.save_checkpoint(run_dir, step, weights, training | rng_tensors, state, described, keep)

    def restore(self, folder: Path, described: dict[str, Any]) -> dict[str, Any]:
        """Load a checkpoint of the same method and data; returns its state.json."""
        saved = checkpoints.read_config(folder)
        for section in ("method", "data"):
            if saved.get(section) != described[section]:
                raise CrossdiffError(
                    f"{folder}: the checkpoint's {section} settings differ from this run's "
                    f"({saved.get(section)} vs {described[section]}); resume with the settings it was trained with"
                )
        state = checkpoints.read_state(folder)
        weights, _ = checkpoints.read_tensors(folder / checkpoints.MODEL_FILE)
        training, _ = checkpoints.read_tensors(folder / checkpoints.TRAINING_FILE)
        try:
            for prefix, modules in (("raw", self.modules), ("ema", self.ema.modules)):
                groups = checkpoints.split_prefix(weights, prefix)
                for name, module in modules.items():
                    module.load_state_dict(groups[name])
        except (KeyError, RuntimeError, ValueError) as error:
            raise InputError(folder / checkpoints.MODEL_FILE, f"weights do not fit this run ({error_summary(error)})") from None
        try:
            for name, (optimizer, _) in self.optimizers.items():
                checkpoints.load_optimizer_state(optimizer, name, training, state["optimizers"][name])
            if state["scaler"] is not None:
                self.scaler.load_state_dict(state["scaler"])
            checkpoints.restore_rng(training, state["rng"])
        except (CrossdiffError, KeyError, TypeError, ValueError, IndexError, RuntimeError, OverflowError) as error:
            problem = f"training state does not fit this run ({type(error).__name__}: {error_summary(error)})"
            raise InputError(folder / checkpoints.STATE_FILE, problem) from None
        return state


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# ---------------------------------------------------------------------------------------- DDP


@dataclass(frozen=True)
class _World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    started: bool = False  # this call initialised the process group, so it also tears it down

    @property
    def main(self) -> bool:
        return self.rank == 0


def _join_world(device: torch.device) -> _World:
    """Join the torchrun job described by the environment (WORLD_SIZE > 1); a single process otherwise."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return _World()
    started = not dist.is_initialized()
    if started:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(hours=2))  # rank 0 validates while the others wait
    return _World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), started)


def _wrap(method: Method, modules: dict[str, nn.Module], world: _World, device: torch.device) -> None:
    """Put a DDP wrapper in place of each network, under the attribute name the method uses."""
    for name, module in modules.items():
        if any(p.requires_grad for p in module.parameters()):
            ids = [device.index] if device.type == "cuda" else None
            setattr(method, name, DistributedDataParallel(module, device_ids=ids))


def _unwrap(method: Method, modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        setattr(method, name, module)


def _mean_over_ranks(values: dict[str, float], world: _World, device: torch.device) -> dict[str, float]:
    if world.size == 1 or not values:
        return values
    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(values, (tensor / world.size).tolist()))


# ---------------------------------------------------------------------------------- validation


@contextlib.contextmanager
def inference_modules(method: Method, modules: dict[str, nn.Module]) -> Iterator[None]:
    """Run the method on `modules` (e.g. the EMA copies) in eval mode, then restore its own networks."""
    own = {name: (getattr(method, name), getattr(method, name).training) for name in modules}
    for name, module in modules.items():
        setattr(method, name, module.eval())
    try:
        yield
    finally:
        for name, (module, training) in own.items():
            setattr(method, name, module)
            module.train(training)


@torch.no_grad()
def validate(method: Method, dataset: Dataset, config: TrainConfig, device: torch.device) -> dict[str, float]:
    """Mean validation loss, and MAE and PSNR on the [-1, 1] scale inside the mask (peak-to-peak 2); the
    spread (std) of the prediction and of the target inside the mask, which tells a collapsed model.
    Items with a target 'code' (multi-target datasets) are translated into their own target."""
    generator = torch.Generator(device).manual_seed(stream_seed(config.seed, VALIDATION_STREAM))
    loss = error = squared = pixels = 0.0
    moments = torch.zeros(4, dtype=torch.float64)  # sums of prediction, prediction^2, target, target^2 in the mask
    extras: dict[str, float] = {}  # the method's own validation measures, weighted by batch size
    count = 0
    for batch in DataLoader(dataset, batch_size=config.batch_size, num_workers=config.num_workers):
        batch = _to_device(batch, device)
        size = batch["source"].shape[0]
        with _autocast(device, config.precision):
            loss += method.validation_loss(batch, generator) * size
            prediction = _validation_translation(method, batch, generator, config.val_options)
            for key, value in method.validation_metrics(batch, generator).items():
                extras[f"val_{key}"] = extras.get(f"val_{key}", 0.0) + value * size
        inside = batch["mask"] > 0.5
        difference = (prediction.float() - batch["target"].float()) * batch["mask"]
        error += float(difference.abs().sum())
        squared += float(difference.square().sum())
        pixels += float(batch["mask"].sum())
        predicted, target = prediction.float()[inside].double().cpu(), batch["target"].float()[inside].double().cpu()
        moments += torch.stack([predicted.sum(), predicted.square().sum(), target.sum(), target.square().sum()])
        count += size
    mse = squared / max(pixels, 1.0)
    n = max(pixels, 1.0)
    spread = [math.sqrt(max(float(moments[i + 1]) / n - (float(moments[i]) / n) ** 2, 0.0)) for i in (0, 2)]
    return {
        "val_loss": loss / max(count, 1),
        "val_mae": error / max(pixels, 1.0),
        "val_psnr": 10.0 * math.log10(4.0 / mse) if mse > 0 else math.inf,
        "val_pred_std": spread[0],
        "val_target_std": spread[1],
        **{key: total / max(count, 1) for key, total in extras.items()},
    }


def collapse_warning(record: dict[str, float]) -> str | None:
    """A warning when validation shows a near-constant output: a model that has collapsed onto one value
    (e.g. a tanh output stuck at the floor of a zero-background brain) still reports a plausible loss."""
    predicted, target = record.get("val_pred_std"), record.get("val_target_std")
    if predicted is None or not target or predicted >= COLLAPSE_FRACTION * target:
        return None
    return (f"validation output is near-constant at step {int(record['step'])} (std {predicted:.4f} inside the mask "
            f"against {target:.4f} in the target): the model has collapsed onto one value; more steps rarely help. "
            "For regression methods try method: {output: clamp, masked_loss: true} or a higher lr")


def _validation_translation(method: Method, batch: dict[str, Any], generator: torch.Generator,
                            options: dict[str, Any]) -> torch.Tensor:
    """One draw per item; items of a multi-target batch are translated code by code, each into its target."""
    codes = batch.get("code")
    if codes is None:
        return method.translate(batch["source"], generator, samples=1, **options).mean
    prediction = torch.empty_like(batch["target"])
    for code in dict.fromkeys(codes):
        rows = [i for i, item in enumerate(codes) if item == code]
        prediction[rows] = method.translate(batch["source"][rows], generator, samples=1, target=code, **options).mean.to(
            prediction.dtype)
    return prediction


# ----------------------------------------------------------------------------------- reporting


class _Log:
    """metrics.jsonl (one JSON object per line) and a line on stderr, from the main process only."""

    def __init__(self, run_dir: Path, enabled: bool, console: Console) -> None:
        self.path, self.enabled, self.console = run_dir / METRICS_LOG, enabled, console

    def keep_until(self, step: int) -> None:
        """On resume, drop what a killed run logged after its last checkpoint (and a torn last line)."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                if json.loads(line).get("step", math.inf) <= step:
                    kept.append(line)
        write_text(self.path, "".join(f"{line}\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
        self.console.print(text, highlight=False)


class _Running:
    """Mean of the logged losses since the last log line, and the step rate per wall second and per
    second of this process's CPU time (which another process on the same cores does not slow down: what
    an equal compute budget is measured in, crossdiff.evaluation.benchmark)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.since = time.perf_counter()
        self.cpu_since = time.process_time()

    def add(self, losses: dict[str, float]) -> None:
        for key, value in losses.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1

    def take(self) -> tuple[dict[str, float], dict[str, float]]:
        means = {key: value / max(self.count, 1) for key, value in self.sums.items()}
        rates = {"steps_per_s": self.count / max(time.perf_counter() - self.since, 1e-9),
                 "steps_per_cpu_s": self.count / max(time.process_time() - self.cpu_since, 1e-9)}
        self._reset()
        return means, rates


def _progress(console: Console, enabled: bool) -> Progress:
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn()]
    return Progress(*columns, console=console, transient=True, disable=not (enabled and console.is_terminal))


# --------------------------------------------------------------------------------- checkpoints


def model_config(method: Method, config: TrainConfig, extra: dict[str, Any]) -> dict[str, Any]:
    """config.yaml: the method, its data shape, the training settings and the caller's sections
    (slices, preparation, scalings: see crossdiff.inference.ModelSpec)."""
    return checkpoints.plain({
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "method": {"name": method.name, "config": method.config},
        "data": asdict(method.data),
        "training": config.to_dict(),
        **extra,
    })


# ---------------------------------------------------------------------------------------- loop


def train(
    method: Method,
    train_set: Dataset,
    val_set: Dataset | None,
    config: TrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    extra_config: dict[str, Any] | None = None,
    console: Console | None = None,
) -> TrainResult:
    """Train `method` for `config.steps` steps (in total, counting the steps a resumed run already did).

    Under torchrun (WORLD_SIZE > 1) every process runs this with the same arguments; rank 0 alone
    validates, logs and writes checkpoints. `extra_config` sections are saved in every checkpoint's
    config.yaml (and RUN_DIR/config.yaml) beside the method and training settings.
    """
    run_dir = Path(run_dir)
    check_translate_options(method, config.val_options)
    device = resolve_device(config.device)
    if config.precision == "fp16" and device.type != "cuda":
        raise CrossdiffError("precision 'fp16' needs a CUDA GPU; use 'bf16' on the CPU")
    world = _join_world(device)
    if world.size > 1 and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    modules = dict(method.modules())
    try:
        return _run(method, modules, train_set, val_set, config, run_dir, resume, extra_config or {}, device, world,
                    console or Console(stderr=True))
    finally:
        _unwrap(method, modules)
        if world.started:
            dist.destroy_process_group()


def _run(method: Method, modules: dict[str, nn.Module], train_set: Dataset, val_set: Dataset | None,
         config: TrainConfig, run_dir: Path, resume: bool, extra: dict[str, Any], device: torch.device,
         world: _World, console: Console) -> TrainResult:
    for module in modules.values():
        module.to(device).train(any(p.requires_grad for p in module.parameters()))  # frozen networks stay in eval
    if world.size > 1:
        _wrap(method, modules, world, device)  # broadcasts rank 0's weights: the EMA must start from those
    state = _TrainingState(method, modules, config, device)
    described = model_config(method, config, extra)
    done, history = _begin(state, run_dir, resume, described, config, world, console)
    log = _Log(run_dir, world.main, console)
    log.keep_until(done)
    batches = _batches(train_set, config, done, world.rank, world.size, pin=device.type == "cuda")
    running, losses, saved = _Running(), {}, None
    with _progress(console, world.main) as bar:
        task = bar.add_task(f"training {method.name}", total=config.steps, completed=done, info="")
        for step in range(done + 1, config.steps + 1):
            generator = torch.Generator(device).manual_seed(stream_seed(config.seed, step, world.rank))
            context = StepContext(partial(state.apply, step=step), generator, device, step)
            with _autocast(device, config.precision):
                logged = method.training_step(_to_device(next(batches), device), context)
            _refuse_non_finite(logged, method.name, step, run_dir)
            running.add(logged)
            last = step == config.steps
            if step % config.log_every == 0 or last:
                means, rates = running.take()
                losses = _mean_over_ranks(means, world, device)
                log.write({"step": step, **losses, **rates})
                bar.update(task, info="  ".join(f"{k} {v:.4f}" for k, v in losses.items())
                           + f"  {rates['steps_per_s']:.1f} steps/s")
            if val_set is not None and config.validate and world.main and (step % config.val_every == 0 or last):
                with inference_modules(method, state.ema.modules):
                    history.append({"step": step, **validate(method, val_set, config, device)})
                log.write(history[-1])
                warning = collapse_warning(history[-1])
                if warning is not None:
                    log.write({"step": step, "warning": warning})
                    console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
            if world.main and (step % config.checkpoint_every == 0 or last):
                saved = state.save(run_dir, step, history, described, config.keep_checkpoints)
            bar.update(task, completed=step)
    return TrainResult(max(done, config.steps), losses, history, saved or checkpoints.latest_checkpoint(run_dir))


def _refuse_non_finite(logged: dict[str, float], name: str, step: int, run_dir: Path) -> None:
    """Stop at the first NaN or infinite loss: the weights are gone by then, and training on would log a
    thousand NaN steps and hand a broken model to whatever translates or scores next."""
    bad = {key: value for key, value in logged.items() if not math.isfinite(float(value))}
    if bad:
        terms = ", ".join(f"{key} {value}" for key, value in bad.items())
        raise CrossdiffError(f"{run_dir}: {name}'s training loss is not finite at step {step} ({terms}); the run "
                             "stops here with its last checkpoint kept. Try precision fp32 or a lower learning rate")


def _begin(state: _TrainingState, run_dir: Path, resume: bool, described: dict[str, Any], config: TrainConfig,
           world: _World, console: Console) -> tuple[int, list[dict[str, float]]]:
    """Steps already done and validation history: restored from the latest checkpoint, or a fresh seeded
    start (which refuses to train over an existing run)."""
    latest = checkpoints.latest_checkpoint(run_dir)
    if resume and latest is None:
        raise CrossdiffError(f"{run_dir}: nothing to resume, the run has no checkpoint yet")
    if not resume and latest is not None:
        raise CrossdiffError(f"{run_dir} already holds a trained run; pass --resume to continue it or choose a new folder")
    done, history = 0, []
    if latest is not None:
        saved = state.restore(latest, described)
        done, history = int(saved["step"]), list(saved["validation"])
        if done > config.steps:
            raise CrossdiffError(f"{latest}: the checkpoint is at step {done}, beyond this run's {config.steps} steps")
        if saved["world_size"] != world.size and world.main:
            console.print(f"note: resuming a {saved['world_size']}-process run with {world.size}: the batch order changes")
    else:
        seed_everything(config.seed)
    if world.main:
        checkpoints.write_yaml(run_dir / RUN_CONFIG, described)
    return done, history
