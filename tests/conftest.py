"""Shared test fixtures: the bundled sample (always present) and ../shared/data (present in CI)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import SAMPLE, SARCOMA, SHARED_DATA, require_shared


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests run tiny networks, which gain nothing from a second thread; and while another process holds
    the other core, two OpenMP threads stall at every convolution (measured: 1 s per tiny-UNet call
    instead of 10 ms). Subprocesses (torchrun, the CLI) choose their own."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    require_shared()
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return SAMPLE


@pytest.fixture(scope="session")
def phi_mr_series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """STS_003's real MR DICOM series with recognisable patient-identifying values planted (tests/phi.py)."""
    require_shared()
    from phi import copy_with_phi

    return copy_with_phi(SARCOMA / "STS_003" / "MR_T1" / "dicom" / "image", tmp_path_factory.mktemp("phi") / "mr")
