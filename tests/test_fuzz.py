"""The CI slice of the fuzz suite (tests/fuzz): a few hundred mutants of the real seeds, each read in an
isolated worker with memory and time limits, must all end in an accepted read, a clean error naming
the input, or a warning; the long run (benchmarks/fuzz.py, figures in benchmarks/results/fuzz.md) is
the same campaign with tens of thousands of inputs."""

from __future__ import annotations

from pathlib import Path

from fuzz.campaign import FAILURES, Settings, run, summary
from helpers import require_shared

INPUTS = 300


def test_a_slice_of_the_fuzz_campaign_meets_the_promise(tmp_path: Path) -> None:
    require_shared()
    campaign = run(tmp_path, Settings(INPUTS, seed=16, memory_limit_mb=4096, timeout=60.0))
    figures = summary(campaign)
    assert figures["inputs"] == INPUTS
    assert len(figures["by_format"]) >= 12  # every kind of seed was mutated
    failed = [r for r in campaign.records if r["class"] in FAILURES]
    assert not failed, "\n".join(f"#{r['index']} {r['class']}: {r['seed']}: {r['mutation']} -> {r['exception']} "
                                 f"{r['message'][:200]} {r['where']}" for r in failed)
    assert figures["clean_errors"] > INPUTS // 3  # most mutants are broken, and were refused as such
    assert figures["peak_rss_mb"]["max"] < 2048
