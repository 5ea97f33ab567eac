"""The long run of the fuzz suite (tests/fuzz): mutants of the real files in ../shared/data, pydicom's test
files and the project's own configs and model, each fed to the reader crossdiff would use, in an isolated
worker (address-space limit, timeout); the figures go to benchmarks/results/fuzz.md and fuzz.json.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/fuzz.py --inputs 30000

Any input can be made again from its index: `--only I --keep --work DIR` leaves it in DIR/inputs/I.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fuzz.__main__ import main  # noqa: E402 - the suite lives beside the tests that run its CI slice

if __name__ == "__main__":
    arguments = sys.argv[1:]
    if "--out" not in arguments:
        arguments += ["--out", str(REPO / "benchmarks" / "results")]
    sys.exit(main(arguments))
