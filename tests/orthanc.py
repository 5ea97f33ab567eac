"""A real Orthanc PACS for tests: its own process, JSON config, temporary storage and free ports; stopped after.

Orthanc (Debian 1.10) has no bind-address option, so its HTTP API refuses other hosts
(RemoteAccessAllowed false) and its DICOM port serves only modalities declared on 127.0.0.1
(DicomCheckModalityHost, no 'always allow'): CROSSDIFF may do everything, CROSSDIFF-RO everything but
store (Orthanc drops the association at its first C-STORE). A Lua filter discards instances of the
patient ID REFUSED_PATIENT from instance number REFUSED_FROM on, while Orthanc 1.10 still answers
success for them: a PACS that loses part of a series without saying so. The REST calls here are the
tests' independent view of what the PACS holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
AET, CALLING_AET, READ_ONLY_AET = "ORTHANC", "CROSSDIFF", "CROSSDIFF-RO"
REFUSED_PATIENT, REFUSED_FROM = "REFUSED-BY-PACS", 3
FILTER = f"""
function ReceivedInstanceFilter(dicom, origin, info)
  return not (dicom.PatientID == '{REFUSED_PATIENT}' and tonumber(dicom.InstanceNumber) >= {REFUSED_FROM})
end
"""


def require_orthanc() -> None:
    """Skip without Orthanc on a developer's machine; in CI (CI set) its absence is a failure."""
    if ORTHANC is not None:
        return
    message = "Orthanc is not installed (apt-get install orthanc)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Orthanc:
    http_port: int
    dicom_port: int

    def rest(self, path: str, body: bytes | None = None) -> Any:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method="POST" if body else "GET")
        with urllib.request.urlopen(request, timeout=30) as answer:
            data = answer.read()
        return json.loads(data) if answer.headers.get_content_type() == "application/json" else data

    def upload(self, files: list[Path]) -> None:
        for file in files:
            self.rest("/instances", file.read_bytes())

    def series_id(self, series_uid: str) -> str | None:
        """Orthanc's id of the series with this SeriesInstanceUID, None if it holds no such series."""
        found = [item for item in self.rest("/tools/lookup", series_uid.encode()) if item["Type"] == "Series"]
        return found[0]["ID"] if found else None

    def download_series(self, series_uid: str, folder: Path) -> list[Path]:
        """Every instance Orthanc holds of the series, as files in `folder`."""
        series = self.series_id(series_uid)
        assert series is not None, f"Orthanc holds no series {series_uid}"
        folder.mkdir(parents=True)
        files = []
        for number, instance in enumerate(self.rest(f"/series/{series}")["Instances"]):
            files.append(folder / f"{number:04d}.dcm")
            files[-1].write_bytes(self.rest(f"/instances/{instance}/file"))
        return files


@contextlib.contextmanager
def running_orthanc(folder: Path) -> Iterator[Orthanc]:
    """Start Orthanc with storage in `folder`; wait until its API answers; stop it at the end."""
    require_orthanc()
    orthanc = Orthanc(free_port(), free_port())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "filter.lua").write_text(FILTER)
    config = {
        "Name": "crossdiff-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": orthanc.http_port, "DicomPort": orthanc.dicom_port, "DicomAet": AET, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckModalityHost": True, "DicomAlwaysAllowEcho": False,
        "DicomAlwaysAllowStore": False, "DicomModalities": {
            "crossdiff": {"AET": CALLING_AET, "Host": "127.0.0.1", "Port": 1},
            "readonly": {"AET": READ_ONLY_AET, "Host": "127.0.0.1", "Port": 1, "AllowStore": False},
        },
        "LuaScripts": [str(folder / "filter.lua")], "Plugins": [], "SaveJobs": False, "DicomAssociationCloseDelay": 0,
    }
    (folder / "orthanc.json").write_text(json.dumps(config))
    with (folder / "orthanc.log").open("w") as log:
        process = subprocess.Popen([str(ORTHANC), str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                orthanc.rest("/system")
                break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start: {(folder / 'orthanc.log').read_text()[-2000:]}") from None
                time.sleep(0.1)
        yield orthanc
    finally:
        process.kill()  # its storage is thrown away; a clean shutdown would only cost ~3 s
        process.wait()
