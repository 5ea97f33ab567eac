"""Shared test fixtures: the bundled sample (always present) and ../shared/data (present in CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SAMPLE, SHARED_DATA, require_shared


@pytest.fixture(scope="session")
def shared_data() -> Path:
    require_shared()
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE
