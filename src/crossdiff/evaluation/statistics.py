"""Summaries and paired comparisons of per-case (or per-slice) metric values.

Methods are compared on the same cases, so the tests are paired: Wilcoxon's signed-rank test makes no
normality assumption, which matters with the handful of test patients medical studies have. Slices of
one patient are not independent, so a test over slices is labelled as such and reads as descriptive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from crossdiff.errors import CrossdiffError

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 9999
ALPHA = 0.05
# Which way is better for each metric; ME (bias) has no better side, only a smaller |ME|.
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "ssim_2d": True, "ms_ssim": True}


def higher_is_better(metric: str) -> bool | None:
    """True/False for metrics with a better side (MAE-like metrics are lower-better), None for ME."""
    if metric == "me" or metric.startswith("me_"):
        return None
    return HIGHER_IS_BETTER.get(metric, False)


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    sd: float
    median: float
    q1: float
    q3: float
    ci_low: float
    ci_high: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def as_dict(self) -> dict[str, float]:
        return {"n": self.n, "mean": self.mean, "sd": self.sd, "median": self.median, "q1": self.q1, "q3": self.q3,
                "iqr": self.iqr, "ci95_low": self.ci_low, "ci95_high": self.ci_high}


def describe(values: Sequence[float], seed: int = 0) -> Summary:
    """Mean, sample SD, median, quartiles and a bootstrap 95% CI of the mean of the finite values."""
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan, nan, nan, nan)
    q1, median, q3 = np.percentile(finite, [25, 50, 75])
    sd = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
    low, high = bootstrap_mean_ci(finite, seed=seed)
    return Summary(int(finite.size), float(finite.mean()), sd, float(median), float(q1), float(q3), low, high)


def bootstrap_mean_ci(
    values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """BCa bootstrap confidence interval of the mean (scipy.stats.bootstrap), seeded so reports repeat.
    NaN for fewer than two values; a point interval when every value is the same."""
    data = np.asarray(values, dtype=np.float64)
    if data.size < 2:
        return float("nan"), float("nan")
    if np.ptp(data) == 0:
        return float(data[0]), float(data[0])
    result = stats.bootstrap(
        (data,), np.mean, confidence_level=confidence, n_resamples=resamples, method="BCa", rng=np.random.default_rng(seed)
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


@dataclass(frozen=True)
class PairedTest:
    """Wilcoxon signed-rank test of `metric` between methods `a` and `b` over `n` paired `unit` (cases
    or slices). `median_difference` is median(a - b); `better` names the method the median difference
    favours ('neither' for a zero difference or a metric without a better side); `significant` is p < 0.05.
    `effect_size` is the matched-pairs rank-biserial correlation (Kerby 2014: the share of the signed-rank
    sum favouring a - b > 0 minus the share against, from -1 to 1); `ci_low`/`ci_high` a seeded BCa
    bootstrap 95% interval of the mean difference a - b."""

    metric: str
    a: str
    b: str
    unit: str
    n: int
    statistic: float
    p_value: float
    median_difference: float
    better: str
    effect_size: float = float("nan")
    ci_low: float = float("nan")
    ci_high: float = float("nan")

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA

    def as_dict(self) -> dict[str, object]:
        return {"metric": self.metric, "a": self.a, "b": self.b, "unit": self.unit, "n": self.n,
                "statistic": self.statistic, "p_value": self.p_value, "median_difference": self.median_difference,
                "better": self.better, "significant": self.significant, "effect_size": self.effect_size,
                "mean_difference_ci95_low": self.ci_low, "mean_difference_ci95_high": self.ci_high}


def paired_wilcoxon(
    metric: str, a: tuple[str, Mapping[str, float]], b: tuple[str, Mapping[str, float]], unit: str = "cases",
    higher_better: bool | None = None,
) -> PairedTest:
    """Two-sided Wilcoxon signed-rank test of (name, {key: value}) pairs; keys (case ids, or case:slice)
    must be the same on both sides, and at least one pair must differ. `higher_better` gives the better
    side of values that are not a known metric (e.g. readers' scores); by default the metric's own."""
    (name_a, values_a), (name_b, values_b) = a, b
    if set(values_a) != set(values_b):
        only = sorted(set(values_a) ^ set(values_b))
        raise CrossdiffError(f"{name_a} and {name_b} were not scored on the same {unit}: {', '.join(only[:5])} differ")
    keys = sorted(values_a)
    diff = np.array([values_a[k] - values_b[k] for k in keys], dtype=np.float64)
    if not np.isfinite(diff).all():
        raise CrossdiffError(f"{metric}: non-finite values among the {unit} of {name_a} or {name_b}")
    if not diff.any():
        raise CrossdiffError(f"{metric}: {name_a} and {name_b} give identical values on every one of the {unit}")
    result = stats.wilcoxon(diff, alternative="two-sided")
    median = float(np.median(diff))
    better = "neither"
    direction = higher_is_better(metric) if higher_better is None else higher_better
    if direction is not None and median != 0:
        better = name_a if (median > 0) == direction else name_b
    low, high = bootstrap_mean_ci(diff)
    return PairedTest(metric, name_a, name_b, unit, len(keys), float(result.statistic), float(result.pvalue), median, better,
                      rank_biserial(diff), low, high)


def rank_biserial(differences: np.ndarray) -> float:
    """Matched-pairs rank-biserial correlation of paired differences (zeros dropped, ties mid-ranked):
    (sum of ranks of positive differences - sum of ranks of negative ones) / sum of all ranks."""
    nonzero = differences[differences != 0]
    if nonzero.size == 0:
        return 0.0
    ranks = stats.rankdata(np.abs(nonzero))
    return float((ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum()) / ranks.sum())


def pairwise_tests(
    metric: str, by_method: Mapping[str, Mapping[str, float]], unit: str = "cases", higher_better: bool | None = None
) -> list[PairedTest]:
    """Every pair of methods (in the given order) on one metric."""
    names = list(by_method)
    return [
        paired_wilcoxon(metric, (first, by_method[first]), (second, by_method[second]), unit, higher_better)
        for i, first in enumerate(names)
        for second in names[i + 1 :]
    ]
