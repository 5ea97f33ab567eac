"""Volume translation: the input's exact geometry, HU, masks, orientation, spacing, Monte-Carlo draws,
and the `crossdiff train` / `crossdiff translate` commands end to end on real files."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from helpers import SAMPLE
from typer.testing import CliRunner

from crossdiff import read_volume, resample_to
from crossdiff.cli import app
from crossdiff.data.cases import PreparationConfig, prepare_case
from crossdiff.data.manifest import CaseEntry
from crossdiff.data.slices import PairedSliceDataset, SliceConfig
from crossdiff.errors import CrossdiffError, InputError
from crossdiff.inference import LoadedModel, ModelSpec, Reorientation, load_model, training_grid, translate_volume
from crossdiff.masks import body_mask
from crossdiff.methods import get_method
from crossdiff.methods.base import DataSpec, Method, Translation
from crossdiff.training import TrainConfig, seed_everything, train
from crossdiff.volumes import Geometry, Volume

SLICES = SliceConfig(size=(32, 32), fit="resize", context=1)
PREPARATION = PreparationConfig(modalities=["mr", "ct"], reference="ct")
TINY_UNET = {"channels": [8, 16], "strides": [2], "num_res_units": 0, "lr": 2e-3, "masked_loss": True}


@pytest.fixture(scope="module")
def model_case(tmp_path_factory):
    """The bundled patient prepared for training, and its mask (CT body where the MR has data) as a Volume."""
    entry = CaseEntry(images={"ct": SAMPLE / "ct.nii.gz", "mr": SAMPLE / "mr.nii.gz"})
    return prepare_case("STS_003", entry, PREPARATION, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def model(tmp_path_factory, model_case) -> LoadedModel:
    """A tiny unet trained briefly on the bundled patient: enough to map MR to plausible HU."""
    folder = tmp_path_factory.mktemp("run")
    case = model_case
    seed_everything(0)
    method = get_method("unet")(TINY_UNET, DataSpec(SLICES.channels, 1, SLICES.size))
    spec = ModelSpec.from_cases([case], "mr", "ct", SLICES, PREPARATION)
    config = TrainConfig(steps=100, batch_size=4, checkpoint_every=100, log_every=100, device="cpu")
    train_set = PairedSliceDataset([case], "mr", "ct", SLICES, augment=True)
    train(method, train_set, None, config, folder, extra_config=spec.to_sections())
    return load_model(folder, "cpu")


@pytest.fixture(scope="module")
def mr() -> Volume:
    return read_volume(SAMPLE / "mr.nii.gz")


def test_the_output_has_the_inputs_exact_geometry_in_hu(model, model_case, mr):
    result = translate_volume(model, mr)
    assert result.mean.geometry == mr.geometry  # exact, not approximately
    assert result.mean.modality == "CT" and result.mean.units == "HU" and result.mean.array.dtype == np.float32
    assert result.std is None and result.samples is None and result.nfe == 1
    sct = result.mean.array
    assert -1024.0 <= sct.min() and sct.max() <= 3000.0
    # in HU: tissue values where the patient's own CT (brought onto the MR grid) has tissue. Quality is
    # test_training's business; this catches an output left in [-1, 1] or inverted with the MR's scaling
    ct = resample_to(read_volume(SAMPLE / "ct.nii.gz"), mr)
    body = resample_to(Volume(model_case.mask.astype(np.uint8), model_case.geometry), mr, "nearest").array.astype(bool)
    assert abs(np.median(sct[body]) - np.median(ct.array[body])) < 150.0 and sct[body].std() > 20.0


def test_outside_the_mask_is_air_and_empty_slices_are_not_translated(model, mr):
    mask = body_mask(mr)
    mask.array[:10] = 0
    calls = []
    translate = model.method.translate
    model.method.translate = lambda source, *a, **k: calls.append(source.shape[0]) or translate(source, *a, **k)
    try:
        result = translate_volume(model, mr, mask=mask, batch_size=16)
    finally:
        del model.method.translate
    inside = mask.array.astype(bool)
    assert np.all(result.mean.array[~inside] == -1024.0)
    assert sum(calls) == int(inside.any(axis=(1, 2)).sum()) == mr.shape[0] - 10
    unmasked = translate_volume(model, mr)  # its MR scaling is refitted in the automatic body mask: a few HU apart
    assert np.abs(result.mean.array[inside] - unmasked.mean.array[inside]).max() < 5.0


def test_a_reoriented_input_gives_the_same_physical_result(model, mr):
    """The same MR stored in another axis order (sagittal slices first, axes flipped) must be cut into
    the same axial slices the model was trained on, and come back voxel for voxel."""
    mask = body_mask(mr)
    turned = Volume.from_sitk(sitk.DICOMOrient(mr.to_sitk(), "ASL"), "MR", "a.u.")
    turned_mask = Volume.from_sitk(sitk.DICOMOrient(mask.to_sitk(), "ASL"), "mask")
    assert turned.geometry.orientation == "ASL" and turned.shape != mr.shape
    plain = translate_volume(model, mr, mask=mask)
    result = translate_volume(model, turned, mask=turned_mask)
    assert result.mean.geometry == turned.geometry
    back = resample_to(result.mean, mr.geometry, "nearest")  # the grids share voxel centres: a pure permutation
    assert np.allclose(back.array, plain.mean.array, atol=1e-3)


def test_reorientation_round_trips_exactly():
    """Index axes x, y, z of this grid run along -P, +S and +L: in LPS order x is the old z, y the old x
    reversed, z the old y."""
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)  # (z, y, x)
    turn = Reorientation.between((0, 0, 1, -1, 0, 0, 0, 1, 0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    turned = turn.forward(array)
    assert turned.shape == (3, 4, 2)
    assert all(turned[k, j, i] == array[i, k, 3 - j] for k in range(3) for j in range(4) for i in range(2))
    assert np.array_equal(turn.backward(turned), array)
    assert turn.spacing((1.0, 2.0, 3.0)) == (3.0, 1.0, 2.0)


def test_spacing_is_matched_only_on_request_and_the_geometry_is_kept(model, mr):
    coarse = resample_to(mr, Geometry(
        (81, 92, 47), (1.46, 1.46, mr.geometry.spacing[2]), mr.geometry.origin, mr.geometry.direction
    ))
    turn = Reorientation.between(coarse.geometry.direction, model.spec.direction)
    assert training_grid(model.spec, mr.geometry, turn) is None  # trained at this spacing: nothing to do
    grid = training_grid(model.spec, coarse.geometry, turn)
    assert grid is not None and np.allclose(grid.spacing[:2], model.spec.spacing[:2])
    assert grid.spacing[2] == coarse.geometry.spacing[2]
    assert grid.size[:2] == (121, 138) and grid.size[2] == coarse.shape[0]
    matched = translate_volume(model, coarse, match_spacing=True)
    assert matched.mean.geometry == coarse.geometry
    direct = translate_volume(model, coarse)
    assert not np.array_equal(matched.mean.array, direct.mean.array)


def test_requests_a_model_cannot_serve_are_refused(model, mr):
    with pytest.raises(CrossdiffError, match="deterministic"):
        translate_volume(model, mr, samples=4)
    with pytest.raises(CrossdiffError, match="no translation options"):
        translate_volume(model, mr, options={"steps": 10})
    other = body_mask(read_volume(SAMPLE / "ct.nii.gz"))
    with pytest.raises(InputError, match="does not match the input's grid"):
        translate_volume(model, mr, mask=other)


def test_a_model_whose_weights_went_nan_is_refused_not_written(model, mr):
    """What a training on a NaN loss leaves behind: the translation must stop, naming the model."""
    broken = copy.deepcopy(model)
    with torch.no_grad():
        network = next(iter(broken.method.modules().values()))
        next(network.parameters()).fill_(float("nan"))
    with pytest.raises(CrossdiffError, match=r"non-finite values \(NaN or infinity\).*weights are broken"):
        translate_volume(broken, mr)
    assert np.isfinite(translate_volume(model, mr).mean.array).all()  # the intact model is untouched


class NoisyCopy(Method):
    """A stochastic stand-in: the source's centre channel plus seeded noise of a known spread (0.05)."""

    name: ClassVar[str] = "noisy-copy"
    stochastic: ClassVar[bool] = True

    def modules(self) -> dict[str, torch.nn.Module]:
        return {}

    def optimizers(self) -> dict[str, Any]:
        return {}

    def training_step(self, batch, context):
        raise NotImplementedError

    def translate(self, source, generator, samples=1, **options):
        centre = source[:, source.shape[1] // 2 : source.shape[1] // 2 + 1]
        noise = torch.randn((samples, *centre.shape), generator=generator, device=centre.device)
        return Translation(samples=centre[None] + 0.05 * noise, nfe=7)


def test_monte_carlo_draws_give_a_seeded_spread_in_hu(model, mr):
    noisy = replace(model, method=NoisyCopy({}, DataSpec(SLICES.channels, 1, SLICES.size)))
    mask = body_mask(mr)
    first = translate_volume(noisy, mr, samples=6, mask=mask, seed=3, keep_samples=True)
    again = translate_volume(noisy, mr, samples=6, mask=mask, seed=3)
    other = translate_volume(noisy, mr, samples=6, mask=mask, seed=4)
    assert np.array_equal(first.mean.array, again.mean.array) and np.array_equal(first.std.array, again.std.array)
    assert not np.array_equal(first.mean.array, other.mean.array)
    assert first.nfe == 7 and len(first.samples) == 6 and all(s.geometry == mr.geometry for s in first.samples)
    assert first.std.geometry == mr.geometry and first.std.units == "HU"
    inside = mask.array.astype(bool)
    # noise of 0.05 on [-1, 1] is 0.05 * (3000 + 1024) / 2 = 100.6 HU; resize blurs it somewhat
    spread = float(np.median(first.std.array[inside]))
    assert 30.0 < spread < 110.0
    assert np.all(first.std.array[~inside] == 0.0)


# ---------------------------------------------------------------------------------- command line


def test_train_resume_and_translate_from_the_command_line(tmp_path):
    """`crossdiff train` and its --resume run in-process (CliRunner: the same typer commands, without
    paying the torch import again); `crossdiff translate` runs as a real subprocess on a real file."""
    manifest = tmp_path / "manifest.json"
    images = {"ct": str(SAMPLE / "ct.nii.gz"), "mr": str(SAMPLE / "mr.nii.gz")}
    manifest.write_text(json.dumps({"cases": {"STS_003": {"split": "train", "images": images}}}))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "method": TINY_UNET,
        "slices": {"size": [32, 32], "fit": "resize", "context": 1},
        "training": {"batch_size": 4, "checkpoint_every": 2, "log_every": 1},
    }))
    run = tmp_path / "run"
    common = ["train", "--method", "unet", "--manifest", str(manifest), "--source", "mr", "--target", "ct",
              "--out", str(run), "--device", "cpu"]
    first = CliRunner().invoke(app, [*common, "--config", str(config), "--steps", "2"])
    assert first.exit_code == 0, first.output
    assert "validation runs on the training cases" in first.output and "step-0000002" in first.output
    resumed = CliRunner().invoke(app, [*common, "--steps", "3", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"]["config"]["channels"] == [8, 16] and saved["training"]["steps"] == 3
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert [r["step"] for r in records if "val_mae" in r] == [2, 3]  # validated at the end of each call
    assert (run / "checkpoints" / "latest").resolve().name == "step-0000003"

    output = tmp_path / "out" / "sct.nii.gz"
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "crossdiff", "translate", "--model", str(run), "--input", str(SAMPLE / "mr.nii.gz"),
               "--output", str(output), "--device", "cpu"]
    translated = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert translated.returncode == 0, translated.stderr
    mr, sct = read_volume(SAMPLE / "mr.nii.gz"), read_volume(output)
    assert sct.geometry.matches(mr.geometry, atol=1e-5) and sct.shape == mr.shape
    assert -1024.0 <= sct.array.min() and sct.array.max() <= 3000.0 and sct.array.std() > 1.0
    assert sorted(p.name for p in output.parent.iterdir()) == ["sct.nii.gz"]  # nothing half-written beside it

    refused = CliRunner().invoke(app, ["translate", "--model", str(run), "--input", str(SAMPLE / "mr.nii.gz"),
                                       "--output", str(tmp_path / "b.nii.gz"), "--uncertainty", str(tmp_path / "std.nii.gz")])
    assert isinstance(refused.exception, CrossdiffError)
    assert "deterministic" in str(refused.exception) and "--uncertainty" in str(refused.exception)
    assert not (tmp_path / "b.nii.gz").exists()
