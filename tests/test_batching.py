"""Batching changes nothing: every stochastic method's volume draws, for a seed, are the same whatever
the batch size, and the first k draws of an n-draw run are a k-draw run (crossdiff.diffusion.streams).

The random numbers are bit-identical (every item has its own stream); the arithmetic is not quite: on
the CPU, oneDNN/MKL pick their matmul and convolution kernels by batch size, and a row's sums then round
differently (one nn.Linear row: 5e-7 apart between batches of 1 and 4). Volumes are therefore compared
within ROUNDING_HU, far below what another draw changes (tens to hundreds of HU; drawing every row from
one generator instead fails every method here); measured on these tiny networks: at most 3e-3 HU.

Each method is a tiny untrained network (its weights are random but fixed, which is all the property
needs) translating two real slices of the bundled patient's MR; items are (slice, draw) pairs, so a
batch of 4 splits the 6 items of a 3-draw run across slices and draws, and batches of 1 and 6 do
neither. Also checked here: what `--precision auto` means on the CPU, a benchmark's `evaluation.precision`,
and the per-stage demo timings.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SAMPLE, SARCOMA_MR_CT, assert_clear_failure, crossdiff

from crossdiff import read_volume
from crossdiff.acceleration import Acceleration, BatchSizer
from crossdiff.data.cases import PreparationConfig, prepare_case
from crossdiff.data.manifest import CaseEntry
from crossdiff.data.slices import SliceConfig
from crossdiff.demo import MODEL_FOLDER, SAMPLE_DIR
from crossdiff.diffusion.streams import ItemStreams
from crossdiff.errors import CrossdiffError
from crossdiff.evaluation.benchmark import _translate
from crossdiff.evaluation.benchmark_config import load_benchmark_config
from crossdiff.inference import LoadedModel, ModelSpec, translate_volume
from crossdiff.masks import body_mask
from crossdiff.methods import get_method
from crossdiff.methods.base import DataSpec
from crossdiff.training import seed_everything
from crossdiff.volumes import Volume

PREPARATION = PreparationConfig(modalities=["mr", "ct"], reference="ct")
DENOISER = {"channels": [8, 8], "attention_levels": [False, True], "norm_num_groups": 4, "num_head_channels": 8}
TRANSLATOR = {"filters": 8, "blocks": 1}
SYNDIFF = {"channels": [8, 16], "discriminator_channels": [8, 16], "latent": 8, "embedding": 16}
# method -> (settings, 2.5-D context); few sampler steps each, at the method's default sampler
TINY: dict[str, tuple[dict, int]] = {
    "cddpm": ({**DENOISER, "steps": 3}, 1),
    "score-sde": ({**DENOISER, "steps": 3}, 1),
    "syndiff": (SYNDIFF, 1),
    "syndiff-unpaired": ({**SYNDIFF, **TRANSLATOR, "critic_filters": 8, "critic_layers": 2}, 0),
    "cldm": ({"stage": "diffusion", "targets": ["ct"], "scale_factor": 1.0, "steps": 3,
              "autoencoder": {"channels": [8, 8], "norm_num_groups": 4},
              "channels": [8, 8], "attention_levels": [False, False], "norm_num_groups": 4}, 1),
    "bridge": ({**DENOISER, "steps": 3}, 1),
    "rflow": ({**DENOISER, "steps": 3}, 1),
    "cddpm-distill": ({"rounds": 1, "round_steps": 1, "steps": 2}, 1),
    "munit": ({**TRANSLATOR, "blocks": 2, "mlp_dim": 16, "discriminator_filters": 8, "discriminator_layers": 2}, 0),
    "cycle-ddpm": ({**DENOISER, **TRANSLATOR, "critic_filters": 8, "critic_layers": 2, "steps": 3}, 0),
    "unit-ddpm": ({**DENOISER, **TRANSLATOR, "steps": 3}, 0),
}
STOCHASTIC = tuple(TINY)
FP32 = Acceleration(precision="fp32")
ROUNDING_HU = 0.01


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    entry = CaseEntry(images={"ct": SAMPLE / "ct.nii.gz", "mr": SAMPLE / "mr.nii.gz"})
    return prepare_case("STS_003", entry, PREPARATION, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def mr() -> Volume:
    return read_volume(SAMPLE / "mr.nii.gz")


@pytest.fixture(scope="module")
def two_slices(mr) -> Volume:
    """The body on two axial slices: the items translated in every run of this file."""
    body = body_mask(mr)
    keep = np.zeros_like(body.array)
    keep[20:22] = body.array[20:22]
    assert keep[20].any() and keep[21].any()
    return replace(body, array=keep)


def tiny_model(name: str, case) -> LoadedModel:
    settings, context = TINY[name]
    slices = SliceConfig(size=(32, 32), fit="resize", context=context)
    data = DataSpec(slices.channels, 1, slices.size)
    if name == "cddpm-distill":
        settings = {**settings, "teacher_config": get_method("cddpm")({**DENOISER, "prediction": "v"}, data).config}
    seed_everything(0)
    method = get_method(name)(settings, data)
    for module in method.modules().values():
        module.eval()
        for weight in module.parameters():
            if weight.ndim > 1 and not weight.any():  # MONAI zero-initialises output layers: a constant x0 would
                weight.data.normal_(0.0, 0.05)  # make every draw the same, and the test unable to fail
    spec = ModelSpec.from_cases([case], "mr", "ct", slices, PREPARATION)
    return LoadedModel(method, spec, Path("untrained"), None, torch.device("cpu"))


def draws(model: LoadedModel, mr: Volume, mask: Volume, samples: int, batch_size: int | None) -> np.ndarray:
    result = translate_volume(model, mr, samples=samples, mask=mask, seed=11, batch_size=batch_size,
                              keep_samples=True, acceleration=FP32)
    return np.stack([draw.array for draw in result.samples])


@pytest.mark.parametrize("name", STOCHASTIC)
def test_the_batch_size_and_the_number_of_draws_change_no_draw(name, case, mr, two_slices):
    model = tiny_model(name, case)
    one_at_a_time = draws(model, mr, two_slices, 3, 1)
    across = draws(model, mr, two_slices, 3, 4)  # batches cut across slices and draws
    fewer = draws(model, mr, two_slices, 2, None)  # the device's batch, fewer draws
    assert np.abs(across - one_at_a_time).max() <= ROUNDING_HU
    assert np.abs(fewer - one_at_a_time[:2]).max() <= ROUNDING_HU
    inside = two_slices.array.astype(bool)
    assert np.abs(one_at_a_time[0] - one_at_a_time[1])[inside].max() > 100 * ROUNDING_HU  # the draws do differ


def test_another_seed_gives_other_draws(case, mr, two_slices):
    model = tiny_model("syndiff", case)
    first, other = (translate_volume(model, mr, samples=2, mask=two_slices, seed=seed, acceleration=FP32).mean.array
                    for seed in (11, 12))
    assert not np.array_equal(first, other)


def test_a_benchmark_translates_at_its_evaluation_precision(case, mr, two_slices, tmp_path):
    """`evaluation.precision` reaches every translation of a benchmark (held-out cases, noise, timing, tuning)."""
    config = tmp_path / "bench.yaml"
    config.write_text(SARCOMA_MR_CT + "test: [STS_003]\nmethods: [{method: cddpm}]\nevaluation: {precision: bf16, seed: 11}\n")
    model = tiny_model("cddpm", case)
    benchmarked = _translate(load_benchmark_config(config), model, mr, two_slices, samples=2).mean.array
    bf16, fp32 = (translate_volume(model, mr, samples=2, mask=two_slices, seed=11, target="ct",
                                   acceleration=Acceleration(precision=precision)).mean.array for precision in ("bf16", "fp32"))
    assert np.array_equal(benchmarked, bf16)
    assert np.abs(benchmarked - fp32).max() > ROUNDING_HU  # bf16 rounding shows: the precision was applied


def test_item_streams_give_each_row_its_own_numbers():
    keys = [(0, 0), (0, 1), (5, 0)]
    together = ItemStreams(3, keys, "cpu").normal((3, 2, 4), torch.float32)
    alone = torch.cat([ItemStreams(3, [key], "cpu").normal((1, 2, 4), torch.float32) for key in keys])
    assert torch.equal(together, alone) and not torch.equal(together[0], together[1])
    with pytest.raises(CrossdiffError, match="one row per item"):
        ItemStreams(3, keys, "cpu").normal((2, 4), torch.float32)


def test_cpu_auto_precision_is_fp32_and_bad_settings_are_refused():
    cpu = torch.device("cpu")
    assert Acceleration().resolved(cpu) == "fp32"  # bf16 measured no faster on this CPU (benchmarks/results/speed.md)
    assert Acceleration(precision="bf16").dtype(cpu) == torch.bfloat16
    with pytest.raises(CrossdiffError, match="fp16 needs a GPU"):
        Acceleration(precision="fp16").resolved(cpu)
    with pytest.raises(CrossdiffError, match="precision must be one of"):
        Acceleration(precision="fp8")
    with pytest.raises(CrossdiffError, match="batch size must be >= 1"):
        BatchSizer(0, cpu, 64 * 64)
    assert BatchSizer(None, cpu, 64 * 64).batch == 16 and BatchSizer(None, cpu, 256 * 256).batch == 1


def test_translate_refuses_a_precision_the_device_lacks_before_reading_the_input(tmp_path):
    out = tmp_path / "sct.nii.gz"
    result = crossdiff("translate", "--model", SAMPLE_DIR / MODEL_FOLDER, "--input", SAMPLE / "mr.nii.gz", "--output", out,
                       "--precision", "fp16", "--device", "cpu")
    assert_clear_failure(result, "precision fp16 needs a GPU")
    assert not out.exists()


def test_a_latent_method_batches_by_its_latent_grid(case, mr, two_slices, monkeypatch):
    """cldm's steps run on the latent grid (1/f of the slice per side): its CPU batches hold f^2 times the
    items an image-space method's do, or its 50 small steps would go one item at a time."""
    model = tiny_model("cldm", case)
    factor = model.method.factor
    assert factor > 1 and model.method.sampling_pixels((256, 256)) == (256 // factor) ** 2
    assert tiny_model("cddpm", case).method.sampling_pixels((256, 256)) == 256 * 256
    monkeypatch.setattr("crossdiff.acceleration.CPU_BATCH_PIXELS", (32 // factor) ** 2 * 6)  # six latent items
    calls = []
    translate = model.method.translate
    monkeypatch.setattr(model.method, "translate", lambda *a, **k: calls.append(len(a[0])) or translate(*a, **k))
    translate_volume(model, mr, samples=3, mask=two_slices, seed=11, acceleration=FP32)
    assert calls == [6]  # by image pixels (32 x 32 each) it would have been one item per call
