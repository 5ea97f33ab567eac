"""Hyper-parameter choice inside a benchmark fold, on the fold's training cases only.

A method entry's `tune` lists candidate overrides of its method section (e.g. learning rates). For each
fold, every candidate is trained on the fold's training cases with the same budget and scored on the
validation cases `crossdiff train` keeps out of them (one case carved out, seeded, when the fold has at
least four training cases; with fewer there is none to spare, and the training cases themselves are
scored: for an unpaired method on the pairing it never saw, for a paired one on data it fitted). The best
candidate becomes the fold's model. The held-out cases are never translated before the choice is made,
so they choose nothing. The record OUT/tuning/FOLD/NAME.json keeps every candidate's scores; a rerun
reuses it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from crossdiff.atomic import write_json
from crossdiff.errors import CrossdiffError
from crossdiff.evaluation.benchmark_config import TUNING_METRICS, MethodEntry


@dataclass(frozen=True)
class TuningChoice:
    """One fold's choice for one method entry: every candidate's mean validation score and the chosen one."""

    fold: str
    name: str
    metric: str
    cases: list[str]
    candidates: list[dict[str, Any]]  # {"override": {...}, "score": float, "scores": {case: float}}
    chosen: int

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One table row per candidate (tuning.csv)."""
        return [{"fold": self.fold, "method": self.name, "candidate": ", ".join(f"{k}={v}" for k, v in c["override"].items()),
                 f"validation_{self.metric}": c["score"], "validation_cases": " ".join(self.cases),
                 "chosen": index == self.chosen}
                for index, c in enumerate(self.candidates)]


def candidate_entry(entry: MethodEntry, index: int) -> MethodEntry:
    """The entry with candidate `index`'s overrides merged into its method section."""
    return replace(entry, config={**entry.config, **entry.tune[index]}, tune=[])


def choose(
    entry: MethodEntry, fold: str, metric: str, runs: Path, record: Path, run_dir: Path,
    train: Callable[[MethodEntry, Path], None], validate: Callable[[Path], dict[str, float]],
    log: Callable[[str], None],
) -> tuple[MethodEntry, TuningChoice]:
    """Train and validate every candidate in runs/K (unless `record` holds the choice already), copy the best
    run to run_dir and return the entry it was trained with. `validate` gives a run's score per case."""
    if record.is_file():
        saved = json.loads(record.read_text(encoding="utf-8"))
        choice = TuningChoice(**saved)
        if [candidate["override"] for candidate in choice.candidates] != entry.tune:
            raise CrossdiffError(f"{record} chose among other candidates than the config's 'tune' of {entry.name} "
                                 "lists now; delete it (and its runs) or choose another --out")
        log(f"reusing the tuning choice {record}")
    else:
        candidates = []
        for index in range(len(entry.tune)):
            candidate_dir = runs / str(index)
            train(candidate_entry(entry, index), candidate_dir)
            scores = validate(candidate_dir)
            candidates.append({"override": entry.tune[index], "score": sum(scores.values()) / len(scores),
                               "scores": scores})
        pick = min if TUNING_METRICS[metric] == "lower" else max
        chosen = pick(range(len(candidates)), key=lambda k: candidates[k]["score"])
        choice = TuningChoice(fold, entry.name, metric, sorted(next(iter(candidates))["scores"]), candidates, chosen)
        listed = ", ".join(f"{candidate['score']:.4g}" for candidate in candidates)
        log(f"tuning {entry.name} in {fold}: validation {metric} {listed} -> candidate {chosen}")
        write_json(record, vars(choice))
    _install(runs / str(choice.chosen), run_dir)
    return candidate_entry(entry, choice.chosen), choice


def _install(candidate: Path, run_dir: Path) -> None:
    """The chosen candidate's run copied to the fold's run folder (whole, then renamed into place)."""
    if run_dir.is_dir():
        return
    if not candidate.is_dir():
        raise CrossdiffError(f"the chosen tuning run {candidate} is missing; delete its tuning record to tune again")
    partial = run_dir.with_name(run_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(candidate, partial, symlinks=True)  # `latest` is a link relative to its folder
    partial.rename(run_dir)
