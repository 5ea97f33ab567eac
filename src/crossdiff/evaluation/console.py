"""Rich tables of evaluation results for the terminal (the files hold the full precision)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

from crossdiff.evaluation.evaluate import Evaluation

if TYPE_CHECKING:  # the benchmark imports torch; `crossdiff evaluate` need not
    from crossdiff.evaluation.benchmark import BenchmarkResult


def evaluation_table(evaluation: Evaluation) -> Table:
    """Per-case rows, then mean ± SD and median [IQR] over the cases."""
    units = "HU" if evaluation.scale == "HU" else "normalised [0, 1] scale"
    table = Table(title=f"{evaluation.standard} metrics, {units}")
    table.add_column("case")
    for metric in evaluation.metrics:
        table.add_column(metric, justify="right")
    for case in evaluation.cases:
        table.add_row(case.name, *(f"{case.values[m]:.4g}" for m in evaluation.metrics))
    if len(evaluation.cases) > 1:
        summary = evaluation.summary()
        table.add_section()
        table.add_row("mean ± SD", *(f"{summary[m].mean:.4g} ± {summary[m].sd:.2g}" for m in evaluation.metrics))
        table.add_row("median [IQR]", *(f"{summary[m].median:.4g} [{summary[m].iqr:.2g}]" for m in evaluation.metrics))
    return table


def benchmark_table(result: BenchmarkResult) -> Table:
    """Mean of the main metrics over the held-out cases, and the inference cost, one row per method
    (the per-tissue MAE is in results.csv and the report)."""
    metrics = [m for m in result.runs[0].metrics if not m.startswith("mae_")]
    cases = len({r.case for r in result.runs})
    table = Table(title=f"benchmark {result.config.source} -> {result.config.target}: mean over {cases} held-out case(s)")
    for column in ("method", *metrics, "s / slice", "NFE"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name in result.methods:
        runs = [r for r in result.runs if r.method == name]
        means = [sum(r.metrics[m] for r in runs) / len(runs) for m in metrics]
        seconds = sum(r.cost["s_per_slice"] for r in runs) / len(runs)
        table.add_row(name, *(f"{v:.4g}" for v in means), f"{seconds:.3g}", str(runs[0].cost["nfe"] * runs[0].cost["samples"]))
    return table
