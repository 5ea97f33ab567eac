"""Inter-reader agreement: Krippendorff's alpha, which allows any number of readers and missing scores.

Written here rather than taken from a library: the Python packages that compute it (`krippendorff`,
`pingouin`) are licensed GPL-3.0, which an Apache-2.0 toolkit cannot depend on without passing that
licence on to its users. The formulas are those of K. Krippendorff (2011), "Computing Krippendorff's
Alpha-Reliability", University of Pennsylvania, https://repository.upenn.edu/asc_papers/43:

    coincidences   o_ck = sum over units u with m_u >= 2 values of (number of c-k pairs in u) / (m_u - 1),
                   counting ordered pairs of values given by different readers;
    marginals      n_c = sum_k o_ck,  n = sum_c n_c;
    alpha          1 - (n - 1) * sum_ck o_ck d2(c, k) / sum_ck n_c n_k d2(c, k);
    distances      nominal [c != k];  interval (c - k)^2;
                   ordinal (sum of n_g for g from c to k - (n_c + n_k) / 2)^2.

The paper's worked example (4 observers, 12 units, missing values) gives 0.743 (nominal), 0.815 (ordinal)
and 0.849 (interval); tests/test_study.py checks all three.
"""

from __future__ import annotations

import numpy as np

LEVELS = ("nominal", "ordinal", "interval")


def krippendorff_alpha(scores: np.ndarray, level: str = "ordinal") -> float:
    """Alpha of a readers x units array (NaN where a reader gave no score). NaN where it is undefined:
    fewer than two pairable values, or every value the same (no disagreement is possible to expect)."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
    data = np.asarray(scores, dtype=np.float64)
    values = np.unique(data[np.isfinite(data)])
    coincidences = np.zeros((len(values), len(values)))
    for unit in data.T:
        present = unit[np.isfinite(unit)]
        if len(present) < 2:
            continue
        counts = np.bincount(np.searchsorted(values, present), minlength=len(values)).astype(np.float64)
        coincidences += (np.outer(counts, counts) - np.diag(counts)) / (len(present) - 1)
    marginals = coincidences.sum(axis=1)
    total = marginals.sum()
    if total < 2:
        return float("nan")
    distance = _squared_distances(values, marginals, level)
    expected = float((np.outer(marginals, marginals) * distance).sum())
    if expected == 0:
        return float("nan")
    return 1.0 - (total - 1) * float((coincidences * distance).sum()) / expected


def _squared_distances(values: np.ndarray, marginals: np.ndarray, level: str) -> np.ndarray:
    if level == "nominal":
        return 1.0 - np.eye(len(values))
    if level == "interval":
        return np.subtract.outer(values, values) ** 2
    cumulative = np.cumsum(marginals)
    index = np.arange(len(values))
    low, high = np.minimum.outer(index, index), np.maximum.outer(index, index)
    between = cumulative[high] - cumulative[low] + marginals[low]  # sum of n_g for g from low to high
    return (between - (marginals[low] + marginals[high]) / 2) ** 2
