"""What the reader-study tests (and tests/study_screenshot.py) share: study inputs made from real data, the
real `crossdiff study serve` in a subprocess, and Debian's headless Chromium driven through Selenium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, SARCOMA

CASES = ("STS_002", "STS_003")
SLAB = 5  # central CT slices per case: enough to pick 2 from, quick to translate
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# Chromium on a machine without a network: no background fetches, no first-run work, a fresh profile.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,800")


def build_study_inputs(root: Path) -> dict[str, Path]:
    """Folders of real CT slabs of two sarcoma patients and two methods' outputs on the same grids:
    `demo`, the bundled demo model's translation of the MR (2 sampler steps), and `linear`, the MR mapped
    to HU by a least-squares line fitted inside the body. Returns {name: folder}, 'reference' included."""
    from crossdiff.inference import load_model, translate_volume
    from crossdiff.masks import body_mask
    from crossdiff.readers import read_volume
    from crossdiff.volumes import Volume, resample_to, write_volume

    model = load_model(REPO / "src" / "crossdiff" / "sample" / "model", "cpu")
    folders = {name: root / name for name in ("reference", "demo", "linear")}
    for case in CASES:
        ct = read_volume(SARCOMA / case / "CT" / "nifti" / "image" / "image.nii.gz")
        start = ct.shape[0] // 2 - SLAB // 2
        slab = Volume.from_sitk(ct.to_sitk()[:, :, start:start + SLAB], "CT", "HU")
        mr = resample_to(read_volume(SARCOMA / case / "MR_T1" / "nifti" / "image" / "image.nii.gz"), slab)
        body = body_mask(mr)
        translated = translate_volume(model, mr, samples=1, options={"steps": 2}, mask=body).mean
        inside = body.array.astype(bool)
        slope, intercept = np.polyfit(mr.array[inside], slab.array[inside], 1)
        linear = slab.with_array(np.where(inside, slope * mr.array + intercept, -1024.0).astype(np.float32))
        for name, volume in (("reference", slab), ("demo", translated), ("linear", linear)):
            write_volume(volume, folders[name] / f"{case}.nii.gz")
    return folders


def require_chromium() -> None:
    """Skip without Debian's chromium and chromium-driver on a developer's machine; in CI, fail."""
    if CHROMIUM.is_file() and CHROMEDRIVER.is_file():
        return
    message = f"{CHROMIUM} or {CHROMEDRIVER} missing (apt-get install chromium chromium-driver)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def chromium(profile: Path):
    """A headless Chromium with its own profile folder; Selenium is given both binaries, so Selenium
    Manager never runs (it would try to download a browser)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


class StudyServer:
    """`crossdiff study serve FOLDER` in a subprocess; `url` is the address it printed."""

    def __init__(self, folder: Path, port: int = 0) -> None:
        self.folder, self.port = folder, port
        self.log = Path(tempfile.mkstemp(prefix="study-serve-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 60.0) -> StudyServer:
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "crossdiff", "study", "serve", str(self.folder), "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(r"readers open: (http://127\.0\.0\.1:(\d+)/s/\S+/)", self.log.read_text())
            if found:
                self.url, self.port = found.group(1), int(found.group(2))
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"the study server did not start: {self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as when the machine's power goes."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def __enter__(self) -> StudyServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.kill()
        self.log.unlink(missing_ok=True)


def copy_study(source: Path, destination: Path) -> Path:
    """A fresh copy of a study folder (without scores), so tests that score do not share answers."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("scores.sqlite*", "analysis"))
    return destination
