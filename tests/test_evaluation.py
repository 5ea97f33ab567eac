"""Evaluation on real sarcoma volumes: every number is checked against a direct computation that follows
the published formula (NumPy, SciPy, scikit-image), never against a value this code produced."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import yaml
from helpers import SARCOMA, SARCOMA_MR_CT, assert_clear_failure, crossdiff, require_shared
from safetensors.torch import save_file
from scipy import ndimage, stats
from scipy.signal import fftconvolve
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from skimage.util import crop

import crossdiff as crossdiff_package
from crossdiff import read_volume, write_volume
from crossdiff.data.layouts import scan
from crossdiff.data.manifest import save_manifest
from crossdiff.errors import CrossdiffError, InputError
from crossdiff.evaluation import cost, figures
from crossdiff.evaluation.benchmark import run_benchmark
from crossdiff.evaluation.benchmark_config import load_benchmark_config
from crossdiff.evaluation.fid import NOT_COMPUTED, fid, frechet_distance
from crossdiff.evaluation.metrics import case_metrics
from crossdiff.evaluation.pairing import pair_inputs
from crossdiff.evaluation.report import Section, Table, write_report
from crossdiff.evaluation.robustness import noise_robustness
from crossdiff.evaluation.statistics import bootstrap_mean_ci, describe, paired_wilcoxon
from crossdiff.evaluation.variability import calibration_table, sample_spread, uncertainty_error_correlation
from crossdiff.masks import body_mask
from crossdiff.volumes import Volume

PATIENTS = ("STS_001", "STS_002", "STS_003")


def _image(patient: str, folder: str) -> Path:
    return SARCOMA / patient / folder / "nifti" / "image" / "image.nii.gz"


@pytest.fixture(scope="module")
def cts() -> dict[str, tuple[Volume, np.ndarray]]:
    """The three real CTs with their body masks."""
    require_shared()
    volumes = {p: read_volume(_image(p, "CT")) for p in PATIENTS}
    return {p: (v, body_mask(v).array.astype(bool)) for p, v in volumes.items()}


def _shifted(ct: Volume, millimetres: float, bias: float, noise: float, seed: int) -> np.ndarray:
    """A plausible synthetic CT: the real one moved in-plane (linear resampling), biased and noisy."""
    image = ct.to_sitk()
    moved = sitk.Resample(image, image, sitk.TranslationTransform(3, (millimetres, -0.5 * millimetres, 0.0)),
                          sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(moved) + bias + np.random.default_rng(seed).normal(0, noise, ct.shape)


def _direct_2023(ct: np.ndarray, sct: np.ndarray, mask: np.ndarray, low: float = -1024, high: float = 3000) -> dict:
    """SynthRAD2023's formulas written out (MAE unclipped; PSNR and SSIM clipped, SSIM map averaged in the mask)."""
    a, b = np.clip(ct, low, high), np.clip(sct, low, high)
    ref, pred = np.where(mask, a, low) - low, np.where(mask, b, low) - low
    _, full = structural_similarity(ref, pred, data_range=high - low, full=True)
    return {
        "mae": np.sum(np.abs(ct - sct) * mask) / np.sum(mask),
        "me": np.sum((sct - ct) * mask) / np.sum(mask),
        "psnr": peak_signal_noise_ratio(a[mask], b[mask], data_range=high - low),
        "ssim": full[mask].mean(),
    }


# ------------------------------------------------------------------------------------------- metrics


def test_ct_metrics_follow_the_synthrad2023_formulas(cts):
    ct, mask = cts["STS_001"]
    reference = ct.array.astype(np.float64)
    sct = _shifted(ct, 1.5, 20.0, 30.0, seed=1)
    got = case_metrics(reference, sct, mask).values
    for name, value in _direct_2023(reference, sct, mask).items():
        assert got[name] == pytest.approx(value, rel=1e-9), name
    error = np.abs(sct - reference)
    assert got["mae_air"] == pytest.approx(error[mask & (reference < -500)].mean())
    assert got["mae_soft_tissue"] == pytest.approx(error[mask & (reference >= -500) & (reference < 300)].mean())
    assert got["mae_bone"] == pytest.approx(error[mask & (reference >= 300)].mean())
    assert got["mae_bone"] > got["mae_soft_tissue"]  # a shift errs most at bone edges


def _challenge_ms_ssim(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray, low: float, high: float) -> float:
    """SynthRAD2025's masked MS-SSIM as its evaluation code computes it: FFT box downsampling, skimage crop."""
    gt = np.where(mask, np.clip(gt, low, high), low) - low
    pred = np.where(mask, np.clip(pred, low, high), low) - low
    pads = [(max((97 - n) // 2, 0), max(97 - n - (97 - n) // 2, 0)) for n in gt.shape]
    gt, pred, mask = (np.pad(x, pads, mode="edge") for x in (gt, pred, mask.astype(float)))
    r, result = high - low, 1.0
    for weight in (0.0448, 0.2856, 0.3001, 0.2363, 0.1333):
        f = lambda x: ndimage.uniform_filter(x, size=7)  # noqa: E731
        n = 343 / 342
        ux, uy = f(gt), f(pred)
        vx, vy, vxy = n * (f(gt * gt) - ux * ux), n * (f(pred * pred) - uy * uy), n * (f(gt * pred) - ux * uy)
        sx, sy = np.sqrt(np.clip(vx, 0, None)), np.sqrt(np.clip(vy, 0, None))
        c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
        lum = np.clip((2 * ux * uy + c1) / (ux**2 + uy**2 + c1), 0, None)
        con = np.clip((2 * sx * sy + c2) / (vx + vy + c2), 0, None)
        struct = np.clip((vxy + c2 / 2) / (sx * sy + c2 / 2), 0, None)
        level = (lum**weight * con**weight * struct**weight)
        result *= np.clip(crop(level, 3)[crop(mask, 3).astype(bool)].mean(), 0, 1)
        gt, pred = (fftconvolve(x, np.ones((2, 2, 2)) / 8, mode="same")[::2, ::2, ::2] for x in (gt, pred))
        mask = mask[::2, ::2, ::2]
    return float(result)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # PSNR of the perfect prediction is infinite
def test_synthrad2025_metrics_follow_the_challenge_code(cts):
    ct, mask = cts["STS_002"]
    reference = ct.array.astype(np.float64)
    sct = _shifted(ct, 2.0, -15.0, 50.0, seed=2)
    got = case_metrics(reference, sct, mask, "synthrad2025").values
    assert "ssim" not in got
    assert got["ms_ssim"] == pytest.approx(_challenge_ms_ssim(reference, sct, mask, -1024, 3071), rel=1e-9)
    a, b = np.clip(reference, -1024, 3071)[mask], np.clip(sct, -1024, 3071)[mask]
    assert got["psnr"] == pytest.approx(10 * np.log10(4095**2 / np.mean((a - b) ** 2)))
    assert got["mae"] == pytest.approx(np.abs(sct - reference)[mask].mean())
    perfect = case_metrics(reference, reference.copy(), mask, "synthrad2025").values
    assert perfect["ms_ssim"] == pytest.approx(1.0) and got["ms_ssim"] < 1.0


def test_mr_targets_are_scored_on_the_reference_normalised_scale(tmp_path):
    require_shared()
    mr = read_volume(_image("STS_003", "MR_T1"))
    mask = body_mask(mr).array.astype(bool)
    reference = mr.array.astype(np.float64)
    prediction = 0.9 * reference + 25 + np.random.default_rng(3).normal(0, 15, mr.shape)
    got = case_metrics(reference, prediction, mask, hounsfield=False)
    low, high = np.percentile(reference[mask], [0.5, 99.5])
    a, b = (np.clip((x - low) / (high - low), 0, 1) for x in (reference, prediction))
    direct = _direct_2023(a, b, mask, 0.0, 1.0)
    assert got.scale == "normalised [0, 1]"
    for name, value in direct.items():
        assert got.values[name] == pytest.approx(value, rel=1e-9), name
    assert not any(name.startswith("mae_") for name in got.values)  # tissue classes are HU classes
    write_volume(mr.with_array(prediction.astype(np.float32)), tmp_path / "pred" / "STS_003.nii.gz")
    result = crossdiff("evaluate", "--pred", tmp_path / "pred" / "STS_003.nii.gz", "--ref", _image("STS_003", "MR_T1"),
                       "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "normalised [0, 1] scale" in result.stdout
    row = _rows(tmp_path / "out" / "metrics.csv")[0]
    assert row["scale"] == "normalised [0, 1]"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["scale"]["units"] == "normalised [0, 1]"


def test_per_slice_metrics_match_direct_computation(cts):
    ct, mask = cts["STS_003"]
    reference = ct.array.astype(np.float64)
    sct = _shifted(ct, 1.0, 10.0, 40.0, seed=4)
    slices = case_metrics(reference, sct, mask).slices
    assert [row["slice"] for row in slices] == list(np.flatnonzero(mask.any(axis=(1, 2))))
    for row in slices[:: max(1, len(slices) // 5)]:
        inside = mask[row["slice"]]
        a, b = reference[row["slice"]], sct[row["slice"]]
        assert row["mae"] == pytest.approx(np.abs(a - b)[inside].mean())
        assert row["me"] == pytest.approx((b - a)[inside].mean())
        clipped = np.clip(a, -1024, 3000)[inside], np.clip(b, -1024, 3000)[inside]
        assert row["psnr"] == pytest.approx(peak_signal_noise_ratio(*clipped, data_range=4024))


# ------------------------------------------------------------------------------- the evaluate command


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def prediction_folders(cts, tmp_path_factory):
    """pred/<case>.nii.gz (shifted, biased, noisy CTs), ref/<case>.nii.gz links, masks/<case>.nii.gz."""
    root = tmp_path_factory.mktemp("evaluate")
    direct = {}
    for seed, (patient, (ct, mask)) in enumerate(cts.items()):
        sct = _shifted(ct, 1.0 + seed, 10.0 * seed, 30.0, seed=seed).astype(np.float32)
        write_volume(ct.with_array(sct), root / "pred" / f"{patient}.nii.gz")
        write_volume(ct.with_array(mask.astype(np.uint8), modality="mask"), root / "masks" / f"{patient}.nii.gz")
        (root / "ref").mkdir(exist_ok=True)
        (root / "ref" / f"{patient}.nii.gz").symlink_to(_image(patient, "CT"))
        direct[patient] = _direct_2023(ct.array.astype(np.float64), sct.astype(np.float64), mask)
    return root, direct


def test_evaluate_folders_writes_case_and_summary_tables(prediction_folders):
    root, direct = prediction_folders
    result = crossdiff("evaluate", "--pred", root / "pred", "--ref", root / "ref", "--mask", root / "masks",
                       "--out", root / "out")
    assert result.returncode == 0, result.stderr
    assert all(patient in result.stdout for patient in PATIENTS) and "median [IQR]" in result.stdout
    rows = {row["case"]: row for row in _rows(root / "out" / "metrics.csv")}
    assert sorted(rows) == list(PATIENTS)
    for patient, values in direct.items():
        for name, value in values.items():
            assert float(rows[patient][name]) == pytest.approx(value, rel=1e-6), (patient, name)
    summary = {row["metric"]: row for row in _rows(root / "out" / "summary.csv")}
    mae = np.array([direct[p]["mae"] for p in PATIENTS])
    q1, median, q3 = np.percentile(mae, [25, 50, 75])
    expected = {"n": 3, "mean": mae.mean(), "sd": mae.std(ddof=1), "median": median, "iqr": q3 - q1}
    for key, value in expected.items():
        assert float(summary["mae"][key]) == pytest.approx(value, rel=1e-6), key
    assert float(summary["mae"]["ci95_low"]) <= mae.mean() <= float(summary["mae"]["ci95_high"])
    report = json.loads((root / "out" / "summary.json").read_text())
    assert report["standard"] == "synthrad2023" and report["scale"]["units"] == "HU"
    assert report["summary"]["psnr"]["mean"] == pytest.approx(np.mean([direct[p]["psnr"] for p in PATIENTS]))
    slices = _rows(root / "out" / "slices.csv")
    assert {row["case"] for row in slices} == set(PATIENTS)


def test_evaluate_reads_a_manifest_and_skips_references_without_prediction(prediction_folders, tmp_path):
    root, direct = prediction_folders
    manifest = scan(SARCOMA, layout="modality-folders")
    for case_id, entry in manifest.cases.items():
        entry.split = "test" if case_id != "STS_001" else "train"
    save_manifest(manifest, tmp_path / "manifest.json")
    result = crossdiff("evaluate", "--pred", root / "pred", "--ref", tmp_path / "manifest.json", "--split", "test",
                       "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    rows = {row["case"]: row for row in _rows(tmp_path / "out" / "metrics.csv")}
    assert sorted(rows) == ["STS_002", "STS_003"]
    assert rows["STS_002"]["mask"] == "automatic body mask of the reference"  # the manifest has no body masks
    assert float(rows["STS_003"]["mae"]) == pytest.approx(direct["STS_003"]["mae"], rel=0.05)  # same CT mask recipe


def test_missing_files_and_unmatched_folders_are_named(prediction_folders, tmp_path):
    root, _ = prediction_folders
    with pytest.raises(InputError, match="nope.nii.gz: does not exist"):
        pair_inputs(tmp_path / "nope.nii.gz", root / "ref" / "STS_001.nii.gz")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "patient_9.nii.gz").symlink_to(root / "pred" / "STS_001.nii.gz")
    with pytest.raises(InputError, match="no file matches a reference") as raised:
        pair_inputs(tmp_path / "other", root / "ref")
    assert raised.value.path == tmp_path / "other" and "patient_9" in str(raised.value)
    with pytest.raises(InputError, match="is a single image but"):
        pair_inputs(root / "pred" / "STS_001.nii.gz", root / "ref")


def test_bad_inputs_stop_the_command_with_the_file_named_and_nothing_written(prediction_folders, tmp_path):
    root, _ = prediction_folders
    out = tmp_path / "out"
    # the second case is on another grid: the first is scored, yet nothing may be written
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "STS_001.nii.gz").symlink_to(root / "pred" / "STS_001.nii.gz")
    (mixed / "STS_002.nii.gz").symlink_to(root / "pred" / "STS_003.nii.gz")
    grid = crossdiff("evaluate", "--pred", mixed, "--ref", root / "ref", "--out", out)
    assert_clear_failure(grid, str(mixed / "STS_002.nii.gz"), "is not on the grid of its reference", "size")
    wrong_mask = crossdiff("evaluate", "--pred", root / "pred" / "STS_001.nii.gz", "--ref", root / "ref" / "STS_001.nii.gz",
                           "--mask", root / "masks" / "STS_002.nii.gz", "--out", out)
    assert_clear_failure(wrong_mask, str(root / "masks" / "STS_002.nii.gz"), "mask does not match")
    assert not out.exists()


# --------------------------------------------------------------------------------------- statistics


@pytest.fixture(scope="module")
def two_methods(cts):
    """Per-slice MAE of two synthetic CTs of STS_003, the second clearly worse (more noise, larger shift)."""
    ct, mask = cts["STS_003"]
    reference = ct.array.astype(np.float64)
    better = case_metrics(reference, _shifted(ct, 1.0, 5.0, 20.0, seed=5), mask).slices
    worse = case_metrics(reference, _shifted(ct, 2.0, 5.0, 35.0, seed=6), mask).slices
    return {r["slice"]: r["mae"] for r in better}, {r["slice"]: r["mae"] for r in worse}


def test_wilcoxon_matches_the_exact_signed_rank_distribution(two_methods):
    better, worse = two_methods
    keys = sorted(better)[:12]
    a, b = {k: better[k] for k in keys}, {k: worse[k] for k in keys}
    test = paired_wilcoxon("mae", ("A", a), ("B", b), unit="slices")
    diff = np.array([a[k] - b[k] for k in keys])
    ranks = stats.rankdata(np.abs(diff))
    observed = ranks[diff > 0].sum()
    null = np.array([sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=len(keys))])
    centre = len(keys) * (len(keys) + 1) / 4
    exact = np.mean(np.abs(null - centre) >= abs(observed - centre) - 1e-9)
    assert test.p_value == pytest.approx(exact)
    assert test.n == 12 and test.unit == "slices" and test.better == "A" and test.median_difference < 0


def test_wilcoxon_over_many_slices_matches_the_normal_approximation(two_methods):
    better, worse = two_methods
    test = paired_wilcoxon("mae", ("worse", worse), ("better", better), unit="slices")
    diff = np.array([worse[k] - better[k] for k in sorted(better)])
    n = len(diff)
    r_plus = stats.rankdata(np.abs(diff))[diff > 0].sum()
    z = (r_plus - n * (n + 1) / 4) / math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    assert n > 50
    assert test.p_value == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-6)
    assert test.better == "better" and test.significant
    assert paired_wilcoxon("psnr", ("x", worse), ("y", better)).better == "x"  # the same numbers as PSNR: higher is better


def test_wilcoxon_refuses_unpaired_values():
    with pytest.raises(CrossdiffError, match="not scored on the same cases"):
        paired_wilcoxon("mae", ("a", {"p1": 1.0, "p2": 2.0}), ("b", {"p1": 1.0, "p3": 2.0}))


def test_summary_and_bootstrap_interval_agree_with_direct_statistics(two_methods):
    better, _ = two_methods
    values = np.array(list(better.values()))
    summary = describe(values, seed=0)
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    assert (summary.n, summary.mean, summary.sd) == (len(values), pytest.approx(values.mean()), pytest.approx(values.std(ddof=1)))
    assert (summary.median, summary.iqr) == (pytest.approx(median), pytest.approx(q3 - q1))
    half_width = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    low, high = bootstrap_mean_ci(values, seed=0)
    assert low < values.mean() < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.2)
    assert bootstrap_mean_ci(values, seed=0) == (low, high)
    assert all(math.isnan(v) for v in bootstrap_mean_ci([1.0]))


# --------------------------------------------------------------------------- robustness, variability


def test_noise_robustness_adds_the_requested_noise_and_reports_the_drop():
    require_shared()
    mr = read_volume(_image("STS_003", "MR_T1"))
    mask = body_mask(mr).array.astype(bool)
    seen: list[np.ndarray] = []

    def translate(volume: Volume) -> Volume:  # a "method" that smooths in-plane: imperfect even on the clean source
        seen.append(volume.array.astype(np.float64))
        return volume.with_array(ndimage.gaussian_filter(volume.array, (0, 1, 1)))

    def score(reference, prediction, region):
        return case_metrics(reference, prediction, region, hounsfield=False).values

    rows = noise_robustness(translate, mr, mr.array, mask, score, levels=(0.03, 0.12, 0.21), seed=7)
    mean = mr.array[mask].astype(np.float64).mean()
    assert [r.level for r in rows] == [0.0, 0.03, 0.12, 0.21]
    assert rows[0].drop["mae"] == 0 and rows[0].scores["mae"] > 0
    for row, noisy in zip(rows[1:], seen[1:]):
        assert np.std(noisy - mr.array) == pytest.approx(row.level * mean, rel=0.01)
    assert rows[1].drop["mae"] < rows[2].drop["mae"] < rows[3].drop["mae"]
    assert rows[1].drop["psnr"] < rows[2].drop["psnr"] < rows[3].drop["psnr"]
    assert "me" not in rows[1].drop
    again = noise_robustness(translate, mr, mr.array, mask, score, levels=(0.03,), seed=7)
    assert again[1].scores == rows[1].scores


def test_uncertainty_correlation_and_calibration_against_direct_computation(cts):
    ct, mask = cts["STS_002"]
    gradient = ndimage.gaussian_gradient_magnitude(ct.array.astype(np.float64), 1.0)
    sigma = 10.0 + 0.2 * gradient  # a plausible std map: largest at edges
    error = np.random.default_rng(8).normal(0.0, sigma)  # errors drawn from that very spread: calibrated
    correlation = uncertainty_error_correlation(sigma, error, mask)
    direct = np.corrcoef(stats.rankdata(sigma[mask]), stats.rankdata(np.abs(error[mask])))[0, 1]
    assert correlation.rho == pytest.approx(direct, rel=1e-9) and correlation.rho > 0.2
    table = calibration_table(sigma, error, mask, bins=8)
    assert sum(b.voxels for b in table) == mask.sum()
    for b in table:
        chosen = mask & (sigma >= b.std_low) & (sigma <= b.std_high)
        assert b.rms_std == pytest.approx(np.sqrt(np.mean(sigma[chosen] ** 2)))
        assert b.rms_error == pytest.approx(b.rms_std, rel=0.05)  # calibrated by construction


def test_sample_spread_is_the_sd_of_directly_computed_metrics(cts):
    ct, mask = cts["STS_003"]
    reference = ct.array.astype(np.float64)
    samples = [_shifted(ct, 0.5, 0.0, 25.0, seed=s) for s in range(3)]
    spread = sample_spread(samples, reference, mask, lambda r, p, m: {"mae": float(np.abs(r - p)[m].mean())})
    direct = [np.abs(reference - s)[mask].mean() for s in samples]
    assert spread["mae"] == (pytest.approx(np.mean(direct)), pytest.approx(np.std(direct, ddof=1)))


# ------------------------------------------------------------------------------------- cost and FID


class _TinyMethod:
    """Only what parameter_count looks at."""

    def modules(self):
        return {"net": torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Linear(3, 4)), "head": torch.nn.Linear(2, 1)}


def test_cost_counts_parameters_reads_the_training_rate_and_measures_memory(tmp_path):
    assert cost.parameter_count(_TinyMethod()) == (2 * 9 + 2) + (3 * 4 + 4) + (2 + 1)
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "steps_per_s": 2.0}\n{"step": 20, "val_mae": 0.1}\n'
                                            '{"step": 30, "steps_per_s": 4.0}\n{"step": 40, "steps_per_s": 5.0}\n{"step"')
    assert cost.training_seconds_per_step(tmp_path) == pytest.approx(0.25)
    assert cost.training_seconds_per_step(tmp_path / "none") is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "steps_per_s": 1.0, "steps_per_cpu_s": 2.0}\n'
                                            '{"step": 30, "steps_per_s": 1.0, "steps_per_cpu_s": 4.0}\n'
                                            '{"step": 40, "steps_per_s": 1.0, "steps_per_cpu_s": 5.0}\n'
                                            '{"step": 40, "val_mae": 0.1}\n')
    assert cost.training_cpu_seconds(tmp_path) == pytest.approx(10 / 2 + 20 / 4 + 10 / 5)  # each window's steps / rate
    assert cost.training_cpu_seconds(tmp_path / "none") is None
    size = 256 * 2**20
    result, measured = cost.measure(lambda: int(np.ones(size // 8).sum()))
    assert result == size // 8
    assert measured.memory_kind == cost.CPU_MEMORY and measured.peak_memory_bytes >= size and measured.seconds > 0


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(10)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    s1, s2 = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)
    diagonal = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(diagonal)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    c1, c2 = a @ a.T + np.eye(4), b @ b.T + np.eye(4)
    trace_sqrt = np.sum(np.sqrt(np.linalg.eigvals(c1 @ c2).real))  # eigenvalues of a product of SPD matrices are > 0
    full = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * trace_sqrt
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(full)


def _vgg16_weights(path: Path) -> dict[str, torch.Tensor]:
    """Seeded random weights in torchvision's `vgg16().features` layout (13 convolutions), saved as safetensors."""
    generator = torch.Generator().manual_seed(3)
    widths = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    weights = {}
    for index, c_in, c_out in zip(indices, widths, widths[1:]):
        weights[f"features.{index}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=generator) * (2 / (9 * c_in)) ** 0.5
        weights[f"features.{index}.bias"] = torch.randn(c_out, generator=generator) * 0.01
    save_file(weights, str(path))
    return weights


def _vgg16_relu5_3_means(weights: dict[str, torch.Tensor], slices: np.ndarray) -> np.ndarray:
    """VGG16's relu5_3 features averaged over each slice, written out with torch.nn.functional alone."""
    x = torch.from_numpy(slices.astype(np.float32))[:, None].repeat(1, 3, 1, 1)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    blocks = [[0, 2], [5, 7], [10, 12, 14], [17, 19, 21], [24, 26, 28]]
    for number, block in enumerate(blocks):
        if number:
            x = torch.nn.functional.max_pool2d(x, 2, 2)
        for index in block:
            x = torch.relu(torch.nn.functional.conv2d(x, weights[f"features.{index}.weight"], weights[f"features.{index}.bias"],
                                                      padding=1))
    return x.mean(dim=(2, 3)).double().numpy()


def test_fid_uses_vgg16_features_from_a_weights_file_and_refuses_programs(cts, tmp_path):
    ct, _ = cts["STS_003"]
    real = np.clip((ct.array + 1024) / 4024, 0, 1)[10:30, ::4, ::4]
    synthetic = np.clip((_shifted(ct, 2.0, 30.0, 40.0, seed=11) + 1024) / 4024, 0, 1)[10:30, ::4, ::4]
    assert fid(real, synthetic, None).value is None and fid(real, synthetic, None).note == NOT_COMPUTED
    weights = _vgg16_weights(tmp_path / "vgg16.safetensors")
    result = fid(real, synthetic, tmp_path / "vgg16.safetensors")
    fr, fs = _vgg16_relu5_3_means(weights, real), _vgg16_relu5_3_means(weights, synthetic)
    c1, c2 = np.cov(fr, rowvar=False), np.cov(fs, rowvar=False)
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvals(c1 @ c2).real, 0, None)))
    direct = np.sum((fr.mean(0) - fs.mean(0)) ** 2) + np.trace(c1) + np.trace(c2) - 2 * trace_sqrt
    assert result.value == pytest.approx(direct, rel=1e-3, abs=1e-6)
    assert "VGG16 relu5_3" in result.note and "vgg16.safetensors" in result.note
    (tmp_path / "program.pt2").write_bytes(b"an exported program")
    with pytest.raises(InputError, match="program.pt2: is not a VGG16 weights file.*refused"):
        fid(real, synthetic, tmp_path / "program.pt2")
    (tmp_path / "broken.safetensors").write_bytes(b"not weights")
    with pytest.raises(InputError, match="broken.safetensors: cannot read"):
        fid(real, synthetic, tmp_path / "broken.safetensors")


# ------------------------------------------------------------------------------------ figures, report


def test_report_embeds_figures_and_escapes_text(cts, tmp_path):
    ct, mask = cts["STS_003"]
    reference = ct.array.astype(np.float64)
    predictions = {name: _shifted(ct, shift, 0.0, noise, seed=12) for name, shift, noise in (("a", 1.0, 20.0), ("b", 2.0, 40.0))}
    maes = {name: [r["mae"] for r in case_metrics(reference, p, mask).slices] for name, p in predictions.items()}
    middle = reference.shape[0] // 2
    paths = [
        figures.comparison_panels(tmp_path / "figures" / "panels.png", reference[middle], reference[middle],
                                  {n: p[middle] for n, p in predictions.items()}, uncertainty=np.abs(predictions["a"][middle])),
        figures.box_plots(tmp_path / "figures" / "box.png", {"mae": maes}),
        figures.noise_curves(tmp_path / "figures" / "noise.png", {"a": [(0.0, 30.0), (0.1, 50.0)]}, "MAE (HU)"),
        figures.quality_vs_cost(tmp_path / "figures" / "cost.png", {"a": (0.2, 35.0), "b": (4.0, 30.0)}, "s / slice", "MAE"),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the panels are a grid: source, reference, a, b on top; the std and each method's error below
    width, height = (int.from_bytes(paths[0].read_bytes()[offset : offset + 4], "big") for offset in (16, 20))
    assert width / height == pytest.approx((4 * 3.2) / (2 * 3.6), rel=0.01)
    table = Table.from_records([{"method": "a <b>", "mae": float(np.mean(maes["a"])), "fid": None}], caption="per method")
    markdown, page = write_report(tmp_path, "Test report", [Section("Results", "MAE & co.\n\nSecond paragraph", [table],
                                                                    [(paths[1], "MAE per slice")])])
    text = markdown.read_text()
    assert "![MAE per slice](figures/box.png)" in text and f"{np.mean(maes['a']):.4g}" in text and "n/a" in text
    content = page.read_text()
    assert "a &lt;b&gt;" in content and "MAE &amp; co." in content and "<b>" not in content
    assert "data:image/png;base64," in content and "figures/box.png" not in content


# ----------------------------------------------------------------------------------------- benchmark


def test_benchmark_trains_scores_reports_and_reuses_finished_work(tmp_path, monkeypatch):
    require_shared()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the training subprocesses: tiny networks, shared cores
    config = tmp_path / "bench.yaml"
    config.write_text(SARCOMA_MR_CT + """
test: [STS_003]
methods:
  - {method: unet, name: unet-a, config: {channels: [8, 16], strides: [2], num_res_units: 1}}
  - {method: cddpm, name: cddpm-b, timing: [{sampler: ddpm, steps: 12}],
     config: {channels: [8, 8], attention_levels: [false, false], norm_num_groups: 8, sampler: ddim, steps: 3}}
train:
  slices: {size: [32, 32], fit: resize}
  training: {steps: 10, val_every: 10, checkpoint_every: 10, log_every: 5, device: cpu}
evaluation: {slices: 8, noise_levels: [0.09]}
""")
    out = tmp_path / "out"
    first = crossdiff("benchmark", "--config", config, "--out", out)
    assert first.returncode == 0, first.stderr[-2000:]
    for name in ("results.csv", "summary.csv", "tests.csv", "cost.csv", "speed.csv", "report.md", "report.html",
                 "figures/panels.png", "figures/noise.png"):
        assert (out / name).is_file(), name
    rows = {row["method"]: row for row in _rows(out / "results.csv")}
    assert sorted(rows) == ["cddpm-b", "unet-a"]
    speed = {(row["method"], row["sampling"]): row for row in _rows(out / "speed.csv")}
    assert sorted(speed) == [("cddpm-b", "as evaluated"), ("cddpm-b", "sampler=ddpm steps=12"), ("unet-a", "as evaluated")]
    assert [speed[key]["nfe"] for key in sorted(speed)] == ["3", "12", "1"]
    timed = json.loads((out / "records" / "cddpm-b" / "STS_003.timing.json").read_text())
    assert timed[0]["slices"] == 2 and float(speed["cddpm-b", "sampler=ddpm steps=12"]["s_per_slice"]) == timed[0]["s_per_slice"]
    slowest = max(float(row["s_per_slice"]) for row in speed.values())
    for row in speed.values():
        assert float(row["speedup_vs_slowest"]) == pytest.approx(slowest / float(row["s_per_slice"]))
    for row in _rows(out / "cost.csv"):  # each training process's own peak: torch alone takes more than 100 MB
        assert 100 < float(row["train_peak_memory_mb"]) < 8192, row
    version = json.loads((out / "code-version.json").read_text())
    package = Path(crossdiff_package.__file__).parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True, check=False)
    assert version["commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    if version["commit"] is not None:
        assert f"commit {version['commit']}" in (out / "report.md").read_text()
    reference = read_volume(out / "cases" / "reference" / "STS_003.nii.gz")
    mask = read_volume(out / "cases" / "mask" / "STS_003.nii.gz").array.astype(bool)
    assert reference.shape[0] == 8
    for name, row in rows.items():
        prediction = read_volume(out / "translations" / name / "STS_003.nii.gz").array.astype(np.float64)
        for metric, value in _direct_2023(reference.array.astype(np.float64), prediction, mask).items():
            assert float(row[metric]) == pytest.approx(value, rel=1e-5), (name, metric)
    tests = _rows(out / "tests.csv")
    assert {(t["metric"], t["unit"], t["n"]) for t in tests} == {("mae", "slices", "8"), ("psnr", "slices", "8")}
    assert "not computed" in (out / "report.md").read_text()
    translated = (out / "translations" / "unet-a" / "STS_003.nii.gz").stat().st_mtime_ns
    (out / "runs" / "STS_003" / "cddpm-b" / "benchmark-train.json").unlink()  # as if killed before it was recorded
    messages: list[str] = []
    again = run_benchmark(load_benchmark_config(config), out, log=messages.append)  # in-process: no second start-up
    assert f"reusing the finished run {out / 'runs' / 'STS_003' / 'unet-a'}" in messages
    assert any(m.startswith("resuming cddpm-b") for m in messages)
    assert [r.metrics["mae"] for r in again.runs] == [pytest.approx(float(rows[m]["mae"])) for m in ("unet-a", "cddpm-b")]
    assert (out / "translations" / "unet-a" / "STS_003.nii.gz").stat().st_mtime_ns == translated
    config.write_text(config.read_text().replace("steps: 10,", "steps: 12,"))
    with pytest.raises(CrossdiffError, match="unet-a was trained with other settings"):
        run_benchmark(load_benchmark_config(config), out, log=messages.append)


def test_benchmark_with_two_targets_trains_a_multi_target_method_once_and_reports_each_target(tmp_path):
    """PET -> CT and PET -> MR: unet is trained per target, cldm (two stages, one model) once per fold in
    OUT/runs and asked for each target; each target gets its own report on its own scale."""
    require_shared()
    config = tmp_path / "bench.yaml"
    config.write_text(f"""
data: {SARCOMA}
layout: modality-folders
source: pet
target: [ct, mr]
test: [STS_003]
methods:
  - {{method: unet, config: {{channels: [8, 16], strides: [2], num_res_units: 1}}}}
  - {{method: cldm, stages: {{autoencoder: {{autoencoder: {{channels: [8, 16, 16], norm_num_groups: 4}}}},
                              diffusion: {{channels: [16, 32], attention_levels: [false, false], steps: 3}}}}}}
train:
  slices: {{size: [32, 32], fit: resize, context: 0}}
  training: {{steps: 6, val_every: 6, checkpoint_every: 6, log_every: 3, device: cpu}}
evaluation: {{slices: 8}}
""")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run([sys.executable, "-m", "crossdiff", "benchmark", "--config", str(config), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    cldm_run = out / "runs" / "STS_003" / "cldm"
    assert (cldm_run / "autoencoder" / "checkpoints").is_dir() and (cldm_run / "checkpoints").is_dir()
    saved = yaml.safe_load((cldm_run / "config.yaml").read_text())
    assert saved["method"]["config"]["targets"] == ["ct", "mr"] and saved["model"]["source"] == "pet"
    assert done.stderr.count(f"training cldm in {cldm_run}\n") == 1  # trained for ct ...
    assert f"reusing the finished run {cldm_run}" in done.stderr  # ... and reused for mr
    for target in ("ct", "mr"):
        assert (out / target / "runs" / "STS_003" / "unet" / "checkpoints").is_dir()
        assert not (out / target / "runs" / "STS_003" / "cldm").exists()
        rows = {row["method"]: row for row in _rows(out / target / "results.csv")}
        assert sorted(rows) == ["cldm", "unet"]
        reference = read_volume(out / target / "cases" / "reference" / "STS_003.nii.gz")
        assert reference.modality == target.upper()
        mask = read_volume(out / target / "cases" / "mask" / "STS_003.nii.gz").array.astype(bool)
        prediction = read_volume(out / target / "translations" / "cldm" / "STS_003.nii.gz").array.astype(np.float64)
        expected = (_direct_2023(reference.array.astype(np.float64), prediction, mask) if target == "ct"
                    else case_metrics(reference.array, prediction, mask, "synthrad2023", hounsfield=False).values)
        for metric in ("mae", "psnr"):
            assert float(rows["cldm"][metric]) == pytest.approx(expected[metric], rel=1e-5), (target, metric)
        assert f"pet -> {target}" in (out / target / "report.md").read_text()
    ct_output = read_volume(out / "ct" / "translations" / "cldm" / "STS_003.nii.gz").array
    assert ct_output.min() >= -1024.0 and ct_output.max() > 0.0  # HU for the ct code ...
    mr_output = read_volume(out / "mr" / "translations" / "cldm" / "STS_003.nii.gz").array
    assert mr_output.min() >= 0.0  # ... MR units for the mr code: one model, two targets


def test_benchmark_config_merges_quick_overrides_and_names_itself_in_errors(tmp_path):
    config = tmp_path / "bench.yaml"
    base = ("data: data\nsource: MR\ntarget: ct\ntest: leave-one-out\nmethods: [unet, {method: cddpm, name: fast}]\n"
            "train: {training: {steps: 2000, batch_size: 8}}\n")
    config.write_text(base + "quick: {train: {training: {steps: 20}}, evaluation: {slices: 8}}\n")
    full, quick = load_benchmark_config(config), load_benchmark_config(config, quick=True)
    assert full.train["training"] == {"steps": 2000, "batch_size": 8} and full.evaluation["slices"] is None
    assert quick.train["training"] == {"steps": 20, "batch_size": 8} and quick.evaluation["slices"] == 8
    assert quick.data == tmp_path / "data" and quick.source == "mr" and [m.name for m in quick.methods] == ["unet", "fast"]
    assert full.target == "ct" and full.targets == ("ct",)
    for extra, problem in (("extra: 1\n", r"unknown key\(s\) extra"), ("evaluation: {slices: 3}\n", "at least 7"),
                           ("evaluation: {metrics: synthrad2030}\n", "must be one of"),
                           ("methods: [{method: cddpm, timing: {sampler: ddpm}}]\n", "must list translation options"),
                           ("methods: [{method: cldm, stages: {encoder: {}}}]\n", "no training stage encoder; its stages: "
                                                                                    "autoencoder, diffusion"),
                           ("methods: [{method: unet, stages: {diffusion: {}}}]\n", "none"),
                           ("methods: [nonsense]\n", "unknown method 'nonsense'"),
                           ("target: [ct, CT]\n", "list of distinct ones")):
        config.write_text(base + extra)
        with pytest.raises(InputError, match=problem) as raised:
            load_benchmark_config(config)
        assert raised.value.path == config


def test_a_training_child_is_charged_its_own_peak_memory_not_its_parents():
    """Linux carries a process's peak RSS across fork and exec, so wait4's ru_maxrss would charge a small
    child with its (large) parent's size: the benchmark's training-memory column must not."""
    from crossdiff.train_command import _peak_rss_until_exit

    ballast = np.ones(400 * 2**20 // 8)  # the parent touches 400 MB
    script = "import time; block = bytearray(80 * 2**20); block[::4096] = b'x' * len(block[::4096]); time.sleep(1)"
    with subprocess.Popen([sys.executable, "-c", script]) as child:
        peak = _peak_rss_until_exit(child)
    assert child.returncode == 0 and ballast.sum() > 0
    assert 80 * 2**20 < peak < 300 * 2**20
