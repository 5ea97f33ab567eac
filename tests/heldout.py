"""The held-out sarcoma comparison shared by the learning tests: train on STS_001 and STS_002, translate
STS_003's whole MR volume and score it in HU inside the body against two trivial baselines, the
least-squares line from the scaled MR to HU (fitted on the training slices) and the median training HU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from helpers import SARCOMA, require_shared

from crossdiff import read_volume, resample_to
from crossdiff.data.cases import PreparationConfig, PreparedCase, prepare_case
from crossdiff.data.manifest import CaseEntry
from crossdiff.data.slices import PairedSliceDataset, SliceConfig
from crossdiff.inference import LoadedModel, ModelSpec, source_scaling, translate_volume
from crossdiff.volumes import Volume

PREPARATION = PreparationConfig(modalities=["mr", "ct"], reference="ct")
TRAINING_CASES = ("STS_001", "STS_002")
HELD_OUT_CASE = "STS_003"


def sarcoma_entry(case_id: str) -> CaseEntry:
    folder = SARCOMA / case_id
    return CaseEntry(images={"ct": folder / "CT/nifti/image/image.nii.gz", "mr": folder / "MR_T1/nifti/image/image.nii.gz"})


@dataclass
class Split:
    """The prepared cases, the model description for the training pair, and the fitted baselines."""

    cases: dict[str, PreparedCase]
    slices: SliceConfig
    spec: ModelSpec
    slope: float
    intercept: float
    constant: float

    @property
    def training(self) -> list[PreparedCase]:
        return [self.cases[cid] for cid in TRAINING_CASES]

    def mae(self, model: LoadedModel, case_id: str = HELD_OUT_CASE, samples: int = 1, **options) -> dict[str, float]:
        """MAE (HU) inside the body of `case_id` for the model's translation (mean of `samples` draws,
        and the first draw alone), the line and the constant; also the model's per-voxel spread."""
        entry = sarcoma_entry(case_id)
        ct = read_volume(entry.images["ct"])
        mr = resample_to(read_volume(entry.images["mr"]), ct)  # the MR on the CT grid, as training prepared it
        body = self.cases[case_id].mask
        result = translate_volume(model, mr, samples=samples, options=options,
                                  mask=Volume(body.astype(np.uint8), ct.geometry, "mask"), keep_samples=samples > 1)
        linear = self.slope * source_scaling(self.spec, mr, body).apply(mr.array) + self.intercept

        def error(prediction: np.ndarray | float) -> float:
            return float(np.abs(prediction - ct.array)[body].mean())

        scores = {"model": error(result.mean.array), "linear": error(linear), "constant": error(self.constant)}
        if result.samples is not None:
            scores["first_draw"] = error(result.samples[0].array)
            scores["spread"] = float(result.std.array[body].mean())
        return scores


def sarcoma_split(cache: Path, slices: SliceConfig) -> Split:
    require_shared()
    cases = {cid: prepare_case(cid, sarcoma_entry(cid), PREPARATION, cache_dir=cache)
             for cid in (*TRAINING_CASES, HELD_OUT_CASE)}
    training = [cases[cid] for cid in TRAINING_CASES]
    spec = ModelSpec.from_cases(training, "mr", "ct", slices, PREPARATION)
    plain = PairedSliceDataset(training, "mr", "ct", slices)
    items = [plain[i] for i in range(len(plain))]
    inside = np.concatenate([item["mask"][0].numpy().ravel() > 0.5 for item in items])
    x = np.concatenate([item["source"][slices.context].numpy().ravel() for item in items])[inside]
    hu = spec.target_scaling.invert(np.concatenate([item["target"][0].numpy().ravel() for item in items])[inside])
    slope, intercept = np.polyfit(x, hu, 1)
    return Split(cases, slices, spec, float(slope), float(intercept), float(np.median(hu)))
