"""`PYTHONPATH=tests python -m fuzz --inputs N [--out DIR] [--work DIR] [--only I ...] [--keep]`: run a
campaign and write fuzz.json and fuzz.md (benchmarks/fuzz.py is the same with the project's paths)."""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

from .campaign import FAILURES, Settings, run, summary, write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fuzz", description=__doc__)
    parser.add_argument("--inputs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per input before it counts as a hang")
    parser.add_argument("--memory-mb", type=int, default=4096, help="address-space limit of the worker")
    parser.add_argument("--out", type=Path, default=None, help="folder for fuzz.json and fuzz.md")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--only", type=int, nargs="*", default=None, help="run only these input indices")
    parser.add_argument("--keep", action="store_true", help="keep the mutated inputs in WORK/inputs")
    parser.add_argument("--cli-every", type=int, default=0, help="also run every n-th input through `crossdiff`")
    args = parser.parse_args(argv)
    settings = Settings(args.inputs, args.seed, args.timeout, args.memory_mb, cli_every=args.cli_every)
    counter = {"done": 0}

    def report(record: dict) -> None:
        counter["done"] += 1
        failed = record["class"] in FAILURES or record.get("cli") not in (None, "ok", "clean error")
        if failed or counter["done"] % 500 == 0:
            print(f"[{counter['done']}/{args.inputs}] #{record['index']} {record['class']} (cli {record.get('cli')}): "
                  f"{record['seed']}: {record['mutation'][:80]} {record['exception']} {record['message'][:120]}", flush=True)

    with tempfile.TemporaryDirectory(prefix="crossdiff-fuzz-") as scratch:
        campaign = run(args.work or Path(scratch), settings, args.only, args.keep, report)
    figures = summary(campaign)
    command = "python " + " ".join(shlex.quote(a) for a in (sys.argv if argv is None else ["-m", "fuzz", *argv]))
    for path in write(figures, args.out, command) if args.out is not None else []:
        print(f"wrote {path}")
    print({name: count for name, count in figures["classes"].items() if count}, "command line:", figures["cli_runs"])
    cli_broken = sum(count for name, count in figures["cli_runs"].items() if name not in ("ok", "clean error"))
    return 1 if figures["failures"] or cli_broken else 0


if __name__ == "__main__":
    sys.exit(main())
