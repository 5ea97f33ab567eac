"""Each method's training speed as two benchmark runs calibrated it (OUT/budget/METHOD.json), side by side.

A benchmark's equal-time budget turns each method's measured steps per CPU second into its steps, so two
runs of the same config that differ in one training setting (precision, say) differ in the steps every
method gets by exactly these rates. The records are what the runs used, not a re-measurement.

Run:  python benchmarks/budget_rates.py --run fp32=OUT_A --run bf16=OUT_B [--seconds 480] --out FILE.md
Writes FILE.md and FILE.json (the records' rates, the ratio of the last run to the first).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

from crossdiff.atomic import write_json, write_text


def read_rates(budget: Path) -> dict[str, float]:
    """Steps per CPU second by method name, from a run's calibration records."""
    if not budget.is_dir():
        raise SystemExit(f"{budget}: no budget records here (a benchmark run's OUT/budget)")
    return {path.stem: float(json.loads(path.read_text(encoding="utf-8"))["steps_per_cpu_s"])
            for path in sorted(budget.glob("*.json"))}


def table(runs: dict[str, dict[str, float]], seconds: float) -> list[list[str]]:
    """One row per method that every run calibrated: rate and budgeted steps per run, last/first ratio."""
    labels = list(runs)
    common = sorted(set.intersection(*(set(rates) for rates in runs.values())))
    rows = []
    for method in common:
        rates = [runs[label][method] for label in labels]
        rows.append([method, *(f"{rate:.3g} ({int(seconds * rate)})" for rate in rates), f"{rates[-1] / rates[0]:.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, help="LABEL=OUT, two or more")
    parser.add_argument("--seconds", type=float, default=480.0, help="the budget, for the steps column")
    parser.add_argument("--note", default="", help="how and where the runs were calibrated")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pairs = [item.split("=", 1) for item in args.run]
    if len(pairs) < 2 or any(len(pair) != 2 for pair in pairs):
        raise SystemExit("give two or more --run LABEL=OUT")
    runs = {label: read_rates(Path(folder) / "budget") for label, folder in pairs}
    labels = list(runs)
    rows = table(runs, args.seconds)
    header = ["method", *(f"{label}: steps per CPU s (steps in {args.seconds:g} s)" for label in labels),
              f"{labels[-1]} / {labels[0]}"]
    lines = [f"# Training speed as calibrated by {' and '.join(labels)} benchmark runs", "",
             f"Written {datetime.now(UTC).isoformat(timespec='seconds')} by `python benchmarks/budget_rates.py "
             + " ".join(f"--run {label}={folder}" for label, folder in pairs) + "`.",
             *([args.note, ""] if args.note else [""]),
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
             *("| " + " | ".join(row) + " |" for row in rows), ""]
    write_text(args.out, "\n".join(lines))
    write_json(args.out.with_suffix(".json"), {"runs": {label: {"out": folder, "rates": runs[label]} for label, folder in pairs},
                                               "seconds": args.seconds, "note": args.note})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
