"""A fuzz campaign: plan N inputs over the seeds, make each mutant, run it in the isolated worker,
classify the outcome against the seed's own result, and sum up.

Outcomes that meet the project's promise: 'accepted' (the same geometry as the seed, or no geometry to
compare), 'accepted with a warning', 'clean error' (a CrossdiffError naming the input). Failures:
'silently changed' (an image accepted with another geometry and no warning), 'hostile value
accepted' (a value no correct input has, accepted without a warning), 'unsafe name accepted' (an id
that becomes a path outside its folder), 'error without the input's name', 'other exception', 'hang',
'crash', 'memory' (MemoryError, or a peak above the RSS limit), 'code execution'.
Input i is made from random.Random(f"{seed}:{i}") alone, so any one can be made again (`--only`).
"""

from __future__ import annotations

import json
import math
import platform
import random
import shutil
import statistics
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import corpus
from .corpus import Seed
from .mutate import Mutant, mutate
from .oracle import agrees
from .worker import Worker

# Share of the inputs per seed format: more where crossdiff hands the file to C++ code.
FORMAT_WEIGHTS = {
    "nifti": 0.13, "metaimage": 0.09, "nrrd": 0.09, "png": 0.06, "jpeg": 0.02, "array": 0.05, "dicom-file": 0.15,
    "dicom-series": 0.12, "manifest.json": 0.05, "manifest.csv": 0.03, "yaml": 0.07, "checkpoint": 0.05, "run": 0.04,
    "fid": 0.03, "option": 0.02,
}  # fmt: skip

PASSING = ("accepted", "accepted, another valid geometry", "accepted with a warning", "clean error")
FAILURES = ("silently changed", "hostile value accepted", "unsafe name accepted", "error without the input's name",
            "other exception", "hang", "crash", "memory", "code execution")
UNNAMED_TARGETS = ("option",)  # inputs that are text on a command line, not files: nothing to name


@dataclass
class Settings:
    inputs: int
    seed: int = 0
    timeout: float = 30.0
    memory_limit_mb: int = 4096
    rss_limit_mb: float = 2048.0
    examples: int = 12
    cli_every: int = 0  # also run every n-th input (of a target with a command) through `crossdiff`; 0: never


@dataclass
class Campaign:
    settings: Settings
    records: list[dict[str, Any]] = field(default_factory=list)
    baseline: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    restarts: int = 0
    commit: str = ""  # the code the campaign ran, read when it started


def plan(seeds: list[Seed], settings: Settings) -> list[tuple[int, Seed]]:
    """(index, seed) of every input: formats by FORMAT_WEIGHTS, seeds uniformly within a format."""
    by_format: dict[str, list[Seed]] = {}
    for seed in seeds:
        by_format.setdefault(seed.format, []).append(seed)
    formats = [f for f in FORMAT_WEIGHTS if f in by_format]
    planned = []
    for index in range(settings.inputs):
        rng = random.Random(f"{settings.seed}:{index}:plan")
        fmt = rng.choices(formats, weights=[FORMAT_WEIGHTS[f] for f in formats])[0]
        planned.append((index, rng.choice(by_format[fmt])))
    return planned


def run(work: Path, settings: Settings, only: list[int] | None = None, keep: bool = False,
        progress: Any = None) -> Campaign:
    """Build the seeds, read each once (the baseline every mutant is compared with), then run the plan."""
    start = time.perf_counter()
    campaign = Campaign(settings, commit=_commit())
    seeds = corpus.build(work)
    worker = Worker(settings.memory_limit_mb << 20, settings.timeout)
    sentinel = work / corpus.SENTINEL_NAME
    sentinel.unlink(missing_ok=True)
    try:
        for seed in seeds:
            result = worker.run({"target": seed.target, "path": str(_scratch_copy(seed, work / "baseline"))})
            expected = "clean-error" if seed.hostile else "accepted"
            if result["outcome"] != expected:
                raise RuntimeError(f"seed {seed.label} ({seed.path}) gave {result['outcome']}: {result.get('message')}")
            campaign.baseline[str(seed.path)] = result.get("observed")
        inputs = work / "inputs"
        for index, seed in plan(seeds, settings):
            if only is not None and index not in only:
                continue
            folder = inputs / str(index)
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            mutant = mutate(seed, random.Random(f"{settings.seed}:{index}"), folder, sentinel)
            baseline = campaign.baseline[str(seed.path)]
            result = worker.run({"target": seed.target, "path": str(mutant.path), "format": seed.format,
                                 "baseline": baseline})
            executed = sentinel.exists()
            sentinel.unlink(missing_ok=True)
            record = _record(index, seed, mutant, result, campaign.baseline[str(seed.path)], executed, settings)
            if settings.cli_every and index % settings.cli_every == 0 and seed.target in CLI_COMMANDS:
                record["cli"] = run_command(seed.target, mutant.path, folder, settings.timeout * 4)
            campaign.records.append(record)
            if not keep:
                shutil.rmtree(folder, ignore_errors=True)
            if progress is not None:
                progress(record)
    finally:
        worker.close()
    campaign.restarts = worker.restarts
    campaign.seconds = time.perf_counter() - start
    return campaign


CLI_COMMANDS = {
    "volume": lambda path, scratch: ["info", str(path)],
    "mask": lambda path, scratch: ["mask", str(path), "--out", str(scratch / "mask.nii.gz")],
    "manifest": lambda path, scratch: ["check", str(path)],
    "train-config": lambda path, scratch: ["train", "--method", "unet", "--manifest", str(scratch / "none.json"),
                                           "--out", str(scratch / "run"), "--config", str(path)],
    "checkpoint": lambda path, scratch: ["export", "--model", str(path), "--out", str(scratch / "exported")],
}


def run_command(target: str, path: Path, scratch: Path, timeout: float) -> str:
    """The input through the command line, as a user meets it: 'ok' (exit 0), 'clean error' (exit 1 and
    one error line), or what broke the promise ('traceback', 'crash', 'hang')."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "crossdiff", *CLI_COMMANDS[target](path, scratch)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, errors="replace",
                              env={**os.environ, "COLUMNS": "200"})
    except subprocess.TimeoutExpired:
        return "hang"
    if done.returncode == 0:
        return "ok"
    if done.returncode < 0:
        return "crash"
    clean = done.returncode == 1 and "Traceback" not in done.stderr and done.stderr.strip().startswith("error:")
    return "clean error" if clean else "traceback"


def _scratch_copy(seed: Seed, folder: Path) -> Path:
    """Where the seed itself is read: in place, except a run (resuming writes into it)."""
    if seed.target != "resume":
        return seed.path
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(seed.path, folder / seed.path.name, symlinks=True)
    return folder / seed.path.name


def _record(index: int, seed: Seed, mutant: Mutant, result: dict[str, Any], baseline: Any, executed: bool,
            settings: Settings) -> dict[str, Any]:
    return {
        "index": index, "seed": seed.label, "format": seed.format, "target": seed.target,
        "mutation": mutant.description, "expect": mutant.expect,
        "class": classify(seed, mutant, result, baseline, executed, settings),
        "exception": result.get("exception", ""), "message": result.get("message", "")[:300],
        "where": result.get("where", ""), "warnings": result.get("warnings", [])[:3], "oracle": result.get("oracle"),
        "seconds": round(result.get("seconds", math.nan), 4), "peak_rss_mb": round(result.get("peak_rss_mb", math.nan), 1),
    }


def classify(seed: Seed, mutant: Mutant, result: dict[str, Any], baseline: Any, executed: bool,
             settings: Settings) -> str:
    outcome = result["outcome"]
    if executed:
        return "code execution"
    if outcome in ("hang", "crash"):
        return outcome
    if outcome == "memory-error" or result.get("peak_rss_mb", 0.0) > settings.rss_limit_mb:
        return "memory"
    if outcome == "other-exception":
        return "other exception"
    if outcome == "clean-error":
        message = result.get("message", "")
        named = seed.target in UNNAMED_TARGETS or str(mutant.path) in message or mutant.path.name in message
        return "clean error" if named else "error without the input's name"
    observed, warned = result.get("observed"), bool(result.get("warnings"))
    if seed.target in ("manifest", "benchmark-config"):
        from crossdiff.file_checks import path_name_problem

        if any(path_name_problem(name) for name in observed.get("ids", [])):
            return "unsafe name accepted"
    if mutant.expect == "refuse" and not warned:
        return "hostile value accepted"
    stated = result.get("oracle")
    if seed.target in ("volume", "mask") and stated is not None:  # another geometry than the seed's
        if "error" not in stated and agrees(observed, stated):
            return "accepted, another valid geometry"
        return "accepted with a warning" if warned else "silently changed"
    return "accepted with a warning" if warned else "accepted"


# --------------------------------------------------------------------------------------- summary


def summary(campaign: Campaign) -> dict[str, Any]:
    records = campaign.records
    classes = Counter(r["class"] for r in records)
    by_format: dict[str, Counter] = {}
    for record in records:
        by_format.setdefault(record["format"], Counter())[record["class"]] += 1
    peaks = [r["peak_rss_mb"] for r in records if not math.isnan(r["peak_rss_mb"])]
    seconds = [r["seconds"] for r in records if not math.isnan(r["seconds"])]
    examples = {name: [r for r in records if r["class"] == name][: campaign.settings.examples] for name in FAILURES}
    exceptions = Counter(f"{r['exception']} at {r['where']}" for r in records if r["class"] == "other exception")
    commands = Counter(r["cli"] for r in records if "cli" in r)
    return {
        "settings": vars(campaign.settings),
        "inputs": len(records),
        "classes": {name: classes.get(name, 0) for name in (*PASSING, *FAILURES)},
        "failures": sum(classes.get(name, 0) for name in FAILURES),
        "by_format": {fmt: dict(counts) for fmt, counts in sorted(by_format.items())},
        "clean_errors": classes.get("clean error", 0),
        "peak_rss_mb": {"max": max(peaks, default=math.nan), "median": statistics.median(peaks) if peaks else math.nan},
        "seconds_per_input": {"median": statistics.median(seconds) if seconds else math.nan,
                              "max": max(seconds, default=math.nan)},
        "wall_seconds": round(campaign.seconds, 1),
        "worker_restarts": campaign.restarts,
        "other_exceptions": dict(exceptions.most_common(30)),
        "cli_runs": dict(commands),
        "cli_failures": [{k: r[k] for k in ("index", "seed", "mutation", "cli")} for r in records
                         if r.get("cli") not in (None, "ok", "clean error")][: campaign.settings.examples],
        "examples": {name: found for name, found in examples.items() if found},
        "machine": platform.platform(),
        "commit": campaign.commit,
    }


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=corpus.REPO).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               cwd=corpus.REPO).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def markdown(figures: dict[str, Any], command: str) -> str:
    """The campaign's figures as the Markdown committed beside the JSON."""
    lines = ["# Fuzz campaign: hostile and broken inputs", "", f"`{command}` (commit {figures['commit']}, "
             f"{figures['machine']}), {figures['inputs']:,} inputs in {figures['wall_seconds'] / 60:.1f} min, one worker "
             f"process (address space {figures['settings']['memory_limit_mb']} MB, {figures['settings']['timeout']:.0f} s "
             f"per input), {figures['worker_restarts']} worker restarts.", "", "| outcome | inputs |", "|---|---|"]
    lines += [f"| {name} | {count:,} |" for name, count in figures["classes"].items()]
    lines += ["", f"Failures: **{figures['failures']}**. Peak RSS per input: max {figures['peak_rss_mb']['max']:.0f} MB, "
              f"median {figures['peak_rss_mb']['median']:.0f} MB. Seconds per input: median "
              f"{figures['seconds_per_input']['median']:.3f}, max {figures['seconds_per_input']['max']:.2f}.", "",
              "## By seed format", "", "| format | " + " | ".join(PASSING + FAILURES) + " |",
              "|---|" + "---|" * (len(PASSING) + len(FAILURES))]
    for fmt, counts in figures["by_format"].items():
        lines.append(f"| {fmt} | " + " | ".join(str(counts.get(name, 0)) for name in PASSING + FAILURES) + " |")
    if figures["cli_runs"]:
        runs = ", ".join(f"{name} {count}" for name, count in sorted(figures["cli_runs"].items()))
        lines += ["", f"Through the command line (`crossdiff info`, `mask`, `check`, `train --config`, `export`): "
                      f"{sum(figures['cli_runs'].values())} runs: {runs}."]
        lines += [f"- #{r['index']} {r['seed']}: {r['mutation']} -> {r['cli']}" for r in figures["cli_failures"]]
    if figures["examples"]:
        lines += ["", "## Failures (first examples)", ""]
        for name, found in figures["examples"].items():
            lines.append(f"### {name}")
            lines += [f"- #{r['index']} {r['seed']}: {r['mutation']} -> {r['exception']} {r['message'][:160]} {r['where']}"
                      for r in found]
    return "\n".join(lines) + "\n"


def write(figures: dict[str, Any], out: Path, command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.json").write_text(json.dumps(figures, indent=2, default=str) + "\n")
    (out / "fuzz.md").write_text(markdown(figures, command))
    return [out / "fuzz.json", out / "fuzz.md"]
