"""What the fidelity benchmark stands on: reference methods fitted on the training slices, patch training,
SynDiff's patch critic with its held-out accuracy, folds by patient, equal wall-time budgets, per-group
tables, effect sizes, and a benchmark finished from its records alone (no checkpoints)."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from heldout import sarcoma_split
from helpers import REPO, SARCOMA, SARCOMA_MR_CT, assert_clear_failure, crossdiff, needs_shared

from crossdiff.data.slices import PairedSliceDataset, SliceConfig
from crossdiff.errors import InputError
from crossdiff.evaluation.benchmark import _k_folds
from crossdiff.evaluation.benchmark_config import load_benchmark_config
from crossdiff.evaluation.statistics import paired_wilcoxon, rank_biserial
from crossdiff.methods import get_method
from crossdiff.methods.base import DataSpec
from crossdiff.training import TrainConfig, train

pytestmark = needs_shared

SLICES = SliceConfig(size=(32, 32), fit="resize", context=0, min_mask_fraction=0.05)


@pytest.fixture(scope="module")
def sarcoma(tmp_path_factory):
    return sarcoma_split(tmp_path_factory.mktemp("cache"), SLICES)


def test_references_are_the_mean_slice_and_the_binned_intensity_means(sarcoma, tmp_path):
    plain = PairedSliceDataset(sarcoma.training, "mr", "ct", SLICES)  # no augmentation: one epoch = every slice once
    items = [plain[i] for i in range(len(plain))]
    config = TrainConfig(steps=len(plain), batch_size=1, ema_decay=0.0, log_every=len(plain), checkpoint_every=len(plain),
                         device="cpu")
    fitted = {}
    for name in ("mean-target", "intensity-map"):
        method = get_method(name)({}, DataSpec(1, 1, SLICES.size))
        train(method, plain, None, config, tmp_path / name, extra_config=sarcoma.spec.to_sections())
        fitted[name] = method
    source = torch.stack([item["source"] for item in items])
    targets = np.stack([item["target"][0].numpy() for item in items]).astype(np.float64)
    mean = fitted["mean-target"].translate(source[:2], torch.Generator()).mean[:, 0].numpy()
    np.testing.assert_allclose(mean[0], targets.mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(mean[1], targets.mean(axis=0), atol=1e-5)  # whatever the source
    # the intensity map: mean target of each of 128 source bins inside the mask
    inside = np.stack([item["mask"][0].numpy() > 0.5 for item in items])
    x, y = source[:, 0].numpy()[inside], targets[inside]
    bins = np.clip(((np.clip(x, -1, 1) + 1) / 2 * 128).astype(int), 0, 127)
    mapped = fitted["intensity-map"].translate(source, torch.Generator()).mean[:, 0].numpy()[inside]
    for b in np.unique(bins)[::9]:
        np.testing.assert_allclose(mapped[bins == b], y[bins == b].mean(), atol=1e-4)


def test_patch_training_crops_around_the_body_and_validation_sees_whole_slices(sarcoma):
    config = replace(SLICES, size=(64, 64), crop=(24, 24))
    patches = PairedSliceDataset(sarcoma.training, "mr", "ct", config, augment=True)
    whole = PairedSliceDataset(sarcoma.training, "mr", "ct", config)
    item = patches[3]
    assert item["source"].shape == (1, 24, 24) and item["target"].shape == item["mask"].shape == (1, 24, 24)
    assert all(patches[i]["mask"].mean() > 0.05 for i in range(0, len(patches), 7))  # centred on the body
    assert whole[3]["source"].shape == (1, 64, 64)
    assert PairedSliceDataset(sarcoma.training, "mr", "ct", config, augment=True, crop=False)[3]["source"].shape == (1, 64, 64)
    with pytest.raises(Exception, match="crop must be"):
        replace(SLICES, crop=(64, 8))


def test_syndiff_patch_critic_returns_patch_logits_and_training_records_its_accuracy(sarcoma, tmp_path):
    tiny = {"channels": [8, 16], "latent": 8, "embedding": 16, "discriminator_channels": [8, 16, 16], "critic": "patch",
            "batch": 8}
    method = get_method("syndiff")(tiny, DataSpec(1, 1, SLICES.size))
    logits = method.discriminator(torch.zeros(2, 1, 32, 32), torch.zeros(2, 1, 32, 32), torch.tensor([250.0, 500.0]))
    assert logits.shape == (2, 1, 8, 8)  # one logit per patch, not per image
    data = PairedSliceDataset(sarcoma.training, "mr", "ct", SLICES, augment=True)
    held_out = PairedSliceDataset([sarcoma.cases["STS_003"]], "mr", "ct", SLICES)
    config = TrainConfig(steps=4, batch_size=4, val_every=2, checkpoint_every=4, log_every=2, device="cpu")
    result = train(method, data, held_out, config, tmp_path / "run", extra_config=sarcoma.spec.to_sections())
    for record in result.validation:
        assert 0.0 <= record["val_critic_real_accuracy"] <= 1.0 and 0.0 <= record["val_critic_fake_accuracy"] <= 1.0
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "val_critic_real_accuracy" in r] == [2, 4]


def test_folds_by_patient_are_disjoint_balanced_and_seeded(tmp_path):
    config = tmp_path / "b.yaml"
    config.write_text("data: .\nsource: t1\ntarget: ct\ntest: {folds: 5}\nmethods: [unet]\n")
    loaded = load_benchmark_config(config)
    cases = [f"Patient_{i:02d}" for i in (1, 2, 3, 4, 5, 6, 10, 11, 12, 13, 14)]
    folds = _k_folds(loaded, cases, 5)
    members = [cid for fold in folds.values() for cid in fold]
    assert sorted(members) == sorted(cases) and sorted(len(f) for f in folds.values()) == [2, 2, 2, 2, 3]
    assert _k_folds(loaded, list(reversed(cases)), 5) == folds  # not the file order
    reseeded = replace(loaded, evaluation={**loaded.evaluation, "seed": 1})
    assert _k_folds(reseeded, cases, 5) != folds
    config.write_text("data: .\nsource: t1\ntarget: ct\ntest: {folds: 1}\nmethods: [unet]\n")
    with pytest.raises(Exception, match="folds: K"):
        load_benchmark_config(config)


def test_paired_tests_carry_an_effect_size_and_a_confidence_interval():
    assert rank_biserial(np.array([1.0, 2.0, 3.0, -4.0])) == pytest.approx((1 + 2 + 3 - 4) / 10)
    better = {f"p{i}": 0.1 + 0.01 * i for i in range(8)}
    worse = {key: value + 0.05 + 0.002 * i for i, (key, value) in enumerate(better.items())}
    test = paired_wilcoxon("mae", ("a", better), ("b", worse))
    assert test.better == "a" and test.effect_size == pytest.approx(-1.0) and test.p_value < 0.01
    assert test.ci_low < -0.057 < test.ci_high < -0.05  # the mean difference a - b is -0.057


def test_equal_budgets_groups_and_a_report_from_records_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tmp_path / "bench.yaml"
    config.write_text(SARCOMA_MR_CT + """
test: {folds: 2}
groups: {lower: [STS_001, STS_002], upper: [STS_003]}
budget: {train_seconds: 1.5, calibration_steps: 6}
methods:
  - {method: intensity-map, train: {training: {steps: 20}}}
  - {method: unet, config: {channels: [8, 16], strides: [2], num_res_units: 1}}
train:
  slices: {size: [32, 32], fit: resize, crop: [16, 16]}
  training: {batch_size: 4, checkpoint_every: 50, log_every: 10, device: cpu}
evaluation: {slices: 8}
""")
    out = tmp_path / "out"
    unknown = crossdiff("benchmark", "--config", config, "--out", out, "--folds", "fold2,fold9")
    assert_clear_failure(unknown, "no fold fold9", "the folds are fold1, fold2")
    assert not out.exists() or not any(out.iterdir())  # refused before anything was written
    assert_clear_failure(crossdiff("benchmark", "--config", config, "--out", out, "--methods", "unet,nonesuch"),
                         str(config), "no method entry nonesuch", "the entries are intensity-map, unet")
    assert not out.exists() or not any(out.iterdir())
    part = crossdiff("benchmark", "--config", config, "--out", out, "--folds", "fold2", "--methods", "unet")
    assert part.returncode == 0, part.stderr[-2000:]
    assert (out / "runs" / "fold2" / "unet").is_dir() and not (out / "runs" / "fold2" / "intensity-map").exists()
    assert not (out / "runs" / "fold1").exists()
    first = crossdiff("benchmark", "--config", config, "--out", out)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "reusing the scored translations of unet in fold2" in " ".join(first.stderr.split())
    rate = json.loads((out / "budget" / "unet.json").read_text())["steps_per_cpu_s"]
    costs = {row["method"]: row for row in csv.DictReader((out / "cost.csv").open())}
    assert float(costs["unet"]["train_cpu_s"]) > 0  # the budget each method used, beside the one it was given
    assert not (out / "budget" / "intensity-map.json").exists()  # it names its own steps
    for fold in ("fold1", "fold2"):
        steps = [json.loads(line)["step"] for line in (out / "runs" / fold / "unet" / "metrics.jsonl").read_text().splitlines()]
        assert max(steps) == max(1, int(1.5 * rate))
    report = (out / "report.md").read_text()
    assert "## Per group" in report and "| lower |" in report and "| upper |" in report
    assert "rank-biserial" in report
    results = (out / "results.csv").read_text()
    for path in (out / "runs").glob("*/*/checkpoints"):
        shutil.rmtree(path)  # a fresh checkout: records committed, checkpoints not
    again = crossdiff("benchmark", "--config", config, "--out", out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "reusing the scored translations of unet in fold1" in " ".join(again.stderr.split())
    assert (out / "results.csv").read_text() == results
    config.write_text(config.read_text().replace("evaluation: {slices: 8}", "evaluation: {slices: 9}"))
    other = crossdiff("benchmark", "--config", config, "--out", out)  # its scores would mix with the 8-slice ones
    assert_clear_failure(other, "other evaluation settings", "slices: 8, now 9", "fresh --out")
    assert (out / "results.csv").read_text() == results


def test_tuning_chooses_each_folds_candidate_on_its_training_cases_only(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    config = tmp_path / "bench.yaml"
    config.write_text(SARCOMA_MR_CT + """
test: [STS_003]
methods:
  - {method: unet, config: {channels: [8, 16], strides: [2], num_res_units: 1},
     tune: [{lr: 1.0e-9}, {lr: 3.0e-3}, {lr: 2.0e-9}]}
tuning: {slices: 8, metric: mae}
train:
  slices: {size: [32, 32], fit: resize}
  training: {steps: 40, batch_size: 4, checkpoint_every: 50, log_every: 10, device: cpu}
evaluation: {slices: 8}
""")
    out = tmp_path / "out"
    first = crossdiff("benchmark", "--config", config, "--out", out)
    assert first.returncode == 0, first.stderr[-2000:]
    record = json.loads((out / "tuning" / "STS_003" / "unet.json").read_text())
    assert record["cases"] == ["STS_001", "STS_002"]  # the training cases; the held-out one chooses nothing
    scores = [candidate["score"] for candidate in record["candidates"]]
    assert record["chosen"] == 1 and scores[1] < min(scores[0], scores[2])  # the rate that learns, whatever its place
    trained = (out / "runs" / "STS_003" / "unet" / "benchmark-config.yaml").read_text()
    assert "lr: 0.003" in trained  # the fold's model is the chosen candidate's run
    assert "## Hyper-parameter choice" in (out / "report.md").read_text()
    assert (out / "tuning.csv").read_text().count("True") == 1
    again = crossdiff("benchmark", "--config", config, "--out", out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "reusing the tuning choice" in " ".join(again.stderr.split())
    scored = config.read_text()
    config.write_text(scored.replace("tuning: {slices: 8, metric: mae}", "tuning: {slices: 9, metric: mae}"))
    rescored = crossdiff("benchmark", "--config", config, "--out", out)  # the choice was made on 8 slices
    assert_clear_failure(rescored, "other tuning settings", "slices: 8, now 9", "fresh --out")
    config.write_text(scored.replace("{lr: 2.0e-9}", "{lr: 4.0e-9}"))
    changed = crossdiff("benchmark", "--config", config, "--out", out)
    assert changed.returncode != 0 and "other candidates" in " ".join(changed.stderr.split())


@pytest.mark.parametrize("tune, problem", [
    ("[{lr: 1.0e-3}]", "at least two distinct"),
    ("[{lr: 1.0e-3}, {lr: 1.0e-3}]", "at least two distinct"),
    ("[{lr: 1.0e-3}, {no_such_setting: 1}]", "no_such_setting"),
])
def test_a_bad_tune_list_is_refused_naming_the_config(tmp_path, tune, problem):
    config = tmp_path / "bench.yaml"
    config.write_text(f"data: {SARCOMA}\nsource: mr\ntarget: ct\ntest: [STS_003]\n"
                      f"methods:\n  - {{method: unet, tune: {tune}}}\n")
    with pytest.raises(InputError, match=problem) as error:
        load_benchmark_config(config)
    assert str(config) in str(error.value)


@pytest.mark.parametrize("precision, problem", [("int8", "must be one of auto, fp32, bf16, fp16"),
                                               ("fp16", "needs a CUDA GPU")])
def test_an_evaluation_precision_the_machine_cannot_run_is_refused_before_training(tmp_path, precision, problem):
    if precision == "fp16" and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: fp16 is allowed here")
    config = tmp_path / "bench.yaml"
    config.write_text(SARCOMA_MR_CT + f"test: [STS_003]\nmethods: [{{method: unet}}]\nevaluation: {{precision: {precision}}}\n")
    with pytest.raises(InputError, match=problem) as error:
        load_benchmark_config(config)
    assert str(config) in str(error.value)


def test_budget_rates_sets_two_runs_calibrations_side_by_side(tmp_path):
    for label, rates in (("a", {"unet": 0.5, "cddpm": 0.25}), ("b", {"unet": 1.0})):
        (tmp_path / label / "budget").mkdir(parents=True)
        for method, rate in rates.items():
            (tmp_path / label / "budget" / f"{method}.json").write_text(json.dumps({"steps_per_cpu_s": rate}))
    out = tmp_path / "rates.md"
    done = subprocess.run([sys.executable, REPO / "benchmarks" / "budget_rates.py", "--run", f"fp32={tmp_path / 'a'}",
                           "--run", f"bf16={tmp_path / 'b'}", "--out", out], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| unet | 0.5 (240) | 1 (480) | 2.00 |" in out.read_text()
    assert "cddpm" not in out.read_text()  # calibrated by one run only: nothing to set beside it
    missing = subprocess.run([sys.executable, REPO / "benchmarks" / "budget_rates.py", "--run", f"x={tmp_path / 'a'}",
                              "--run", f"y={tmp_path / 'none'}", "--out", tmp_path / "no.md"], capture_output=True, text=True)
    assert missing.returncode != 0 and "no budget records" in missing.stderr and not (tmp_path / "no.md").exists()


BENCHMARK_CONFIGS = sorted(path for path in (REPO / "benchmarks" / "configs").glob("*.yaml")
                           if "methods" in yaml.safe_load(path.read_text(encoding="utf-8")))  # not the train configs


@pytest.mark.parametrize("path", BENCHMARK_CONFIGS, ids=lambda path: path.name)
def test_every_committed_benchmark_config_loads_and_builds_its_methods(path):
    """A committed config that a later session starts must not fail after hours of its first folds: each is
    read, its methods type-checked and built on the slices they train on, with --quick where it has one."""
    for quick in (False, True) if "quick" in yaml.safe_load(path.read_text(encoding="utf-8")) else (False,):
        config = load_benchmark_config(path, quick=quick)
        assert config.methods and config.data.exists()
