"""What a worker does with one input: call the public reader or loader crossdiff would call for it, and
describe what came back (the geometry of an image, the ids of a manifest) or what was raised.

Every target returns plain data (it crosses a process boundary); the campaign compares it with the
seed's and classifies it.
"""

from __future__ import annotations

import traceback
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

TargetFunction = Callable[[Path], dict[str, Any]]


def run(target: str, path: str) -> dict[str, Any]:
    """Call `target` on `path`: {'outcome': 'accepted' | 'clean-error' | 'memory-error' | 'other-exception',
    'observed', 'message', 'exception', 'where', 'warnings'}."""
    from crossdiff.errors import CrossdiffError, InputWarning

    result: dict[str, Any] = {"outcome": "accepted", "observed": None, "message": "", "exception": "", "where": ""}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result["observed"] = TARGETS[target](Path(path))
        except CrossdiffError as error:
            result.update(outcome="clean-error", message=str(error)[:500], exception=type(error).__name__)
        except MemoryError:
            result.update(outcome="memory-error", exception="MemoryError")
        except BaseException as error:  # everything else is what the suite is here to find
            if isinstance(error, KeyboardInterrupt):
                raise
            frames = traceback.extract_tb(error.__traceback__)
            result.update(outcome="other-exception", exception=type(error).__name__, message=str(error)[:500],
                          where=" <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-4:])))
    result["warnings"] = [str(w.message)[:300] for w in caught if issubclass(w.category, InputWarning)]
    return result


def stated_geometry(task: dict[str, Any], result: dict[str, Any]) -> dict[str, Any] | None:
    """For an image accepted with another geometry than its seed's: what an independent reader says the
    file states (oracle.py), or {'error': ...} when it cannot say; None when there is nothing to compare."""
    from . import oracle

    baseline = task.get("baseline")
    if result["outcome"] != "accepted" or task["target"] not in ("volume", "mask") or baseline is None:
        return None
    if oracle.agrees(result["observed"], baseline):
        return None
    try:
        return oracle.geometry(task["format"], Path(task["path"]))
    except Exception as error:  # noqa: BLE001 - the oracle could not read it: crossdiff's reading stands alone
        return {"error": f"{type(error).__name__}: {error}"[:200]}


def _volume(path: Path) -> dict[str, Any]:
    from crossdiff.readers import read_volume

    return _described(read_volume(path))


def _mask(path: Path) -> dict[str, Any]:
    from crossdiff.readers import read_mask

    return _described(read_mask(path))


def _described(volume: Any) -> dict[str, Any]:
    geometry = volume.geometry
    return {"size": list(geometry.size), "spacing": list(geometry.spacing), "origin": list(geometry.origin),
            "direction": list(geometry.direction), "modality": volume.modality, "units": volume.units,
            "range": [float(volume.array.min()), float(volume.array.max())]}


def _manifest(path: Path) -> dict[str, Any]:
    from crossdiff.data.manifest import load_manifest

    manifest = load_manifest(path)
    return {"ids": list(manifest.cases), "files": sorted(str(file) for case in manifest.cases.values()
                                                           for _, file in case.files())[:50]}


def _method_of(path: Path) -> str:
    """The method a train config of the project is written for (its file name says so)."""
    name = path.name
    return next((method for method in ("syndiff", "unet") if method in name), "cddpm")


def _train_config(path: Path) -> dict[str, Any]:
    """What `crossdiff train --config PATH` checks before reading any data."""
    from crossdiff.cli import _check_method_section, _run_settings
    from crossdiff.data.slices import SliceConfig
    from crossdiff.methods import get_method

    settings = _run_settings(path.parent / "no-run", path, False, "mr", ["ct"])
    method = _method_of(path)
    data = get_method(method).training_data(SliceConfig.from_dict(settings["slices"]))
    _check_method_section(method, settings["method"], data, True, path)
    return {"sections": sorted(settings)}


def _benchmark_config(path: Path) -> dict[str, Any]:
    from crossdiff.evaluation.benchmark_config import load_benchmark_config

    config = load_benchmark_config(path)
    return {"ids": [entry.name for entry in config.methods] + list(config.test if isinstance(config.test, list) else [])}


def _checkpoint(path: Path) -> dict[str, Any]:
    from crossdiff.inference import load_model

    model = load_model(path, "cpu")
    return {"method": model.method.name, "source": model.spec.source, "target": model.spec.target}


def _resume(path: Path) -> dict[str, Any]:
    """`crossdiff train --resume` of the 2-step run to 4 steps: checkpoint, state and weights all read back."""
    import os

    from rich.console import Console

    from crossdiff.methods import get_method
    from crossdiff.methods.base import DataSpec
    from crossdiff.training import TrainConfig, train

    from .corpus import TINY_TRAINING, TINY_UNET, tiny_dataset

    method = get_method("unet")(TINY_UNET, DataSpec(1, 1, (16, 16)))
    with open(os.devnull, "w") as quiet:
        result = train(method, tiny_dataset(), None, TrainConfig.from_dict(TINY_TRAINING), path, resume=True,
                       console=Console(file=quiet))
    return {"step": result.step}


def _fid(path: Path) -> dict[str, Any]:
    import numpy as np

    from crossdiff.evaluation.fid import extract_features, load_feature_network

    network = load_feature_network(path)
    features = extract_features(network, np.random.default_rng(0).random((2, 16, 16)))
    return {"features": list(features.shape)}


@cache
def _sample_method() -> Any:
    from crossdiff.inference import load_model

    from .corpus import SAMPLE_MODEL

    return load_model(SAMPLE_MODEL, "cpu").method


def _option(path: Path) -> dict[str, Any]:
    """`crossdiff translate --option TEXT` with the bundled cddpm model: parsed and checked, not run."""
    from crossdiff.config_schema import check_translate_options, parse_option

    key, value = parse_option(path.read_text(encoding="utf-8", errors="surrogateescape"))
    check_translate_options(_sample_method(), {key: value})
    return {"option": [key, repr(value)[:80]]}


TARGETS: dict[str, TargetFunction] = {
    "volume": _volume, "mask": _mask, "manifest": _manifest, "train-config": _train_config,
    "benchmark-config": _benchmark_config, "checkpoint": _checkpoint, "resume": _resume, "fid": _fid, "option": _option,
}
