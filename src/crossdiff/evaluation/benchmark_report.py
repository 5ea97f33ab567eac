"""Tables, figures and the report of a benchmark run: results.csv (one row per method and case),
summary.csv, tests.csv, cost.csv, speed.csv, code-version.json, figures/*.png, report.md and report.html."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossdiff.atomic import write_json, write_text
from crossdiff.errors import CrossdiffError
from crossdiff.evaluation import figures
from crossdiff.evaluation.benchmark import BenchmarkResult, CaseRun
from crossdiff.evaluation.evaluate import csv_text
from crossdiff.evaluation.fid import FidResult, fid
from crossdiff.evaluation.metrics import HU_RANGE, Scale, normalise_pair
from crossdiff.evaluation.report import Section, Table, write_report
from crossdiff.evaluation.statistics import PairedTest, describe, pairwise_tests
from crossdiff.evaluation.variability import CalibrationBin
from crossdiff.provenance import code_version, describe_code_version
from crossdiff.readers import read_mask, read_output, read_volume

MAIN_METRICS = ("mae", "me", "psnr", "ssim", "ssim_2d", "ms_ssim", "mae_bone")
SLICE_METRICS = ("mae", "psnr")


def write_benchmark_report(result: BenchmarkResult) -> list[Path]:
    """Every table, figure and the report into result.out; returns the files written."""
    out = result.out
    names = list(result.methods)
    metrics = [m for m in result.runs[0].metrics]
    tables = {
        "results.csv": _results_rows(result.runs),
        "summary.csv": _summary_rows(result.runs, names, metrics),
        "tests.csv": [test.as_dict() for test in _tests(result.runs, names)],
        "cost.csv": _cost_rows(result),
        "speed.csv": _speed_rows(result),
    }
    if result.tuning:
        tables["tuning.csv"] = [row for choice in result.tuning for row in choice.rows]
    for file, rows in tables.items():
        write_text(out / file, csv_text(rows))
    write_json(out / "code-version.json", code_version())
    fid_results = _fid(result, names)
    drawn = _figures(result, names, out / "figures")
    sections = _sections(result, names, tables, fid_results, drawn)
    title = f"Benchmark: {result.config.source} -> {result.config.target}, {len(names)} methods"
    report = write_report(out, title, sections, intro=_intro(result))
    return ([out / file for file in tables] + [out / "code-version.json"] + [path for path, _ in drawn.values()]
            + list(report))


# -------------------------------------------------------------------------------------------- tables


def _results_rows(runs: Sequence[CaseRun]) -> list[dict[str, Any]]:
    keep = ("s_per_slice", "nfe", "samples")
    return [{"method": r.method, "fold": r.fold, "case": r.case, **r.metrics, "s_per_volume": r.cost["seconds"],
             **{k: r.cost[k] for k in keep}} for r in runs]


def _summary_rows(runs: Sequence[CaseRun], names: list[str], metrics: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        mine = [r for r in runs if r.method == name]
        for metric in metrics:
            rows.append({"method": name, "metric": metric, **describe([r.metrics[metric] for r in mine]).as_dict()})
    return rows


def _by_method(runs: Sequence[CaseRun], names: list[str], metric: str, slices: bool) -> dict[str, dict[str, float]]:
    values: dict[str, dict[str, float]] = {name: {} for name in names}
    for run in runs:
        if slices:
            values[run.method] |= {f"{run.case}:{row['slice']}": row[metric] for row in run.slices}
        else:
            values[run.method][run.case] = run.metrics[metric]
    return values


def _tests(runs: Sequence[CaseRun], names: list[str]) -> list[PairedTest]:
    """Paired Wilcoxon tests between every two methods: over cases for every main metric, over slices for MAE/PSNR."""
    if len(names) < 2:
        return []
    tests = []
    cases = len({r.case for r in runs})
    for metric in [m for m in MAIN_METRICS if m in runs[0].metrics]:
        for unit, per_slice in (("cases", False), ("slices", True)):
            if (per_slice and metric not in SLICE_METRICS) or (not per_slice and cases < 2):
                continue
            try:
                tests += pairwise_tests(metric, _by_method(runs, names, metric, per_slice), unit)
            except CrossdiffError:
                continue  # identical values (e.g. the same method twice): nothing to test
    return tests


def _cost_rows(result: BenchmarkResult) -> list[dict[str, Any]]:
    rows = []
    for name, info in result.methods.items():
        mine = [r.cost for r in result.runs if r.method == name]
        rows.append({
            "method": name,
            "parameters": info.parameters,
            "train_s_per_step": _mean(info.train_seconds_per_step),
            "train_minutes": None if not info.train_seconds else _mean(info.train_seconds) / 60,
            "train_cpu_s": None if not info.train_cpu_seconds else _mean(info.train_cpu_seconds),
            "train_peak_memory_mb": max(info.train_peak_memory_bytes) / 2**20 if info.train_peak_memory_bytes else None,
            "s_per_volume": float(np.mean([c["seconds"] for c in mine])),
            "s_per_slice": float(np.mean([c["s_per_slice"] for c in mine])),
            "nfe_per_draw": mine[0]["nfe"],
            "draws": mine[0]["samples"],
            "peak_memory_mb": max(c["peak_memory_bytes"] for c in mine) / 2**20,
            "memory": mine[0]["memory"],
        })
    return rows


def _speed_rows(result: BenchmarkResult) -> list[dict[str, Any]]:
    """Seconds per slice of one draw: each method as evaluated (mean over folds), and each extra sampler
    its config times on the same trained model (`timing`), with the speed-up over the slowest row."""
    rows = []
    for name in result.methods:
        mine = [r for r in result.runs if r.method == name]
        rows.append({"method": name, "sampling": "as evaluated", "nfe": mine[0].cost["nfe"],
                     "s_per_slice": float(np.mean([r.cost["s_per_slice"] / r.cost["samples"] for r in mine]))})
        timed = [row for r in mine for row in r.timing or []]
        for label in dict.fromkeys(row["options"] for row in timed):
            same = [row for row in timed if row["options"] == label]
            rows.append({"method": name, "sampling": label, "nfe": same[0]["nfe"],
                         "s_per_slice": float(np.mean([row["s_per_slice"] for row in same]))})
    slowest = max(row["s_per_slice"] for row in rows)
    return [{**row, "speedup_vs_slowest": slowest / row["s_per_slice"]} for row in rows]


def _mean(values: list[float]) -> float | None:
    """Mean over the folds where the value is known (a reused or resumed run may not know its time)."""
    return float(np.mean(values)) if values else None


# ----------------------------------------------------------------------------------------------- FID


def _fid(result: BenchmarkResult, names: list[str]) -> dict[str, FidResult]:
    """FID of each method's masked slices against the references', only with the configured extractor."""
    extractor = result.config.fid_features
    if extractor is None:
        return {name: fid(np.empty(0), np.empty(0), None) for name in names}
    results = {}
    for name in names:
        real, synthetic = [], []
        for run in (r for r in result.runs if r.method == name):
            reference, prediction, mask = _case_arrays(result, name, run.case)
            a, b = _unit_scale(reference, prediction, mask, result.scale)
            filled = mask.any(axis=(1, 2))
            real.append(a[filled])
            synthetic.append(b[filled])
        results[name] = fid(np.concatenate(real), np.concatenate(synthetic), extractor)
    return results


def _unit_scale(
    reference: np.ndarray, prediction: np.ndarray, mask: np.ndarray, scale: Scale
) -> tuple[np.ndarray, np.ndarray]:
    if not scale.hounsfield:
        return normalise_pair(reference, prediction, mask, scale.window)
    low, high = HU_RANGE
    return tuple(np.clip((image - low) / (high - low), 0.0, 1.0) for image in (reference, prediction))  # type: ignore[return-value]


def _case_arrays(result: BenchmarkResult, name: str, case: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cases = result.out / "cases"
    reference = read_volume(cases / "reference" / f"{case}.nii.gz")
    prediction = read_output(result.out / "translations" / name / f"{case}.nii.gz")
    mask = read_mask(cases / "mask" / f"{case}.nii.gz", reference)
    return reference.array.astype(np.float64), prediction.array.astype(np.float64), mask.array.astype(bool)


# ------------------------------------------------------------------------------------------- figures


def _figures(result: BenchmarkResult, names: list[str], folder: Path) -> dict[str, tuple[Path, str]]:
    runs = result.runs
    structural = next(m for m in ("ssim", "ssim_2d", "ms_ssim") if m in runs[0].metrics)
    units = "HU" if result.hounsfield else "normalised"
    panels = _panels(result, names, folder / "panels.png")
    drawn = {} if panels is None else {"panels": (panels, _panel_caption(result, _panel_case(result, names)))}
    box = {m: {n: [r.metrics[m] for r in runs if r.method == n] for n in names} for m in ("mae", "psnr", structural)}
    box["mae per slice"] = {n: [row["mae"] for r in runs if r.method == n for row in r.slices] for n in names}
    drawn["box"] = (figures.box_plots(folder / "metrics.png", box), f"Metrics per held-out case (MAE per slice last; {units})")
    mae = {n: float(np.mean([r.metrics["mae"] for r in runs if r.method == n])) for n in names}
    seconds = {n: float(np.mean([r.cost["s_per_slice"] for r in runs if r.method == n])) for n in names}
    nfe = {n: float(next(r.cost["nfe"] * r.cost["samples"] for r in runs if r.method == n)) for n in names}
    drawn["speed"] = (figures.quality_vs_cost(folder / "mae-vs-seconds.png", {n: (seconds[n], mae[n]) for n in names},
                                              "seconds per slice", f"MAE ({units})"), "Mean MAE against inference time")
    drawn["nfe"] = (figures.quality_vs_cost(folder / "mae-vs-nfe.png", {n: (nfe[n], mae[n]) for n in names},
                                            "network evaluations per slice (all draws)", f"MAE ({units})"),
                    "Mean MAE against NFE")
    curves = {r.method: [(row["level"], row["scores"]["mae"]) for row in r.noise] for r in runs if r.noise}
    if curves:
        drawn["noise"] = (figures.noise_curves(folder / "noise.png", curves, f"MAE ({units})"),
                          "MAE against Gaussian noise added to the source (first held-out case of each fold)")
    tables: dict[str, list[CalibrationBin]] = {}
    for run in (r for r in runs if r.variability):
        tables.setdefault(run.method, [CalibrationBin(**b) for b in run.variability["calibration"]])
    if tables:
        drawn["calibration"] = (figures.calibration_plot(folder / "calibration.png", tables, _volume_units(result.scale)),
                                "Observed error against predicted std (first case of each stochastic method)")
    return drawn


def _panels(result: BenchmarkResult, names: list[str], path: Path) -> Path | None:
    """The central slice of the first held-out case whose every translation this checkout holds (None when
    none does: a report finished from committed records)."""
    cases = result.out / "cases"
    drawn = [r.case for r in result.runs if (cases / "source" / f"{r.case}.nii.gz").is_file()
             and all((result.out / "translations" / n / f"{r.case}.nii.gz").is_file() for n in names)]
    if not drawn:
        return None
    case = drawn[0]
    source = read_volume(cases / "source" / f"{case}.nii.gz").array
    reference = read_volume(cases / "reference" / f"{case}.nii.gz")
    middle = reference.shape[0] // 2
    predictions = {n: read_output(result.out / "translations" / n / f"{case}.nii.gz").array[middle] for n in names}
    uncertainty = None
    for name in names:
        file = result.out / "uncertainty" / name / f"{case}.nii.gz"
        if file.is_file():
            uncertainty = read_output(file).array[middle]
            break
    mask = read_volume(cases / "mask" / f"{case}.nii.gz").array[middle]
    spacing = reference.geometry.spacing
    window = figures.CT_WINDOW if result.hounsfield else result.scale.window or tuple(np.percentile(reference.array, [1, 99]))
    error_max = 300.0 if result.hounsfield else float(window[1] - window[0]) / 2
    return figures.comparison_panels(path, source[middle], reference.array[middle], predictions, uncertainty, mask,
                                     window=window, error_max=error_max, aspect=spacing[1] / spacing[0])


def _panel_case(result: BenchmarkResult, names: list[str]) -> str:
    return next(r.case for r in result.runs
                if all((result.out / "translations" / n / f"{r.case}.nii.gz").is_file() for n in names))


def _panel_caption(result: BenchmarkResult, case: str) -> str:
    stochastic = [n for n, info in result.methods.items() if info.stochastic]
    drawn = stochastic and result.config.evaluation["samples"] > 1
    std = f"; under the reference, the std of the {stochastic[0]} draws" if drawn else ""
    return f"Central slice of {case}: source, reference and each method; under each method its absolute error{std}"


# ------------------------------------------------------------------------------------------ sections


_CASE_SCALE = (" (each translation first put on its held-out reference's own intensity scale: through the model's "
               "target scaling and back through the one the preparation fitted to that reference)")


def _intro(result: BenchmarkResult) -> str:
    config = result.config
    training = config.train["training"]
    folds = "; ".join(f"{fold}: held out {', '.join(cases)}" for fold, cases in result.folds.items())
    machine = f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
    return (
        f"Config {config.path.name}; data {config.data}. Folds: {folds}. Every method trained with the same sections "
        f"(slices {config.train['slices'] or 'default'}, preparation {config.train['preparation'] or 'default'}, "
        f"training {training or 'default'}).\n\n"
        f"Metrics: {config.evaluation['metrics']} definitions inside the body mask"
        f"{'' if result.hounsfield else f', on the {result.scale.label} scale'}"
        f"{_CASE_SCALE if config.evaluation['target_intensity'] == 'case' else ''}"
        f"{'; SSIM per 2-D slice (the cases are stacks of 2-D images)' if result.planar else ''}; "
        f"ME is prediction minus reference. Machine: {machine}. Code: {describe_code_version()}."
    )


def _sections(result: BenchmarkResult, names: list[str], tables: dict[str, list[dict[str, Any]]],
              fid_results: dict[str, FidResult], drawn: dict[str, tuple[Path, str]]) -> list[Section]:
    summary = tables["summary.csv"]
    metrics = list(dict.fromkeys(row["metric"] for row in summary))
    overview = [{"method": n, **{m: _mean_sd(summary, n, m) for m in metrics}} for n in names]
    cases = len({r.case for r in result.runs})
    over_cases = (f"Over {cases} cases the smallest possible p-value is {2 / 2 ** cases:.3g}" if cases > 1
                  else "With one held-out case there is no test over cases")
    test_note = (f"Paired two-sided Wilcoxon signed-rank tests. {over_cases}; tests over slices treat the slices of one "
                 "patient as independent, which they are not: read them as descriptive.")
    sections = [
        Section("Results", "Mean ± SD over the held-out cases.", [Table.from_records(overview)],
                [drawn[key] for key in ("panels", "box") if key in drawn]),
        *_group_sections(result, names, metrics),
        Section("Per case", "", [Table.from_records(tables["results.csv"])]),
        Section("Statistical tests", test_note + " " + _best_note(tables["tests.csv"], overview),
                [Table.from_records(_best_against_others(tables["tests.csv"], overview))] if tables["tests.csv"] else []),
        Section("Cost", "Means over folds. Training minutes: wall time of each training process, preparation "
                "included (it depends on what else ran); training CPU seconds: the CPU time of its training loop (each "
                "logged window's steps over its rate), the training budget it used. "
                "Training peak memory: the peak RSS of each training process (the largest over folds). "
                "Translation peak memory: " + result.runs[0].cost["memory"] + ".", [Table.from_records(tables["cost.csv"])],
                [drawn["speed"], drawn["nfe"]]),
        Section("Sampling speed", "Seconds per slice for one draw (translation time over translated slices and draws). "
                "Rows other than 'as evaluated' time another sampler of the same trained model on the central "
                f"{result.config.evaluation['timing_slices']} slices of each fold's first held-out case "
                "(speed only, not scored).",
                [Table.from_records(tables["speed.csv"])]),
    ]
    if "noise" in drawn:
        rows = [{"method": r.method, "case": r.case, "level": row["level"], **{f"drop_{k}": v for k, v in row["drop"].items()}}
                for r in result.runs if r.noise for row in r.noise]
        sections.append(Section("Noise robustness", "Drop: degradation from the clean source (positive = worse).",
                                [Table.from_records(rows)], [drawn["noise"]]))
    variability = [_variability_row(result, r) for r in result.runs if r.variability]
    if variability:
        sections.append(Section("Sample variability and uncertainty",
                                "SD of each metric over the single draws; Spearman correlation of the per-voxel std "
                                "with the absolute error of the mean inside the mask; the median std and the median "
                                f"absolute error inside the mask (in {_volume_units(result.scale)}"
                                f"{'' if result.hounsfield else ', not the [0, 1] scale of the tables above'}) and their "
                                "ratio (1: the spread is as large as the error).",
                                [Table.from_records(_uncertainty_summary(variability)), Table.from_records(variability)],
                                [drawn["calibration"]] if "calibration" in drawn else []))
    if "tuning.csv" in tables:
        tuning = result.config.tuning
        sections.append(Section(
            "Hyper-parameter choice",
            "Each tuned method's candidates, every one trained per fold with the method's budget on the fold's "
            "training cases and scored on its validation cases (the case `crossdiff train` carves out of the "
            "training cases, or, with fewer than four, the training cases themselves; "
            f"{tuning['metric']} of their central {tuning['slices']} slices, {tuning['samples']} draw(s) per "
            "stochastic translation); the best became the fold's model. The held-out cases chose nothing.",
            [Table.from_records(tables["tuning.csv"])]))
    fid_rows = [{"method": n, "fid": f.value, "note": f.note} for n, f in fid_results.items()]
    sections.append(Section("FID", "", [Table.from_records(fid_rows)]))
    return sections


def _group_sections(result: BenchmarkResult, names: list[str], metrics: list[str]) -> list[Section]:
    """Mean ± SD per method over the held-out cases of each configured group (e.g. brain, body)."""
    rows = []
    for group, members in result.config.groups.items():
        for name in names:
            runs = [r for r in result.runs if r.method == name and r.case in members]
            if runs:
                rows.append({"group": group, "method": name, "cases": len(runs), **{
                    m: _format(describe([r.metrics[m] for r in runs])) for m in metrics if m in MAIN_METRICS}})
    if not rows:
        return []
    return [Section("Per group", "Mean ± SD over the held-out cases of each group of the config.", [Table.from_records(rows)])]


def _format(summary: Any) -> str:
    if summary.n == 0:
        return "n/a"
    return f"{summary.mean:.4g}" + ("" if summary.n < 2 else f" ± {summary.sd:.2g}")


def _best_against_others(tests: list[dict[str, Any]], overview: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The MAE tests over cases between the method with the lowest mean MAE and every other (all in tests.csv)."""
    best = _best_method(overview)
    keep = ("a", "b", "n", "p_value", "median_difference", "effect_size", "mean_difference_ci95_low",
            "mean_difference_ci95_high", "better", "significant")
    return [{k: row[k] for k in keep} for row in tests
            if row["metric"] == "mae" and row["unit"] == "cases" and best in (row["a"], row["b"])]


def _best_method(overview: list[dict[str, Any]]) -> str:
    return min(overview, key=lambda row: float(str(row["mae"]).split()[0]))["method"]


def _best_note(tests: list[dict[str, Any]], overview: list[dict[str, Any]]) -> str:
    over_cases = [row for row in tests if row["unit"] == "cases"]
    significant = [row for row in over_cases if row["significant"]]
    return (f"Shown: MAE over cases, {_best_method(overview)} (lowest mean MAE) against every other method, with the "
            "matched-pairs rank-biserial effect size (-1 to 1; its sign follows a - b) and a bootstrap 95% CI of the mean "
            f"difference. Over cases, {len(significant)} of {len(over_cases)} tests (every pair, every main metric; "
            "tests.csv) reach p < 0.05, uncorrected for multiple comparisons.")


def _mean_sd(summary: list[dict[str, Any]], method: str, metric: str) -> str:
    row = next(r for r in summary if r["method"] == method and r["metric"] == metric)
    if row["n"] == 0:
        return "n/a"
    return f"{row['mean']:.4g}" + ("" if row["n"] < 2 else f" ± {row['sd']:.2g}")


def _variability_row(result: BenchmarkResult, run: CaseRun) -> dict[str, Any]:
    spread = run.variability["spread"]
    return {"method": run.method, "case": run.case, "draws": run.variability["draws"],
            **{f"sd_{m}": spread[m]["sd"] for m in spread if m in MAIN_METRICS},
            "spearman_rho": run.variability["spearman"]["rho"], **_spread_and_error(result, run)}


def _spread_and_error(result: BenchmarkResult, run: CaseRun) -> dict[str, float]:
    """Median per-voxel std and median |error| inside the mask, from the saved volumes (empty where this
    checkout does not hold them: a report finished from committed records)."""
    std_file = result.out / "uncertainty" / run.method / f"{run.case}.nii.gz"
    if not std_file.is_file() or not (result.out / "translations" / run.method / f"{run.case}.nii.gz").is_file():
        return {}
    reference, prediction, mask = _case_arrays(result, run.method, run.case)
    spread = read_volume(std_file).array[mask]
    error = float(np.median(np.abs(prediction - reference)[mask]))
    return {"median_std": float(np.median(spread)), "median_abs_error": error,
            "std_over_error": float(np.median(spread)) / error if error > 0 else float("nan")}


def _volume_units(scale: Scale) -> str:
    """The units of the saved volumes, which spreads, errors and calibration bins are measured in."""
    if scale.hounsfield:
        return "HU"
    if scale.window is not None:
        return f"grey levels {scale.window[0]:g}-{scale.window[1]:g}"
    return "target units"


def _uncertainty_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: the mean Spearman over cases and the median ratio of spread to error."""
    summary = []
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        ratios = [row["std_over_error"] for row in mine if "std_over_error" in row]
        summary.append({"method": method, "cases": len(mine), "mean_spearman": float(np.mean([r["spearman_rho"] for r in mine])),
                        "min_spearman": float(np.min([r["spearman_rho"] for r in mine])),
                        "median_std_over_error": float(np.median(ratios)) if ratios else None})
    return summary
