"""Helpers for tests that run the real `crossdiff` command line in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "src" / "crossdiff" / "sample" / "STS_003"
SHARED_DATA = Path(os.environ.get("CROSSDIFF_SHARED_DATA", REPO.parent / "shared" / "data"))
SARCOMA = SHARED_DATA / "sarcoma-ct-mr-pet"
SARCOMA_MR_CT = f"data: {SARCOMA}\nlayout: modality-folders\nsource: mr\ntarget: ct\n"  # a benchmark config's head
BRAIN = SHARED_DATA / "brain-multicontrast-mri"
BRAINWEB = SHARED_DATA / "brainweb-t1-pd-slices"


def require_shared() -> None:
    """Skip without ../shared/data on a developer's machine; in CI (CI=true) its absence is a failure."""
    if SHARED_DATA.is_dir():
        return
    message = f"shared data not found at {SHARED_DATA} (set CROSSDIFF_SHARED_DATA)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


needs_shared = pytest.mark.skipif(
    not SHARED_DATA.is_dir() and not os.environ.get("CI"), reason=f"shared data not found at {SHARED_DATA}"
)


def crossdiff(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "crossdiff", *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def assert_clear_failure(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit 1, no traceback, and an error line naming the file and the problem."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:")
    text = " ".join(result.stderr.split())
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def train_straight_and_killed(
    build, train_set, val_set, config, tmp: Path, extra: dict, kill_at: int = 9
) -> tuple[Path, Path]:
    """Train one run straight through, and another that dies at step `kill_at` (after a checkpoint) and is
    resumed by a method with other initial weights (`build(init_seed)`), so everything must come from the
    checkpoint. Returns the two run folders; their final checkpoints must be identical."""
    from crossdiff.checkpoints import latest_checkpoint, step_name
    from crossdiff.training import train

    straight, killed = tmp / "straight", tmp / "killed"
    train(build(0), train_set, val_set, config, straight, extra_config=extra)
    method = build(0)
    learn = method.training_step

    def dies_after_the_checkpoint(batch, context):
        if context.step == kill_at:
            raise KeyboardInterrupt
        return learn(batch, context)

    method.training_step = dies_after_the_checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(method, train_set, val_set, config, killed, extra_config=extra)
    saved = (kill_at - 1) // config.checkpoint_every * config.checkpoint_every
    assert latest_checkpoint(killed).name == step_name(saved)  # the kill left the last checkpoint before it
    train(build(1), train_set, val_set, config, killed, resume=True, extra_config=extra)
    return straight, killed


def assert_loads_its_ema_weights(run: Path, step: int, method) -> None:
    """Every network of a method loaded from `run` holds exactly the EMA weights of its step-`step` checkpoint."""
    from safetensors.torch import load_file

    from crossdiff import checkpoints

    saved = checkpoints.split_prefix(load_file(run / "checkpoints" / checkpoints.step_name(step) / "model.safetensors"), "ema")
    for module, network in method.modules().items():
        for key, value in network.state_dict().items():
            assert (value == saved[module][key]).all(), (module, key)
