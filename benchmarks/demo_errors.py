"""Where does the demo's synthetic CT go wrong? Its error inside the body by tissue of the real CT, and
the MR intensity of fat and muscle in each sarcoma patient (what the model has to generalise across).

1. `run_demo` (default settings) translates the bundled STS_003 MR; its sCT is compared with the real CT
   registered and masked exactly as the demo scores it (crossdiff.demo.scoring_reference).
2. Tissue classes by the real CT's HU: air < -500, low density [-500, -190), fat [-190, -30) (the usual
   adipose window), water and muscle [-30, 150), dense soft tissue [150, 300), bone >= 300. For each:
   share of the voxels, MAE, ME (sCT - CT), and its contribution to the overall MAE (sum of its
   absolute errors over all voxels), so the contributions add up to the MAE.
3. Each patient's MR (raw units, rigidly registered onto its CT as for training) inside the body:
   median at the CT's fat and muscle voxels, and the 0.5/99.5 percentiles the percentile scaling uses.

Run:  python benchmarks/demo_errors.py [--out benchmarks/results]   (needs ../shared/data)
Writes OUT/demo-errors.md and OUT/demo-errors.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from crossdiff import read_volume
from crossdiff.data.cases import PreparationConfig, prepare_case
from crossdiff.data.layouts import scan
from crossdiff.demo import run_demo, sample_entry, scoring_reference
from crossdiff.masks import body_mask

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "sarcoma-ct-mr-pet"
CLASSES = {"air": (-np.inf, -500.0), "low density": (-500.0, -190.0), "fat": (-190.0, -30.0),
           "water and muscle": (-30.0, 150.0), "dense soft tissue": (150.0, 300.0), "bone": (300.0, np.inf)}
FAT, MUSCLE = (-190.0, -30.0), (10.0, 100.0)


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
    return {"demo_mae": demo.metrics["mae"], "mae": float(np.abs(error).mean()), "voxels": int(error.size), "rows": rows}


def _patients() -> list[dict]:
    manifest = scan(DATA, layout="modality-folders")
    preparation = PreparationConfig(modalities=["mr", "ct"], reference="ct", registration="rigid")
    rows = []
    for case_id, entry in manifest.cases.items():
        case = prepare_case(case_id, entry, preparation)
        mr, ct, body = case.physical("mr").array, case.physical("ct").array, case.mask
        fat, muscle = (body & (ct >= low) & (ct < high) for low, high in (FAT, MUSCLE))
        low, high = np.percentile(mr[body], [0.5, 99.5])
        rows.append({"case": case_id, "mr_fat": float(np.median(mr[fat])), "mr_muscle": float(np.median(mr[muscle])),
                     "fat_share": float(fat.sum() / body.sum()), "mr_p0_5": float(low), "mr_p99_5": float(high)})
    return rows


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
    lines += ["", "MR intensity (raw units, rigidly registered onto the CT, inside the body) of each patient's fat "
              f"(CT {FAT[0]:g} to {FAT[1]:g} HU) and muscle (CT {MUSCLE[0]:g} to {MUSCLE[1]:g} HU):", "",
              "| case | MR fat (median) | MR muscle (median) | fat / muscle | fat share of the body | MR 0.5 / 99.5 percentile |",
              "|---|---|---|---|---|---|"]
    for row in result["patients"]:
        lines.append(f"| {row['case']} | {row['mr_fat']:.0f} | {row['mr_muscle']:.0f} | {row['mr_fat'] / row['mr_muscle']:.2f} | "
                     f"{row['fat_share']:.2f} | {row['mr_p0_5']:.0f} / {row['mr_p99_5']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
