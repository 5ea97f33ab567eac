"""Copy a finished `crossdiff benchmark` run's report into the repository, without its training runs,
cached cases and translated volumes (hundreds of MB): the tables, figures, reports, the code version
that made them and the config they came from.

Run:  python benchmarks/publish.py --run benchmarks/runs/NAME --config benchmarks/configs/NAME.yaml \
          --dest benchmarks/results/NAME
A run with several targets has one report per target (RUN/ct, RUN/mr): each is copied to DEST/TARGET.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPORT_FILES = ("report.md", "report.html", "results.csv", "summary.csv", "tests.csv", "cost.csv", "speed.csv",
                "code-version.json")
OPTIONAL_FILES = ("tuning.csv",)  # only a run with tuned methods has it


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--dest", type=Path, required=True)
    args = parser.parse_args()
    reports = [folder for folder in [args.run, *sorted(args.run.iterdir())] if (folder / "report.md").is_file()]
    if not reports:
        raise SystemExit(f"{args.run}: no report.md here or one level down; has the benchmark finished?")
    args.dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(args.config, args.dest / args.config.name)
    for folder in reports:
        dest = args.dest / folder.relative_to(args.run)
        (dest / "figures").mkdir(parents=True, exist_ok=True)
        for name in REPORT_FILES + OPTIONAL_FILES:
            if name in REPORT_FILES or (folder / name).is_file():
                shutil.copy2(folder / name, dest / name)
        for figure in sorted((folder / "figures").glob("*.png")):
            shutil.copy2(figure, dest / "figures" / figure.name)
        print(f"copied {folder} -> {dest}")


if __name__ == "__main__":
    main()
