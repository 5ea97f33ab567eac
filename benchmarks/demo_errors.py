"""Where does the demo's synthetic CT go wrong? Its error inside the body by tissue of the real CT, and
whether each sarcoma patient's MR shows that tissue where its CT does.

1. `run_demo` (default settings) translates the bundled STS_003 MR; its sCT is compared with the real CT
   registered and masked exactly as the demo scores it (crossdiff.demo.scoring_reference).
2. Tissue classes by the real CT's HU: air < -500, low density [-500, -190), fat [-190, -30) (the usual
   adipose window), water and muscle [-30, 150), dense soft tissue [150, 300), bone >= 300. For each:
   share of the voxels, MAE, ME (sCT - CT), and its contribution to the overall MAE (sum of its
   absolute errors over all voxels), so the contributions add up to the MAE.
3. Is the MR at fault, or the pairing? Each patient's MR is split inside the body by Otsu's threshold
   into a bright (fat-like on T1) and a dark class, using the MR alone; then, on the CT grid after
   registration, the share of the real CT's fat (and muscle) voxels that the MR puts in its bright class.
   Alignments: rigid (as the demo model trains), B-spline, and rigid after N4 bias-field correction
   (SimpleITK, on the MR inside the body), so neither registration nor coil shading can hide a cause.
4. Reference points on the demo's voxels: a constant at the training patients' median HU (a fair
   baseline), and two bounds fitted on the held-out patient itself: its own median HU, and the best
   map from MR intensity to HU (the median HU of each MR intensity bin).
5. Does the sCT draw bone, and where? The share of voxels at >= 300 HU in the sCT and in the real CT, the
   Dice overlap of the two, and the bone MAE split by whether the sCT drew bone there.

Run:  python benchmarks/demo_errors.py [--out benchmarks/results]   (needs ../shared/data)
Writes OUT/demo-errors.md and OUT/demo-errors.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from skimage.filters import threshold_otsu

from crossdiff import read_volume
from crossdiff.data.cases import PreparationConfig, PreparedCase, prepare_case
from crossdiff.data.layouts import scan
from crossdiff.demo import run_demo, sample_entry, scoring_reference
from crossdiff.masks import body_mask

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "sarcoma-ct-mr-pet"
CLASSES = {"air": (-np.inf, -500.0), "low density": (-500.0, -190.0), "fat": (-190.0, -30.0),
           "water and muscle": (-30.0, 150.0), "dense soft tissue": (150.0, 300.0), "bone": (300.0, np.inf)}
FAT, MUSCLE = (-190.0, -30.0), (10.0, 100.0)
ALIGNMENTS = {"rigid": ("rigid", False), "bspline": ("bspline", False), "rigid + N4": ("rigid", True)}  # registration, N4
TRAINING_CASES = ("STS_001", "STS_002")  # the demo model's
INTENSITY_BINS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    result = {"measured": datetime.now(UTC).isoformat(timespec="seconds"), "tissues": _tissues(),
              "patients": _patients()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo-errors.json").write_text(json.dumps(result, indent=2))
    (args.out / "demo-errors.md").write_text(_markdown(result))
    print((args.out / "demo-errors.md").read_text())


def _tissues() -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        demo = run_demo(Path(scratch) / "demo")
        synthetic = read_volume(Path(scratch) / "demo" / "sct.nii.gz").array.astype(np.float64)
    entry = sample_entry()
    mr = read_volume(entry.images["mr"], modality="MR")
    reference, region = scoring_reference(mr, read_volume(entry.images["ct"], modality="CT"), body_mask(mr))
    ct, error = reference[region], (synthetic - reference)[region]
    rows = []
    for name, (low, high) in CLASSES.items():
        inside = (ct >= low) & (ct < high)
        rows.append({"tissue": name, "hu": [low, high], "share": float(inside.mean()),
                     "mae": float(np.abs(error[inside]).mean()), "me": float(error[inside].mean()),
                     "mae_contribution": float(np.abs(error[inside]).sum() / error.size)})
    return {"demo_mae": demo.metrics["mae"], "mae": float(np.abs(error).mean()), "voxels": int(error.size), "rows": rows,
            "bone": _bone_drawn(synthetic[region], ct),
            "reference_points": _reference_points(mr.array[region].astype(np.float64), ct)}


def _bone_drawn(synthetic: np.ndarray, ct: np.ndarray) -> dict[str, float]:
    """Whether the sCT's bone (>= 300 HU) exists and lies on the real CT's: a model that blurs bone away
    and one that draws it in the wrong place both miss the bone MAE, for different reasons."""
    low = CLASSES["bone"][0]
    drawn, real = synthetic >= low, ct >= low
    error = np.abs(synthetic - ct)
    return {"sct_share": float(drawn.mean()), "ct_share": float(real.mean()),
            "dice": float(2 * (drawn & real).sum() / max(drawn.sum() + real.sum(), 1)),
            "mae_where_drawn": float(error[real & drawn].mean()) if (real & drawn).any() else float("nan"),
            "mae_where_missed": float(error[real & ~drawn].mean()) if (real & ~drawn).any() else float("nan"),
            "share_of_ct_bone_drawn": float((real & drawn).sum() / max(real.sum(), 1))}


def _reference_points(mr: np.ndarray, ct: np.ndarray) -> list[dict]:
    """MAE of simple predictions on the demo's voxels. The training patients' median HU is a fair
    baseline; the other two are fitted on the held-out patient itself, so they are bounds, not methods."""
    cases = [_prepared("rigid")[case_id] for case_id in TRAINING_CASES]
    training_median = float(np.median(np.concatenate([case.physical("ct").array[case.mask] for case in cases])))
    edges = np.unique(np.quantile(mr, np.linspace(0.0, 1.0, INTENSITY_BINS + 1)))
    bins = np.clip(np.searchsorted(edges, mr, side="right") - 1, 0, len(edges) - 2)
    bin_medians = np.array([np.median(ct[bins == b]) for b in range(len(edges) - 1)])
    return [
        {"prediction": f"constant: the training patients' median HU ({training_median:.0f})", "fitted_on_held_out": False,
         "mae": float(np.abs(ct - training_median).mean())},
        {"prediction": f"constant: the held-out CT's own median HU ({np.median(ct):.0f})", "fitted_on_held_out": True,
         "mae": float(np.abs(ct - np.median(ct)).mean())},
        {"prediction": f"best map from MR intensity to HU (median HU of each of {INTENSITY_BINS} MR intensity bins)",
         "fitted_on_held_out": True, "mae": float(np.abs(ct - bin_medians[bins]).mean())},
    ]


@cache
def _prepared(registration: str) -> dict[str, PreparedCase]:
    """Every sarcoma patient with its MR registered onto its CT, once per registration for all analyses."""
    manifest = scan(DATA, layout="modality-folders")
    preparation = PreparationConfig(modalities=["mr", "ct"], reference="ct", registration=registration)
    return {case_id: prepare_case(case_id, entry, preparation) for case_id, entry in manifest.cases.items()}


def _patients() -> list[dict]:
    rows = []
    for alignment, (registration, n4) in ALIGNMENTS.items():
        for case_id, case in _prepared(registration).items():
            mr, ct, body = case.physical("mr").array.astype(np.float64), case.physical("ct").array, case.mask
            if n4:
                mr = _bias_corrected(mr, body)
            bright = body & (mr >= threshold_otsu(mr[body]))
            fat, muscle = (body & (ct >= low) & (ct < high) for low, high in (FAT, MUSCLE))
            rows.append({"case": case_id, "alignment": alignment,
                         "mr_bright": float(np.median(mr[bright])), "mr_dark": float(np.median(mr[body & ~bright])),
                         "mr_bright_share": float(bright.sum() / body.sum()), "ct_fat_share": float(fat.sum() / body.sum()),
                         "bright_given_ct_fat": float((bright & fat).sum() / fat.sum()),
                         "bright_given_ct_muscle": float((bright & muscle).sum() / muscle.sum()),
                         "mr_at_ct_fat": float(np.median(mr[fat])), "mr_at_ct_muscle": float(np.median(mr[muscle]))})
    return rows


def _bias_corrected(mr: np.ndarray, body: np.ndarray) -> np.ndarray:
    """N4 (SimpleITK) fitted on a 2x shrunk copy inside the body, its bias field divided out at full size."""
    image = sitk.GetImageFromArray(np.maximum(mr, 1.0).astype(np.float32))
    mask = sitk.GetImageFromArray(body.astype(np.uint8))
    corrector = sitk.N4BiasFieldCorrectionImageFilter()
    corrector.SetMaximumNumberOfIterations([50] * 4)
    corrector.Execute(sitk.Shrink(image, [2] * 3), sitk.Shrink(mask, [2] * 3))
    return mr / np.exp(sitk.GetArrayFromImage(corrector.GetLogBiasFieldAsImage(image)))


def _markdown(result: dict) -> str:
    tissues = result["tissues"]
    lines = [
        "# Where the demo's sCT errs", "",
        f"Measured {result['measured']} by `python benchmarks/demo_errors.py`: the demo's sCT of STS_003 "
        f"(MAE {tissues['demo_mae']:.1f} HU over {tissues['voxels']} voxels inside the body) by tissue of the real CT.", "",
        "| tissue (real CT) | HU | share of voxels | MAE (HU) | ME (HU) | contribution to the MAE (HU) |",
        "|---|---|---|---|---|---|",
    ]
    for row in tissues["rows"]:
        low, high = row["hu"]
        lines.append(f"| {row['tissue']} | [{low:g}, {high:g}) | {row['share']:.3f} | {row['mae']:.1f} | {row['me']:+.1f} | "
                     f"{row['mae_contribution']:.1f} |")
    bone = tissues["bone"]
    lines += ["", f"Bone drawn: the sCT puts {bone['sct_share']:.3f} of the voxels at >= {CLASSES['bone'][0]:g} HU, the real CT "
              f"{bone['ct_share']:.3f}; Dice of the two {bone['dice']:.2f}. The sCT drew bone on "
              f"{bone['share_of_ct_bone_drawn']:.0%} of the real CT's bone voxels (bone MAE {bone['mae_where_drawn']:.0f} HU "
              f"there, {bone['mae_where_missed']:.0f} HU where it did not)."]
    lines += ["", "MAE of simple predictions on the same voxels (a prediction fitted on the held-out patient is a bound, "
              "not a method):", "", "| prediction | fitted on the held-out patient | MAE (HU) |", "|---|---|---|"]
    for point in tissues["reference_points"]:
        lines.append(f"| {point['prediction']} | {'yes' if point['fitted_on_held_out'] else 'no'} | {point['mae']:.1f} |")
    lines += ["", "Each patient's MR (raw units) split inside the body by Otsu's threshold into a bright (fat-like) and a dark "
              f"class, and how often the real CT's fat (CT {FAT[0]:g} to {FAT[1]:g} HU) and muscle ({MUSCLE[0]:g} to "
              f"{MUSCLE[1]:g} HU) voxels fall in the MR's bright class once the MR is aligned onto the CT:", "",
              "| case | alignment | MR bright / dark median | MR bright share | CT fat share | P(MR bright \\| CT fat) | "
              "P(MR bright \\| CT muscle) | MR median at CT fat / muscle |",
              "|---|---|---|---|---|---|---|---|"]
    for row in result["patients"]:
        lines.append(f"| {row['case']} | {row['alignment']} | {row['mr_bright']:.0f} / {row['mr_dark']:.0f} | "
                     f"{row['mr_bright_share']:.2f} | {row['ct_fat_share']:.2f} | {row['bright_given_ct_fat']:.2f} | "
                     f"{row['bright_given_ct_muscle']:.2f} | {row['mr_at_ct_fat']:.0f} / {row['mr_at_ct_muscle']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
