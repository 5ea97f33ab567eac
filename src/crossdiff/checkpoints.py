"""Checkpoint folders: written whole or not at all, readable without pickle.

    RUN_DIR/checkpoints/step-0001000/
        model.safetensors     'ema/<module>/<param>' (the weights inference uses) and 'raw/<module>/<param>'
        training.safetensors  optimiser state tensors 'optimizer/<name>/<param id>/<key>', RNG states 'rng/...'
        state.json            step, optimiser hyper-parameters, gradient-scaler state, Python/NumPy RNG states
        config.yaml           everything needed to rebuild and run the model (method, data, scalings, training)
    RUN_DIR/checkpoints/latest -> step-0001000

`export_checkpoint` writes the shippable subset (config.yaml, EMA weights, a training record).

A folder is filled under a temporary name and renamed into place, and `latest` is re-pointed with one
rename, so a run killed at any moment leaves the previous checkpoint intact and `latest` valid.
Tensors live in safetensors files and everything else in JSON/YAML: loading never runs pickle.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from crossdiff.atomic import atomic_directory, check_writable, fsync_folder, remove_stale, write_json, write_text
from crossdiff.config_schema import check_section, check_value, read_json, read_yaml
from crossdiff.errors import CrossdiffError, InputError, error_summary
from crossdiff.file_checks import file_status, is_regular_file

CHECKPOINTS = "checkpoints"
LATEST = "latest"
MODEL_FILE = "model.safetensors"
TRAINING_FILE = "training.safetensors"
STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
RECORD_FILE = "training-record.json"  # how an exported model was made
STEP_NAME = re.compile(r"step-(\d{7,})\Z")

Tensors = dict[str, torch.Tensor]


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def save_checkpoint(
    run_dir: Path, step: int, model: Tensors, training: Tensors, state: dict[str, Any], config: dict[str, Any], keep: int
) -> Path:
    """Write one checkpoint atomically, point `latest` at it, and delete all but the newest `keep`."""
    root = Path(run_dir) / CHECKPOINTS
    destination = root / step_name(step)
    with atomic_directory(destination) as tmp:
        save_file(_detached(model), str(tmp / MODEL_FILE), metadata={"step": str(step)})
        save_file(_detached(training), str(tmp / TRAINING_FILE), metadata={"step": str(step)})
        write_json(tmp / STATE_FILE, state)
        write_yaml(tmp / CONFIG_FILE, config)
    _point_latest(root, destination.name)
    _prune(root, keep)
    return destination


def export_checkpoint(checkpoint: Path, destination: Path, record: dict[str, Any] | None = None) -> Path:
    """A folder to ship or share: config.yaml and the EMA weights only (no optimiser or RNG state, a
    third of the size), plus an optional training record. `load_model` reads it like any checkpoint."""
    check_writable(destination)
    folder = checkpoint_folder(Path(checkpoint))
    config = read_config(folder)
    tensors, metadata = read_tensors(folder / MODEL_FILE)
    weights = {key: value for key, value in tensors.items() if key.startswith("ema/")}
    if not weights:
        raise InputError(folder / MODEL_FILE, "holds no EMA weights to export")
    with atomic_directory(destination) as tmp:
        save_file(weights, str(tmp / MODEL_FILE), metadata=metadata)
        write_yaml(tmp / CONFIG_FILE, config)
        if record is not None:
            write_json(tmp / RECORD_FILE, record)
    return Path(destination)


def plain(value: Any) -> Any:
    """Tuples become lists, recursively: what YAML and JSON hold, so saved and live settings compare equal."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def write_yaml(path: Path, payload: dict[str, Any]) -> None:
    write_text(path, yaml.safe_dump(plain(payload), sort_keys=False, default_flow_style=None))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `latest` points to, or None when the run has none yet; a `latest` that points
    anywhere but to a step-N folder of this run is refused (a crafted link must not redirect a resume)."""
    root = Path(run_dir) / CHECKPOINTS
    link = root / LATEST
    if not os.path.lexists(link):
        return None
    try:
        target = link.resolve(strict=True)
    except (OSError, RuntimeError):  # a dangling link, or one that loops
        raise InputError(link, "does not point to a checkpoint folder of this run (the link is broken)") from None
    if target.parent != root.resolve() or not STEP_NAME.match(target.name) or not target.is_dir():
        raise InputError(link, "does not point to a checkpoint folder of this run (step-NNNNNNN beside it)")
    return target


def checkpoint_folder(path: Path) -> Path:
    """Accept a checkpoint folder, its `latest` link, or a run folder (its latest checkpoint)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise InputError(path, "checkpoint does not exist")
    file_status(path)  # a name too long, a folder without permission: said here, not as a traceback
    if (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise InputError(path, "this run has no checkpoint yet")
        return latest
    if (path / CONFIG_FILE).is_file():
        return path.resolve()
    raise InputError(path, f"not a crossdiff checkpoint: no {CONFIG_FILE} and no {CHECKPOINTS} folder")


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not os.path.lexists(path):
        raise InputError(path, "checkpoint configuration is missing")
    config = read_yaml(path, "checkpoint configuration")
    if not isinstance(config, dict):
        raise InputError(path, "checkpoint configuration is not a mapping")
    return config


@dataclass
class _State:
    """The types of state.json (what `_TrainingState.save` writes), checked before a run resumes from it."""

    step: int
    optimizers: dict[str, dict[str, Any]]
    scaler: dict[str, Any] | None
    rng: dict[str, list[Any]]
    validation: list[dict[str, float]]
    world_size: int


def read_state(folder: Path) -> dict[str, Any]:
    """state.json of a checkpoint, its structure checked: the step a resumed run continues from must be a
    whole number >= 0 that agrees with the folder's name (a crafted 'step: 1e12' would end the run at once)."""
    path = Path(folder) / STATE_FILE
    if not os.path.lexists(path):
        raise InputError(path, "training state is missing; this checkpoint cannot resume training")
    state = read_json(path, "training state")
    try:
        check_section("state", state, _State)
    except CrossdiffError as error:
        raise InputError(path, f"training state is corrupt: {error}") from None
    named = STEP_NAME.match(Path(folder).name)
    if state["step"] < 0 or state["world_size"] < 1 or (named is not None and int(named.group(1)) != state["step"]):
        raise InputError(path, f"training state is corrupt: step {state['step']} (world size {state['world_size']}) "
                               f"in checkpoint {Path(folder).name}")
    if not {"python", "numpy"} <= set(state["rng"]):
        raise InputError(path, "training state is corrupt: its random-number states are missing")
    return state


def read_tensors(path: Path) -> tuple[Tensors, dict[str, str]]:
    """Tensors and metadata of a safetensors file, on the CPU; a missing, truncated or foreign file is an
    InputError naming it."""
    with _safetensors(path) as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor of a safetensors file, read from its header alone (nothing allocated)."""
    with _safetensors(path) as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


@contextlib.contextmanager
def _safetensors(path: Path) -> Iterator[Any]:
    path = Path(path)
    if not is_regular_file(path):
        missing = not os.path.lexists(path)
        raise InputError(path, "checkpoint file is missing" if missing else "checkpoint file is not a regular file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            yield handle
    except InputError:
        raise
    except Exception as error:  # safetensors (Rust) raises its own and Python errors on damaged headers; no code runs
        raise InputError(path, f"checkpoint file is corrupt or not a safetensors file ({error_summary(error)})") from None


def split_prefix(tensors: Tensors, prefix: str) -> dict[str, Tensors]:
    """'prefix/<group>/<rest>' -> {group: {rest: tensor}} (e.g. the EMA weights per module)."""
    groups: dict[str, Tensors] = {}
    for key, tensor in tensors.items():
        if key.startswith(prefix + "/"):
            group, rest = key[len(prefix) + 1 :].split("/", 1)
            groups.setdefault(group, {})[rest] = tensor
    return groups


def optimizer_state(name: str, optimizer: torch.optim.Optimizer) -> tuple[Tensors, dict[str, Any]]:
    """Split an optimiser's state dict into tensors ('optimizer/<name>/<param id>/<key>') and JSON."""
    state = optimizer.state_dict()
    tensors: Tensors = {}
    plain: dict[str, dict[str, Any]] = {}
    for param_id, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{name}/{param_id}/{key}"] = value
            else:
                plain.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "state": plain}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, name: str, tensors: Tensors, plain: dict[str, Any]
) -> None:
    """Restore a state saved by `optimizer_state`, after checking that it fits `optimizer`: torch takes
    any param_groups (a missing 'betas' surfaces only as a KeyError at the next step) and any tensor shapes."""
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in plain["state"].items()}
    for rest, value in split_prefix(tensors, "optimizer").get(name, {}).items():
        param_id, key = rest.split("/", 1)
        state.setdefault(int(param_id), {})[key] = value
    _check_optimizer_fit(optimizer, name, plain["param_groups"], state)
    optimizer.load_state_dict({"state": state, "param_groups": plain["param_groups"]})


def _check_optimizer_fit(optimizer: torch.optim.Optimizer, name: str, groups: Any, state: dict[int, dict[str, Any]]) -> None:
    current = optimizer.state_dict()["param_groups"]
    if not isinstance(groups, list) or len(groups) != len(current):
        raise ValueError(f"optimizer {name}: {len(current)} parameter group(s) expected")
    for index, (saved, live) in enumerate(zip(groups, current)):
        if not isinstance(saved, dict) or set(saved) != set(live) or len(saved["params"]) != len(live["params"]):
            raise ValueError(f"optimizer {name}: parameter group {index} has other settings or parameters than this run's")
        for key, value in saved.items():
            check_value(f"optimizers.{name}.param_groups[{index}].{key}", value, live[key])
    shapes = [p.shape for group in optimizer.param_groups for p in group["params"]]
    for param_id, entries in state.items():
        if not 0 <= param_id < len(shapes):
            raise ValueError(f"optimizer {name}: state for parameter {param_id}, which this run does not have")
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.ndim and value.shape != shapes[param_id]:
                raise ValueError(f"optimizer {name}: {key} of parameter {param_id} has shape {tuple(value.shape)}, "
                                 f"the parameter {tuple(shapes[param_id])}")


def rng_state() -> tuple[Tensors, dict[str, Any]]:
    """Every global random stream: torch (CPU and each GPU) as tensors, Python and NumPy as JSON."""
    tensors = {"rng/cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors |= {f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return tensors, {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(position), int(has_gauss), float(cached)],
    }


def restore_rng(tensors: Tensors, plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng/cpu"])
    cuda_keys = sorted((key for key in tensors if key.startswith("rng/cuda/")), key=lambda key: int(key.rsplit("/", 1)[1]))
    cuda = [tensors[key] for key in cuda_keys]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))


def _detached(tensors: Tensors) -> Tensors:
    """CPU copies: safetensors refuses tensors that share memory (raw and EMA weights are one when EMA is off)."""
    return {key: value.detach().to("cpu", copy=True).contiguous() for key, value in tensors.items()}


def _point_latest(root: Path, name: str) -> None:
    """Re-point `latest` with a rename, which replaces the old link in one step, and flush the folder:
    `latest` is only renamed once the checkpoint it names is on the disk."""
    remove_stale(root, f".{LATEST}.")
    tmp = root / f".{LATEST}.{os.getpid()}.link.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(name)
    os.replace(tmp, root / LATEST)
    fsync_folder(root)


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.iterdir() if STEP_NAME.match(p.name) and p.is_dir())
    for old in steps[: max(len(steps) - keep, 0)]:
        shutil.rmtree(old, ignore_errors=True)

