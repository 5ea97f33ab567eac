"""PNG figures of an evaluation, drawn from plain data (arrays, {method: values}) so that the benchmark,
the demo and a user's notebook can all make them; each file is written atomically."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from crossdiff.evaluation.variability import CalibrationBin  # noqa: E402
from crossdiff.preview import Panel, save_figure, save_panel_grid  # noqa: E402

CT_WINDOW = (-160.0, 240.0)  # soft-tissue window (level 40, width 400 HU)


def comparison_panels(
    path: Path,
    source: np.ndarray,
    reference: np.ndarray,
    predictions: Mapping[str, np.ndarray],
    uncertainty: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    window: tuple[float, float] = CT_WINDOW,
    error_max: float = 300.0,
    aspect: float = 1.0,
    title: str | None = None,
) -> Path:
    """One slice as a grid: source, reference and each method on the top row; under each method its
    |error| (blank outside `mask`, where metrics do not look), and under the reference the uncertainty map."""
    low, high = np.percentile(source, [1, 99])
    inside = np.ones(reference.shape, bool) if mask is None else mask.astype(bool)
    images = [Panel("source", source, float(low), float(high)), Panel("reference", reference, *window)]
    images += [Panel(name, image, *window) for name, image in predictions.items()]
    spread = None
    if uncertainty is not None:
        spread = Panel("uncertainty (std)", uncertainty, 0.0, float(np.percentile(uncertainty, 99)) or 1.0, "viridis")
    errors = [
        Panel(f"|error| {name}", np.where(inside, np.abs(image - reference), np.nan), 0.0, error_max, "magma")
        for name, image in predictions.items()
    ]
    return save_panel_grid([images, [None, spread, *errors]], path, title=title, aspect=aspect)


def box_plots(path: Path, values: Mapping[str, Mapping[str, Sequence[float]]], labels: Mapping[str, str] | None = None) -> Path:
    """One box plot per metric ({metric: {method: values}}), methods side by side, every value drawn as a dot."""
    labels = labels or {}
    figure, axes = plt.subplots(1, len(values), figsize=(3.4 * len(values), 3.6), squeeze=False)
    for axis, (metric, by_method) in zip(axes[0], values.items()):
        names = list(by_method)
        data = [np.asarray([v for v in by_method[n] if np.isfinite(v)]) for n in names]
        axis.boxplot(data, showfliers=False)
        for position, points in enumerate(data, start=1):
            axis.scatter(np.full(len(points), position), points, s=12, color="black", alpha=0.6, zorder=3)
        axis.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
        axis.set_title(labels.get(metric, metric), fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    return save_figure(figure, path)


def noise_curves(path: Path, curves: Mapping[str, Sequence[tuple[float, float]]], metric: str) -> Path:
    """Metric against the relative noise level of the source, one line per method."""
    figure, axis = plt.subplots(figsize=(4.8, 3.6))
    for name, points in curves.items():
        levels, scores = zip(*points)
        axis.plot(np.asarray(levels) * 100, scores, marker="o", label=name)
    axis.set_xlabel("noise std (% of mean source intensity)")
    axis.set_ylabel(metric)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save_figure(figure, path)


def quality_vs_cost(path: Path, points: Mapping[str, tuple[float, float]], cost_label: str, quality_label: str) -> Path:
    """Quality against cost (seconds or NFE, log scale), one labelled point per method or setting."""
    figure, axis = plt.subplots(figsize=(4.8, 3.6))
    for name, (cost, quality) in points.items():
        axis.scatter(cost, quality, s=30)
        axis.annotate(name, (cost, quality), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if all(cost > 0 for cost, _ in points.values()):
        axis.set_xscale("log")
    axis.set_xlabel(cost_label)
    axis.set_ylabel(quality_label)
    axis.grid(alpha=0.3)
    return save_figure(figure, path)


def calibration_plot(path: Path, tables: Mapping[str, Sequence[CalibrationBin]], units: str = "HU") -> Path:
    """RMS error against RMS predicted std per bin; a calibrated method lies on the diagonal."""
    figure, axis = plt.subplots(figsize=(4.2, 4.0))
    largest = 0.0
    for name, table in tables.items():
        predicted = [b.rms_std for b in table]
        observed = [b.rms_error for b in table]
        axis.plot(predicted, observed, marker="o", label=name)
        largest = max(largest, *predicted, *observed)
    axis.plot([0, largest], [0, largest], color="grey", linestyle="--", linewidth=1, label="calibrated")
    axis.set_xlabel(f"predicted std, RMS per bin ({units})")
    axis.set_ylabel(f"observed error, RMS per bin ({units})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return save_figure(figure, path)

