"""The held-out comparisons shared by the learning tests.

Paired sarcoma MR -> CT: train on STS_001 and STS_002, translate STS_003's whole MR volume and score it
in HU inside the body against two trivial baselines, the least-squares line from the scaled MR to HU
(fitted on the training slices) and the median training HU. Unpaired brain T1 -> T2: see BrainUnpaired.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from helpers import BRAIN, SARCOMA, require_shared
from scipy.stats import spearmanr

from crossdiff import read_volume, resample_to, write_volume
from crossdiff.data.cases import PreparationConfig, PreparedCase, prepare_case
from crossdiff.data.manifest import CaseEntry
from crossdiff.data.slices import PairedSliceDataset, SliceConfig, UnpairedSliceDataset
from crossdiff.inference import LoadedModel, ModelSpec, source_scaling, translate_volume
from crossdiff.volumes import Geometry, Volume

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


# ------------------------------------------------------------------------------ unpaired brain T1 -> T2

BRAIN_SLICES = SliceConfig(size=(48, 48), fit="pad-crop", context=0, seed=0)
BRAIN_PREPARATION = PreparationConfig(modalities=["t1", "t2"], reference="t2", scaling={"t1": "mean", "t2": "mean"})
BRAIN_FILES = {"t1": "BraTS-GLI-00001-000/t1n.nii.gz", "t2": "TCGA-FG-6692/t2.nii.gz",
               "new_t1": "TCGA-DU-7294/t1.nii.gz", "new_t2": "TCGA-DU-7294/t2.nii.gz"}


def shrunk(path: Path, out: Path, factor: int = 5, axial: slice = slice(30, 130, 3)) -> Path:
    """A smaller copy of a 240 x 240 x 155 brain volume, for CPU time: every 3rd axial slice of the
    central 100, in-plane 5 x 5 block means (1 mm -> 5 mm), on the matching physical grid."""
    volume = read_volume(path)
    stack = volume.array[axial]
    h, w = stack.shape[1] // factor, stack.shape[2] // factor
    array = stack[:, : h * factor, : w * factor].reshape(len(stack), h, factor, w, factor).mean(axis=(2, 4))
    g = volume.geometry
    spacing = (g.spacing[0] * factor, g.spacing[1] * factor, g.spacing[2] * axial.step)
    shift = np.array([(factor - 1) / 2 * g.spacing[0], (factor - 1) / 2 * g.spacing[1], axial.start * g.spacing[2]])
    origin = tuple(float(o) for o in np.array(g.origin) + np.array(g.direction).reshape(3, 3) @ shift)
    return write_volume(Volume(array.astype(np.float32), Geometry((w, h, len(stack)), spacing, origin, g.direction), "MR"), out)


@dataclass
class BrainUnpaired:
    """T1 of one subject (BraTS-GLI-00001-000) and T2 of another (TCGA-FG-6692), never paired, for
    training; TCGA-DU-7294's T1 to translate and its T2 as the truth (normalised scale, inside the
    brain). All three are 1 mm SRI24-registered volumes (240 x 240 x 155, LPS), shrunk for CPU.

    Trivial baselines: the subject's T1 taken as its T2 (identity), the monotone map that matches the
    training T1 histogram to the reversed training T2 one (the best intensity-only guess without
    pairs), and the median training T2. Rank correlation with the truth is the same for every
    monotone map of T1, so beating |Spearman(T1, T2)| means more than an intensity map."""

    files: dict[str, Path]
    source: PreparedCase
    target: PreparedCase
    new: PreparedCase
    spec: ModelSpec

    def training_set(self) -> UnpairedSliceDataset:
        return UnpairedSliceDataset([self.source], [self.target], "t1", "t2", BRAIN_SLICES, augment=True)

    def scores(self, model: LoadedModel, samples: int = 1) -> tuple[dict[str, float], dict[str, float]]:
        """MAE (normalised) of the model and the three baselines, and Spearman of the model and of T1; with
        samples > 1 also 'spread', the mean per-voxel std of the draws inside the brain (normalised scale)."""
        t1 = read_volume(self.files["new_t1"])
        brain = self.new.mask
        translated = translate_volume(model, t1, samples=samples, mask=Volume(brain.astype(np.uint8), t1.geometry, "mask"))
        assert translated.mean.geometry == t1.geometry
        prediction = self.spec.target_scaling.apply(translated.mean.array)[brain]  # back to the normalised scale
        truth, new_t1 = self.new.images["t2"][brain], self.new.images["t1"][brain]
        levels = np.linspace(0.0, 1.0, 101)
        matched = np.interp(new_t1, np.quantile(self.source.images["t1"][self.source.mask], levels),
                            np.quantile(self.target.images["t2"][self.target.mask], levels[::-1]))

        def mae(guess: np.ndarray | float) -> float:
            return float(np.abs(guess - truth).mean())

        maes = {"model": mae(prediction), "identity": mae(new_t1), "histogram": mae(matched),
                "constant": mae(float(np.median(self.target.images["t2"][self.target.mask])))}
        if translated.std is not None:  # the scaling is linear inside its window: a std scales by its slope
            scaling = self.spec.target_scaling
            maes["spread"] = float(2.0 / (scaling.high - scaling.low) * translated.std.array[brain].mean())
        ranks = {"model": float(spearmanr(prediction, truth)[0]), "t1": float(spearmanr(new_t1, truth)[0])}
        return maes, ranks


def brain_unpaired(folder: Path) -> BrainUnpaired:
    require_shared()
    files = {name: shrunk(BRAIN / relative, folder / f"{name}.nii.gz") for name, relative in BRAIN_FILES.items()}
    source = prepare_case("BraTS-GLI-00001-000", CaseEntry(images={"t1": files["t1"]}), BRAIN_PREPARATION)
    target = prepare_case("TCGA-FG-6692", CaseEntry(images={"t2": files["t2"]}), BRAIN_PREPARATION)
    new = prepare_case("TCGA-DU-7294", CaseEntry(images={"t1": files["new_t1"], "t2": files["new_t2"]}), BRAIN_PREPARATION)
    target_scaling = ModelSpec.from_cases([target], "t2", "t2", BRAIN_SLICES, BRAIN_PREPARATION).target_scaling
    spec = replace(ModelSpec.from_cases([source], "t1", "t1", BRAIN_SLICES, BRAIN_PREPARATION),
                   target="t2", target_scaling=target_scaling)  # as `crossdiff train` describes an unpaired model
    return BrainUnpaired(files, source, target, new, spec)


# -------------------------------------------------------------------------------- paired brain T1 -> T2

BRAIN_PAIRED_FILES = {"BraTS-GLI-00001-000": ("t1n", "t2w"), "TCGA-FG-6692": ("t1", "t2"), "TCGA-DU-7294": ("t1", "t2")}
BRAIN_TRAINING = ("BraTS-GLI-00001-000", "TCGA-FG-6692")
BRAIN_HELD_OUT = "TCGA-DU-7294"
INTENSITY_BINS = 64


@dataclass
class BrainPaired:
    """T1 and T2 of the same subject (co-registered, SRI24), two subjects to train on and TCGA-DU-7294 to
    score, on the normalised scale inside the brain (the volumes shrunk for CPU as for BrainUnpaired).

    Baselines fitted on the training pairs: the intensity map (the mean training T2 of each of 64 T1
    intensity bins: the best any per-voxel function of T1 does in the L2 sense, what the `intensity-map`
    reference learns) and the median training T2."""

    cases: dict[str, PreparedCase]
    files: dict[str, dict[str, Path]]
    spec: ModelSpec
    table: np.ndarray
    constant: float

    @property
    def training(self) -> list[PreparedCase]:
        return [self.cases[cid] for cid in BRAIN_TRAINING]

    def _mapped(self, t1: np.ndarray) -> np.ndarray:
        return self.table[np.clip(((t1 + 1.0) / 2.0 * INTENSITY_BINS).astype(int), 0, INTENSITY_BINS - 1)]

    def scores(self, model: LoadedModel, samples: int = 1, **options) -> dict[str, float]:
        """MAE (normalised) of the model, the intensity map and the constant on the held-out subject."""
        held_out = self.cases[BRAIN_HELD_OUT]
        t1 = read_volume(self.files[BRAIN_HELD_OUT]["t1"])
        brain = held_out.mask
        translated = translate_volume(model, t1, samples=samples, options=options,
                                      mask=Volume(brain.astype(np.uint8), t1.geometry, "mask"))
        prediction = self.spec.target_scaling.apply(translated.mean.array)[brain]
        truth = held_out.images["t2"][brain]

        def mae(guess: np.ndarray | float) -> float:
            return float(np.abs(guess - truth).mean())

        return {"model": mae(prediction), "intensity_map": mae(self._mapped(held_out.images["t1"][brain])),
                "constant": mae(self.constant)}


def brain_paired(folder: Path, slices: SliceConfig) -> BrainPaired:
    require_shared()
    files = {cid: {key: shrunk(BRAIN / cid / f"{name}.nii.gz", folder / f"{cid}-{key}.nii.gz")
                   for key, name in zip(("t1", "t2"), names)} for cid, names in BRAIN_PAIRED_FILES.items()}
    cases = {cid: prepare_case(cid, CaseEntry(images=images), BRAIN_PREPARATION) for cid, images in files.items()}
    training = [cases[cid] for cid in BRAIN_TRAINING]
    spec = ModelSpec.from_cases(training, "t1", "t2", slices, BRAIN_PREPARATION)
    t1 = np.concatenate([case.images["t1"][case.mask] for case in training])
    t2 = np.concatenate([case.images["t2"][case.mask] for case in training])
    bins = np.clip(((t1 + 1.0) / 2.0 * INTENSITY_BINS).astype(int), 0, INTENSITY_BINS - 1)
    counts = np.bincount(bins, minlength=INTENSITY_BINS)
    sums = np.bincount(bins, weights=t2, minlength=INTENSITY_BINS)
    filled = np.flatnonzero(counts)
    nearest = filled[np.abs(np.arange(INTENSITY_BINS)[:, None] - filled[None]).argmin(axis=1)]
    table = (sums[nearest] / counts[nearest]).astype(np.float32)
    return BrainPaired(cases, files, spec, table, float(np.median(t2)))
