"""Score paired cases and write the tables: what `crossdiff evaluate` does, usable from Python.

All images are read and checked and all metrics computed before anything is written, so a bad input
stops the run with nothing half-written; each output file is then written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crossdiff.atomic import write_texts
from crossdiff.errors import CrossdiffError, InputError, InputWarning
from crossdiff.evaluation.metrics import (
    AIR_BELOW_HU,
    BONE_FROM_HU,
    HU_SCALE,
    NORMALISING_PERCENTILES,
    PERCENTILE_SCALE,
    STANDARDS,
    case_metrics,
    scale_for,
)
from crossdiff.evaluation.pairing import EvaluationCase
from crossdiff.evaluation.statistics import Summary, describe
from crossdiff.masks import body_mask
from crossdiff.readers import read_mask, read_volume

MODALITIES = ("auto", "ct", "mr")
AUTOMATIC_MASK = "automatic body mask of the reference"


@dataclass(frozen=True)
class CaseResult:
    name: str
    values: dict[str, float]
    slices: list[dict[str, float]]
    mask: str  # the mask file, or AUTOMATIC_MASK


@dataclass(frozen=True)
class Evaluation:
    """Scores of every case under one standard and on one scale ('HU' or 'normalised [0, 1]')."""

    standard: str
    scale: str
    cases: list[CaseResult]
    warnings: list[str] = field(default_factory=list)  # what reading the inputs warned about (InputWarning)

    @property
    def metrics(self) -> list[str]:
        return list(self.cases[0].values) if self.cases else []

    def summary(self, seed: int = 0) -> dict[str, Summary]:
        return {metric: describe([case.values[metric] for case in self.cases], seed=seed) for metric in self.metrics}


def evaluate_cases(
    cases: Sequence[EvaluationCase],
    standard: str = "synthrad2023",
    modality: str = "auto",
    progress: Callable[[str], None] | None = None,
    units: str | None = None,
    planar: bool = False,
) -> Evaluation:
    """Read and score every case. `modality` 'ct' scores in HU, 'mr' on the normalised [0, 1] scale, 'auto'
    decides from the reference's modality and units (a CT in HU -> HU; display grey levels -> [0, 1] by
    their 0-255 range; anything else -> [0, 1] by the reference's percentiles); `units` overrides the
    units read from the files. All cases must share one scale. `planar` scores SSIM per 2-D slice
    (automatic for slice stacks and cases thinner than 7 voxels). `progress` is called with each case's
    name once it is scored."""
    if standard not in STANDARDS:
        raise CrossdiffError(f"unknown metric standard {standard!r}; choose from {', '.join(STANDARDS)}")
    if modality not in MODALITIES:
        raise CrossdiffError(f"unknown modality {modality!r}; choose from {', '.join(MODALITIES)}")
    results, scales = [], set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InputWarning)
        for case in cases:
            result, scale = _score(case, standard, modality, units, planar)
            results.append(result)
            scales.add(scale)
            if progress is not None:
                progress(case.name)
    for warning in caught:  # shown as usual, and kept for summary.json: a default the reader assumed is part of the result
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if len(scales) > 1:
        raise CrossdiffError("the references mix CT and other modalities; pass --modality ct or --modality mr")
    notes = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, InputWarning)))
    return Evaluation(standard, scales.pop() if scales else "HU", results, notes)


def _score(case: EvaluationCase, standard: str, modality: str, units: str | None, planar: bool) -> tuple[CaseResult, str]:
    forced = {"ct": "CT", "mr": "MR"}.get(modality)
    reference = read_volume(case.reference, modality=forced, units=units)
    prediction = read_volume(case.prediction, modality=reference.modality, units=reference.units)
    if not prediction.geometry.matches(reference.geometry):
        raise InputError(
            case.prediction,
            f"is not on the grid of its reference {case.reference}: "
            f"{prediction.geometry.describe_difference(reference.geometry)}; resample it first (crossdiff resample)",
        )
    if case.mask is not None:
        mask = read_mask(case.mask, reference).array
    else:
        mask = body_mask(reference).array
    scale = {"ct": HU_SCALE, "mr": PERCENTILE_SCALE}.get(modality) or scale_for(reference.modality, reference.units)
    try:
        metrics = case_metrics(reference.array, prediction.array, mask, standard, scale=scale,
                               planar=planar or reference.planar)
    except CrossdiffError as error:
        raise InputError(case.prediction, str(error)) from None
    source = str(case.mask) if case.mask is not None else AUTOMATIC_MASK
    return CaseResult(case.name, metrics.values, metrics.slices, source), metrics.scale


# ---------------------------------------------------------------------------------------- outputs


def write_evaluation(evaluation: Evaluation, out: Path, seed: int = 0) -> list[Path]:
    """metrics.csv (one row per case), slices.csv, summary.csv and summary.json in `out`, as one set: all
    four are written and flushed before any replaces an earlier one (crossdiff.atomic.write_texts)."""
    summary = evaluation.summary(seed)
    case_rows = [{"case": c.name, **c.values, "scale": evaluation.scale, "mask": c.mask} for c in evaluation.cases]
    slice_rows = [{"case": c.name, **row, "scale": evaluation.scale} for c in evaluation.cases for row in c.slices]
    summary_rows = [{"metric": metric, **stats.as_dict()} for metric, stats in summary.items()]
    return write_texts(out, {
        "metrics.csv": csv_text(case_rows),
        "slices.csv": csv_text(slice_rows),
        "summary.csv": csv_text(summary_rows),
        "summary.json": json.dumps(plain_json(describe_evaluation(evaluation, summary)), indent=2) + "\n",
    })


def describe_evaluation(evaluation: Evaluation, summary: dict[str, Summary]) -> dict[str, Any]:
    """What was measured and how, with the per-metric summary and the case values (for summary.json)."""
    standard = STANDARDS[evaluation.standard]
    if evaluation.scale == "HU":
        scale = {"units": "HU", "clip": list(standard.hu_range), "data_range": standard.hu_range[1] - standard.hu_range[0],
                 "tissue_classes_hu": {"air": f"< {AIR_BELOW_HU:g}", "soft_tissue": f"[{AIR_BELOW_HU:g}, {BONE_FROM_HU:g})",
                                       "bone": f">= {BONE_FROM_HU:g}"}}
    elif "display" in evaluation.scale:
        scale = {"units": evaluation.scale, "clip": [0.0, 1.0], "data_range": 1.0,
                 "normalisation": "display grey levels 0-255 divided by 255 (a display-windowed image has no physical "
                                  "units); a CT's bone class: reference >= 250 (clipped white by its window)"}
    else:
        scale = {"units": "normalised [0, 1]", "clip": [0.0, 1.0], "data_range": 1.0,
                 "normalisation": f"reference {NORMALISING_PERCENTILES[0]}-{NORMALISING_PERCENTILES[1]} percentile window "
                                  "inside the mask, applied to both images"}
    return {
        "standard": evaluation.standard,
        "structural_metric": "ssim_2d (per 2-D slice)" if "ssim_2d" in evaluation.metrics else standard.structural,
        "scale": scale,
        "me_sign": "prediction minus reference",
        "cases": len(evaluation.cases),
        "summary": {metric: stats.as_dict() for metric, stats in summary.items()},
        "values": {case.name: case.values for case in evaluation.cases},
        "masks": {case.name: case.mask for case in evaluation.cases},
        "input_warnings": evaluation.warnings,
    }


def csv_text(rows: list[dict[str, Any]]) -> str:
    """Rows with the same keys as CSV text (NaN written as an empty cell)."""
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()})
    return buffer.getvalue()


def plain_json(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become null (JSON has no such numbers), numpy scalars plain."""
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
