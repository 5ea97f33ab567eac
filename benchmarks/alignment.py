"""How well are the sarcoma MR and CT aligned, before and after registration?

For each patient the T1 MR is brought onto the CT grid, first through the shared DICOM frame of
reference alone ('none'), then through rigid, affine and B-spline registration, and measured by

* NMI: Studholme normalised mutual information of CT and MR inside the CT body mask and the MR's
  field of view (where the MR has data after the transform);
* body Dice: CT body mask against the MR body mask carried onto the CT grid, within that field of view;
* MI before/after: the Mattes MI that registration optimises, over its own overlap mask;
* tumour shift: mean distance the transform moves the GTV voxels. The GTV masks of the three
  modalities are one contour copied into each (identical in physical space), so this is not an error
  against a truth; it says how far registration moved the tumour region away from that contour;
* seconds per registration.

Run:  python benchmarks/alignment.py  [--data DIR] [--out DIR] [--transforms rigid,affine,bspline]
Writes OUT/alignment.md and OUT/alignment.json (OUT defaults to benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import scipy
import SimpleITK as sitk
import skimage

from crossdiff.masks import acquired_region, body_mask
from crossdiff.readers import read_mask, read_volume
from crossdiff.registration import dice, normalized_mutual_information, register
from crossdiff.volumes import Volume, resample_to

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = Path(os.environ.get("CROSSDIFF_SHARED_DATA", HERE.parents[1] / "shared" / "data")) / "sarcoma-ct-mr-pet"
PATIENTS = ("STS_001", "STS_002", "STS_003")


def measure(
    ct: Volume,
    mr: Volume,
    ct_body: np.ndarray,
    mr_body: Volume,
    has_data: Volume,
    gtv: Volume,
    transform: sitk.Transform | None,
) -> dict[str, float]:
    """NMI and body Dice of the MR seen through `transform` on the CT grid, plus the tumour shift."""
    view = resample_to(has_data, ct, "nearest", 0, transform).array > 0
    region = ct_body & view
    mr_on_ct = resample_to(mr, ct, "linear", transform=transform).array
    mr_body_on_ct = resample_to(mr_body, ct, "nearest", 0, transform).array > 0
    return {
        "nmi": normalized_mutual_information(ct.array, mr_on_ct, region),
        "body_dice": dice(ct_body & view, mr_body_on_ct & view),
        "region_voxels": int(region.sum()),
        "tumour_shift_mm": tumour_shift(gtv, transform),
    }


def tumour_shift(gtv: Volume, transform: sitk.Transform | None) -> float:
    """Mean distance (mm) that `transform` moves the GTV voxels; 0 without a transform."""
    if transform is None:
        return 0.0
    image = gtv.to_sitk()
    indices = np.argwhere(gtv.array > 0)[::20, ::-1]  # every 20th voxel, as (x, y, z)
    points = [image.TransformIndexToPhysicalPoint([int(i) for i in index]) for index in indices]
    return float(np.mean([np.linalg.norm(np.subtract(transform.TransformPoint(p), p)) for p in points]))


def patient_rows(folder: Path, transforms: list[str]) -> list[dict[str, object]]:
    ct = read_volume(folder / "CT" / "nifti" / "image" / "image.nii.gz")
    mr = read_volume(folder / "MR_T1" / "nifti" / "image" / "image.nii.gz")
    gtv = read_mask(folder / "CT" / "nifti" / "mask" / "mask.nii.gz", reference=ct)
    ct_body = body_mask(ct).array > 0
    mr_body = body_mask(mr)
    has_data = mr.with_array(acquired_region(mr).astype(np.uint8), modality="mask")
    unregistered = measure(ct, mr, ct_body, mr_body, has_data, gtv, None)
    rows: list[dict[str, object]] = [{"patient": folder.name, "transform": "none", **unregistered}]
    for name in transforms:
        start = time.perf_counter()
        result = register(ct, mr, name)
        seconds = time.perf_counter() - start
        row = {
            "patient": folder.name,
            "transform": name,
            **measure(ct, mr, ct_body, mr_body, has_data, gtv, result.transform),
        }
        row.update(
            mi_before=result.metric_before, mi_after=result.metric_after, iterations=result.iterations, seconds=seconds
        )
        rows.append(row)
        print(
            f"{folder.name} {name}: NMI {row['nmi']:.4f}, body Dice {row['body_dice']:.4f}, {seconds:.1f} s", flush=True
        )
    return rows


def environment() -> dict[str, object]:
    return {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}, {cpu_model()}",
        "registration_threads": 1,
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "scikit-image": skimage.__version__,
            "SimpleITK": sitk.Version.VersionString(),
        },
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def markdown(rows: list[dict[str, object]], env: dict[str, object]) -> str:
    lines = [
        "# MR-to-CT alignment of the sarcoma set (STS_001-003)",
        "",
        (
            "MR T1 resampled onto the CT grid through the shared frame of reference (`none`) or through "
            "`crossdiff.registration.register` (Mattes MI, identity start, seed 0, defaults otherwise)."
        ),
        (
            "NMI: Studholme (H(CT)+H(MR))/H(CT,MR), 64 bins, inside CT body mask and MR field of view. "
            "Body Dice: CT vs MR automatic body masks within the MR field of view. "
            "MI: Mattes MI (nats) over the registration's overlap mask. Tumour shift: mean distance the "
            "transform moves the GTV voxels (the GTV is one contour shared by all modalities, so this is "
            "how far registration moved the tumour region, not an error)."
        ),
        "",
        "| patient | transform | NMI | body Dice | MI before | MI after | tumour shift (mm) | iterations | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    columns = [("nmi", ".4f"), ("body_dice", ".4f"), ("mi_before", ".4f"), ("mi_after", ".4f")]
    columns += [("tumour_shift_mm", ".1f"), ("iterations", "d"), ("seconds", ".1f")]
    for row in rows:
        cells = [format(row[key], fmt) if key in row else "-" for key, fmt in columns]  # type: ignore[arg-type]
        lines.append("| " + " | ".join([str(row["patient"]), str(row["transform"]), *cells]) + " |")
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())  # type: ignore[union-attr]
    lines += [
        "",
        f"Command: `{env['command']}`  ",
        f"Date: {env['date']}  ",
        f"Machine: {env['machine']}, nproc {env['nproc']}; registration runs ITK single-threaded (for repeatable results)  ",
        f"Versions: {versions}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the sarcoma-ct-mr-pet folder")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--transforms", default="rigid,affine,bspline")
    parser.add_argument("--patients", default=",".join(PATIENTS))
    args = parser.parse_args()
    transforms = [t for t in args.transforms.split(",") if t]
    rows = [row for patient in args.patients.split(",") for row in patient_rows(args.data / patient, transforms)]
    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "alignment.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    (args.out / "alignment.md").write_text(markdown(rows, env))
    print(f"wrote {args.out / 'alignment.md'} and {args.out / 'alignment.json'}")


if __name__ == "__main__":
    main()
