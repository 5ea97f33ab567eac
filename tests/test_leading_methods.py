"""The methods that lead the field today, on the shared pipeline: `resunet` (nnU-Net-style regression),
`bridge` (Brownian diffusion bridge), `rflow` (rectified flow) and `cddpm-distill` (progressive
distillation of a cddpm).

Each learns T1 -> T2 (paired brain, tests/heldout.BrainPaired) or MR -> CT (sarcoma) for a subject it
never saw, resumes bit for bit after a kill, and translates whole volumes; the samplers' pieces are checked
against what they must preserve (the bridge's marginals, the flow's NFE, distillation's target).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from heldout import HELD_OUT_CASE, brain_paired, sarcoma_split
from helpers import SAMPLE, assert_loads_its_ema_weights, train_straight_and_killed
from safetensors.torch import load_file
from typer.testing import CliRunner

from crossdiff import checkpoints, read_volume
from crossdiff.cli import app
from crossdiff.data.cases import PreparationConfig, prepare_case
from crossdiff.data.intensity_augmentation import augment_intensity
from crossdiff.data.manifest import CaseEntry
from crossdiff.data.slices import PairedSliceDataset, SliceConfig
from crossdiff.diffusion.bridge import BrownianBridge
from crossdiff.diffusion.distillation import ddim_move, ddim_to_zero, step_grid, two_step_target
from crossdiff.diffusion.processes import DiscreteVP
from crossdiff.errors import CrossdiffError
from crossdiff.inference import ModelSpec, load_method, load_model, translate_volume
from crossdiff.methods import available_methods, get_method
from crossdiff.methods.base import DataSpec
from crossdiff.training import TrainConfig, seed_everything, train

NEW = ("resunet", "bridge", "rflow", "cddpm-distill")
SLICES = SliceConfig(size=(32, 32), fit="resize", context=1, seed=0)
DATA = DataSpec(SLICES.channels, 1, SLICES.size)
SMALL_DENOISER = {"channels": [16, 32, 32], "attention_levels": [False, False, False], "norm_num_groups": 8}
TINY_DENOISER = {"channels": [8, 8], "attention_levels": [False, False], "norm_num_groups": 4}
TINY = {"resunet": {"filters": [8, 8, 8], "deep_supervision": 1, "window": [16, 16]}, "bridge": TINY_DENOISER,
        "rflow": TINY_DENOISER}
PREPARATION = PreparationConfig(modalities=["mr", "ct"], reference="ct")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    entry = CaseEntry(images={"ct": SAMPLE / "ct.nii.gz", "mr": SAMPLE / "mr.nii.gz"})
    return prepare_case("STS_003", entry, PREPARATION, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, case):
    """A 2-step tiny cddpm on the bundled case: a teacher for the plumbing tests (not for quality)."""
    seed_everything(0)
    teacher = get_method("cddpm")(TINY_DENOISER, DATA)
    run = tmp_path_factory.mktemp("teacher") / "run"
    train(teacher, PairedSliceDataset([case], "mr", "ct", SLICES, augment=True), None,
          TrainConfig(steps=2, batch_size=4, log_every=1, device="cpu"), run, extra_config=sections(case))
    return run


def sections(case) -> dict:
    return ModelSpec.from_cases([case], "mr", "ct", SLICES, PREPARATION).to_sections()


def tiny(name: str, init_seed: int = 0, teacher: dict | None = None, **config):
    seed_everything(init_seed)
    settings = {"teacher_config": teacher, "rounds": 3, "round_steps": 4} if name == "cddpm-distill" else TINY[name]
    return get_method(name)({**settings, **config}, DATA)


# ------------------------------------------------------------------------------------------ plumbing


def test_the_new_methods_are_listed_with_what_they_are():
    assert set(NEW) <= set(available_methods())
    listed = " ".join(CliRunner().invoke(app, ["methods"]).output.split())
    assert all(name in listed for name in NEW)
    assert {name: get_method(name).stochastic for name in NEW} == {
        "resunet": False, "bridge": True, "rflow": True, "cddpm-distill": True}
    with pytest.raises(CrossdiffError, match="0 <= deep_supervision < 2"):
        get_method("resunet")({"filters": [8, 16, 32], "deep_supervision": 2}, DATA)
    with pytest.raises(CrossdiffError, match="unknown rflow settings: stepz"):
        get_method("rflow")({"stepz": 3}, DATA)
    with pytest.raises(CrossdiffError, match="teacher: RUN"):
        get_method("cddpm-distill")({}, DATA)


@pytest.mark.parametrize("name", NEW)
def test_train_save_load_and_translate_a_volume(tmp_path, case, sample_run, name):
    """Two steps, then the checkpoint alone translates the bundled MR on its own grid; stochastic methods
    give a spread and repeat exactly with the same seed; the NFE is what the sampler made."""
    teacher = load_method(sample_run)[0].config if name == "cddpm-distill" else None
    train(tiny(name, teacher=teacher), PairedSliceDataset([case], "mr", "ct", SLICES, augment=True), None,
          TrainConfig(steps=2, batch_size=4, log_every=1, device="cpu"), tmp_path / "run", extra_config=sections(case))
    model = load_model(tmp_path / "run", "cpu")
    assert_loads_its_ema_weights(tmp_path / "run", 2, model.method)
    mr = read_volume(SAMPLE / "mr.nii.gz")
    draws = 2 if model.method.stochastic else 1
    result = translate_volume(model, mr, samples=draws, seed=3)
    assert result.mean.geometry == mr.geometry and result.mean.units == "HU"
    # a student still in its first round (of 3; 4 steps per round) samples with that round's 4 x 2^2 steps
    assert result.nfe == {"resunet": 2, "bridge": 10, "rflow": 10, "cddpm-distill": 16}[name]
    if model.method.stochastic:
        assert result.std is not None and float(result.std.array.mean()) > 0.0
        assert (translate_volume(model, mr, samples=2, seed=3).mean.array == result.mean.array).all()


@pytest.mark.parametrize("name", NEW)
def test_training_resumes_bit_for_bit_after_a_kill(tmp_path, case, sample_run, name):
    """Killed after the step-6 checkpoint and resumed by a method with other initial weights: the final
    state equals the uninterrupted run's. For the distilled student the round changes at steps 5 and 9,
    so the teacher it copies after the checkpoint must come back from it too."""
    teacher = load_method(sample_run)[0].config if name == "cddpm-distill" else None
    data = PairedSliceDataset([case], "mr", "ct", SLICES, augment=True)
    config = TrainConfig(steps=12, batch_size=4, ema_decay=0.9, grad_clip=0.5, checkpoint_every=6, log_every=2,
                         seed=5, device="cpu")
    train_straight_and_killed(lambda seed: tiny(name, seed, teacher), data, None, config, tmp_path, sections(case))

    def state(run: str, step: int) -> dict[str, torch.Tensor]:
        folder = tmp_path / run / "checkpoints" / checkpoints.step_name(step)
        return load_file(folder / "model.safetensors") | load_file(folder / "training.safetensors")

    expected, resumed = state("straight", 12), state("killed", 12)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    if name == "cddpm-distill":
        assert int(expected["raw/round/index"]) == 2 and int(state("straight", 6)["raw/round/index"]) == 1
        weight = next(key for key in expected if key.startswith("raw/teacher/") and key.endswith("weight"))
        assert not torch.equal(state("straight", 6)[weight], expected[weight])  # the teacher changed after step 6


# ------------------------------------------------------------------------------ the pieces themselves


def test_intensity_augmentation_is_seeded_perturbs_some_items_and_keeps_their_shape(case):
    batch = torch.stack([PairedSliceDataset([case], "mr", "ct", SLICES)[i]["source"] for i in range(16)])
    first = augment_intensity(batch, torch.Generator().manual_seed(1))
    assert torch.equal(first, augment_intensity(batch, torch.Generator().manual_seed(1)))
    assert not torch.equal(first, augment_intensity(batch, torch.Generator().manual_seed(2)))
    changed = (first - batch).abs().flatten(1).amax(dim=1) > 1e-6
    assert first.shape == batch.shape and 0 < int(changed.sum()) < 16  # nnU-Net's probabilities: some, not all


def test_resunet_mirrors_at_test_time_and_slides_gaussian_windows(case):
    """With left-right mirroring the translation of a flipped slice is the flipped translation, exactly as
    the mean over both flips must be; without it the untrained network is not symmetric."""
    source = torch.stack([PairedSliceDataset([case], "mr", "ct", SLICES)[i]["source"] for i in range(4)])
    mirrored = tiny("resunet").translate(source, torch.Generator())
    flipped = tiny("resunet").translate(source.flip(-1), torch.Generator())
    assert mirrored.nfe == 2 and torch.allclose(flipped.mean.flip(-1), mirrored.mean, atol=1e-6)
    plain = tiny("resunet", mirror=[])
    assert not torch.allclose(plain.translate(source.flip(-1), torch.Generator()).mean.flip(-1),
                              plain.translate(source, torch.Generator()).mean, atol=1e-4)
    whole = tiny("resunet", window=None).translate(source, torch.Generator()).mean  # one window: the 32 px patch size
    assert not torch.allclose(whole, mirrored.mean, atol=1e-4)  # the 16 px windows are a different computation
    direct = tiny("resunet", mirror=[]).net.eval()(source).clamp(-1, 1)
    assert torch.allclose(tiny("resunet", window=None, mirror=[]).translate(source, torch.Generator()).mean, direct, atol=1e-5)


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_a_bridge_step_with_the_true_target_keeps_the_bridge_marginals(eta):
    """x_t drawn from q(x_t | x0, y) and stepped to s with the true x0 must be distributed as q(x_s | x0, y)
    (BBDM's step preserves the marginals for any eta); checked on 200 000 pixels, soft prior included."""
    generator = torch.Generator().manual_seed(0)
    x0, y = torch.rand(1, 1, 400, 500, generator=generator) * 2 - 1, torch.rand(1, 1, 400, 500, generator=generator) * 2 - 1
    for prior in (0.0, 0.3):
        bridge = BrownianBridge(1.0, prior)
        # from a hard prior's noiseless x_1 only noise added by the step (eta > 0) can make the spread
        for t, s in ((1.0, 0.75), (0.6, 0.3), (0.3, 0.1)) if prior > 0 or eta > 0 else ((0.6, 0.3), (0.3, 0.1)):
            noise = torch.randn(x0.shape, generator=generator)
            x_t = bridge.perturb(x0, y, torch.tensor([t]), noise)
            x_s = bridge.step(x_t, x0, y, torch.tensor([t]), torch.tensor([s]), eta, generator)
            residual = x_s - bridge.mean(x0, y, torch.tensor([s]))
            assert abs(float(residual.mean())) < 0.01
            assert float(residual.var()) == pytest.approx(float(bridge.variance(torch.tensor(s))), rel=0.02)
    hard = BrownianBridge(1.0, 0.0)
    assert torch.equal(hard.start(y, generator), y) and torch.equal(hard.perturb(x0, y, torch.tensor([0.0]), noise), x0)


def test_flow_samplers_count_their_network_calls(case):
    method = tiny("rflow")
    source = PairedSliceDataset([case], "mr", "ct", SLICES)[0]["source"][None]
    for sampler, steps, nfe in (("euler", 1, 1), ("euler", 7, 7), ("heun", 5, 9), ("heun", 1, 1)):
        assert method.translate(source, torch.Generator().manual_seed(0), sampler=sampler, steps=steps).nfe == nfe
    with pytest.raises(CrossdiffError, match="unknown flow sampler"):
        method.translate(source, torch.Generator(), sampler="rk4")


def test_the_distillation_target_makes_one_step_land_where_two_did():
    process = DiscreteVP(1000, "linear")
    coarse, fine = step_grid(process, 4), step_grid(process, 8)
    assert torch.equal(fine[::2], coarse) and float(coarse[0]) == 1.0 and float(coarse[-1]) == 0.0
    generator = torch.Generator().manual_seed(0)
    x_t, a, b = (torch.randn(3, 1, 8, 8, generator=generator) for _ in range(3))
    for k in range(4):
        t, middle, s = (torch.full((3,), float(v)) for v in (coarse[k], fine[2 * k + 1], coarse[k + 1]))
        z_s = ddim_move(process, ddim_move(process, x_t, a, t, middle), b, middle, s)
        assert torch.allclose(ddim_move(process, x_t, two_step_target(process, x_t, z_s, t, s), t, s), z_s, atol=1e-4)
    calls = ddim_to_zero(lambda x, t: (torch.zeros_like(x), x), process, x_t, 3).nfe
    assert calls == 3


# ------------------------------------------------------------------------------------------ learning

LEARNING = {
    "resunet": {"filters": [16, 32, 64], "deep_supervision": 1, "lr": 2e-3, "masked_loss": True, "ssim_weight": 0.1},
    "bridge": {**SMALL_DENOISER, "lr": 2e-3, "masked_loss": True, "steps": 4},
    "rflow": {**SMALL_DENOISER, "lr": 2e-3, "masked_loss": True, "steps": 4},
}


@pytest.fixture(scope="module")
def brain(tmp_path_factory):
    return brain_paired(tmp_path_factory.mktemp("brain"), SLICES)


@pytest.mark.parametrize("name", list(LEARNING))
def test_learns_t1_to_t2_better_than_the_intensity_map_for_a_new_subject(tmp_path, brain, name):
    """300 steps on the T1/T2 pairs of two subjects (32 px, 2.5-D), the whole T1 volume of a third
    translated (stochastic methods: mean of 2 four-step draws). Measured when written (normalised MAE
    inside the brain): resunet 0.162, bridge 0.172, rflow 0.175, against 0.188 for the intensity map
    fitted on the training pairs and 0.199 for the median T2; cddpm at the same budget 0.194."""
    seed_everything(0)
    method = get_method(name)(LEARNING[name], DATA)
    config = TrainConfig(steps=300, batch_size=8, ema_decay=0.99, log_every=100, checkpoint_every=300, device="cpu")
    train(method, PairedSliceDataset(brain.training, "t1", "t2", SLICES, augment=True), None, config, tmp_path / "run",
          extra_config=brain.spec.to_sections())
    model = load_model(tmp_path / "run", "cpu")
    scores = brain.scores(model, samples=2 if model.method.stochastic else 1)
    print(f"{name} T1 -> T2 on a new subject, MAE (normalised): " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    assert scores["model"] < scores["intensity_map"] - 0.008
    assert scores["model"] < scores["constant"] - 0.015


TEACHER = {**SMALL_DENOISER, "lr": 2e-3}


def test_a_distilled_four_step_student_follows_its_teacher_closer_than_the_teacher_in_four_steps(tmp_path):
    """A cddpm (v prediction) trained 300 steps on sarcoma STS_001/STS_002 is distilled in two rounds of 60
    steps (8 steps taught by 16, then 4 by 8). From the same start noise on held-out STS_003 slices, the
    student's 4 DDIM steps land nearer the teacher's 64-step result than the teacher's own 4 steps do (two
    rounds take it about as near as the teacher's 8 steps), and on the whole held-out volume the student at
    4 NFE scores about what the teacher does at 20. Measured when written: distance to the 64-step result
    0.051 (student, 4 steps) against 0.061 (teacher, 4) and 0.050 (teacher, 8); volume MAE (HU) student
    151.5, teacher DDIM-20 149.4 (a weak teacher: the median HU scores 114.6; benchmarks/distillation.py
    trains longer)."""
    split = sarcoma_split(tmp_path / "cache", SLICES)
    train_set = PairedSliceDataset(split.training, "mr", "ct", SLICES, augment=True)
    seed_everything(0)
    config = TrainConfig(steps=300, batch_size=8, ema_decay=0.99, log_every=100, checkpoint_every=300, device="cpu")
    train(get_method("cddpm")(TEACHER, DATA), train_set, None, config, tmp_path / "teacher",
          extra_config=split.spec.to_sections())
    seed_everything(0)
    student_config = {"teacher": str(tmp_path / "teacher"), "rounds": 2, "round_steps": 60, "lr": 2e-4}
    config = TrainConfig(steps=120, batch_size=8, ema_decay=0.99, log_every=60, checkpoint_every=120, device="cpu")
    train(get_method("cddpm-distill")(student_config, DATA), train_set, None, config, tmp_path / "student",
          extra_config=split.spec.to_sections())
    student, teacher = load_model(tmp_path / "student", "cpu"), load_model(tmp_path / "teacher", "cpu")

    held_out = PairedSliceDataset([split.cases[HELD_OUT_CASE]], "mr", "ct", SLICES)
    batch = torch.utils.data.default_collate([held_out[i] for i in range(0, len(held_out), 3)])
    noise = torch.randn(batch["target"].shape, generator=torch.Generator().manual_seed(1))
    method = student.method

    def walk(network, steps: int) -> torch.Tensor:
        return ddim_to_zero(method.denoiser(network, batch["source"]), method.process, noise, steps).x

    reference = walk(teacher.method.net, 64)
    distance = {who: float(((walk(net, 4) - reference).abs() * batch["mask"]).sum() / batch["mask"].sum())
                for who, net in (("student", method.net), ("teacher", teacher.method.net))}
    quality = {"student-4": split.mae(student, samples=2)["model"],
               "teacher-ddim20": split.mae(teacher, samples=2, sampler="ddim", steps=20)["model"]}
    print(f"distance to the teacher's 64 steps: {distance}; held-out MAE (HU): {quality}")
    assert distance["student"] < 0.9 * distance["teacher"]
    assert quality["student-4"] < quality["teacher-ddim20"] + 10.0
    assert math.isfinite(quality["student-4"])


def test_a_student_trains_on_the_patches_its_teacher_trained_on(tmp_path, case, sample_run):
    """With `slices.crop` a cddpm trains on patches, so a student of it must be checked and built on those
    patches (the paired benchmark's distillation was refused before it started, checked on whole slices);
    a teacher trained on whole slices is still refused for a student that trains on patches."""
    patches = SliceConfig(size=SLICES.size, fit="resize", context=1, crop=(16, 16), seed=0)
    seed_everything(0)
    teacher = get_method("cddpm")(TINY_DENOISER, DataSpec(patches.channels, 1, patches.crop))
    train(teacher, PairedSliceDataset([case], "mr", "ct", patches, augment=True, crop=True), None,
          TrainConfig(steps=1, batch_size=4, log_every=1, device="cpu"), tmp_path / "teacher",
          extra_config=ModelSpec.from_cases([case], "mr", "ct", patches, PREPARATION).to_sections())
    manifest = tmp_path / "manifest.json"
    images = {"mr": str(SAMPLE / "mr.nii.gz"), "ct": str(SAMPLE / "ct.nii.gz")}
    manifest.write_text(json.dumps({"cases": {"STS_003": {"split": "train", "images": images}}}))

    def distil(teacher_run, out: str):
        settings = {"method": {"teacher": str(teacher_run), "rounds": 1}, "slices": patches.to_dict(),
                    "training": {"batch_size": 4, "log_every": 1}}
        (tmp_path / f"{out}.yaml").write_text(yaml.safe_dump(settings))
        return CliRunner().invoke(app, ["train", "--method", "cddpm-distill", "--manifest", str(manifest), "--out",
                                        str(tmp_path / out), "--config", str(tmp_path / f"{out}.yaml"), "--steps", "1",
                                        "--device", "cpu"])

    trained = distil(tmp_path / "teacher", "student")
    assert trained.exit_code == 0, trained.output
    assert load_model(tmp_path / "student", "cpu").method.data.size == (16, 16)
    refused = distil(sample_run, "whole-slice-teacher")
    assert isinstance(refused.exception, CrossdiffError) and "was trained on slices" in str(refused.exception)
    assert not (tmp_path / "whole-slice-teacher" / "config.yaml").exists()


def test_a_student_names_its_teacher_relative_to_its_config_file_on_the_command_line(tmp_path, sample_run):
    """`teacher: ../teacher` in a YAML inside the student's run folder (how a benchmark entry names its fold's
    cddpm run); the saved run no longer needs the teacher; a teacher that is no cddpm is refused by name."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "teacher").symlink_to(sample_run, target_is_directory=True)
    manifest = tmp_path / "manifest.json"
    images = {"mr": str(SAMPLE / "mr.nii.gz"), "ct": str(SAMPLE / "ct.nii.gz")}
    manifest.write_text(json.dumps({"cases": {"STS_003": {"split": "train", "images": images}}}))
    student = tmp_path / "runs" / "student"
    student.mkdir()
    settings = {"method": {"teacher": "../teacher", "rounds": 1}, "slices": SLICES.to_dict(),
                "training": {"batch_size": 4, "log_every": 1}}
    (student / "settings.yaml").write_text(yaml.safe_dump(settings))
    trained = CliRunner().invoke(app, ["train", "--method", "cddpm-distill", "--manifest", str(manifest), "--out",
                                       str(student), "--config", str(student / "settings.yaml"), "--steps", "2",
                                       "--device", "cpu"])
    assert trained.exit_code == 0, trained.output
    (tmp_path / "runs" / "teacher").unlink()  # the student's checkpoint holds all it needs
    model = load_model(student, "cpu")
    assert model.method.config["teacher_config"] == yaml.safe_load((sample_run / "config.yaml").read_text())["method"]["config"]
    assert translate_volume(model, read_volume(SAMPLE / "mr.nii.gz"), samples=2).std is not None

    settings["method"]["teacher"] = str(student)  # a cddpm-distill run is no cddpm
    (tmp_path / "again.yaml").write_text(yaml.safe_dump(settings))
    refused = CliRunner().invoke(app, ["train", "--method", "cddpm-distill", "--manifest", str(manifest), "--out",
                                       str(tmp_path / "other"), "--config", str(tmp_path / "again.yaml"), "--steps", "1"])
    assert isinstance(refused.exception, CrossdiffError) and "distils a cddpm" in str(refused.exception)
