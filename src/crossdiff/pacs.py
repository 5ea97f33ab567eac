"""A PACS round trip over DICOM networking (DIMSE, with pynetdicom): find a study's MR series (C-FIND),
retrieve it (C-GET, which needs no route from the PACS back to us, unlike C-MOVE), and store the sCT and
uncertainty series (C-STORE).

Every failure is one CrossdiffError naming the PACS, the study or series by UID, and what failed;
none quotes a patient value. A push checks first that the PACS accepts both kinds of object, so a
refusal by SOP class stores nothing; a refusal mid-series says exactly which instances were stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedMRImageStorage,
    MRImageStorage,
    ParametricMapStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from crossdiff.dicom_output import DicomOutput, SourceSeries, quiet_pydicom, read_source_series
from crossdiff.errors import CrossdiffError, InputError
from crossdiff.readers import read_volume
from crossdiff.volumes import Volume

MR_STORAGE = (MRImageStorage, EnhancedMRImageStorage)
PUSHED_STORAGE = {CTImageStorage: "CT Image Storage", ParametricMapStorage: "Parametric Map Storage"}
SUCCESS, PENDING = frozenset({0x0000}), frozenset({0xFF00, 0xFF01})
STORED = frozenset({0x0000, 0xB000, 0xB006, 0xB007})  # success, or success with a coercion or element warning
CONNECT_TIMEOUT_S, ANSWER_TIMEOUT_S = 5, 60


@dataclass(frozen=True)
class PacsNode:
    """Where the PACS listens and the AE titles of both ends."""

    host: str
    port: int
    called_aet: str = "ORTHANC"
    calling_aet: str = "CROSSDIFF"

    def __str__(self) -> str:
        return f"{self.called_aet} at {self.host}:{self.port}"


@dataclass(frozen=True)
class FoundSeries:
    uid: str
    modality: str
    instances: int | None  # NumberOfSeriesRelatedInstances, when the PACS says it


def find_series(node: PacsNode, study_uid: str) -> list[FoundSeries]:
    """Every series of the study (C-FIND at SERIES level); an empty list if the PACS has no such study."""
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = ""
    query.Modality = ""
    query.NumberOfSeriesRelatedInstances = ""
    found = []
    for identifier in _find(node, query, f"study {study_uid}"):
        count = identifier.get("NumberOfSeriesRelatedInstances")
        found.append(FoundSeries(str(identifier.SeriesInstanceUID), str(identifier.get("Modality", "")),
                                 int(count) if count not in (None, "") else None))
    return found


def _find(node: PacsNode, query: pydicom.Dataset, what: str) -> list[pydicom.Dataset]:
    """The matches of a Study Root C-FIND; a refused query is an error."""
    matches = []
    with _association(node, [StudyRootQueryRetrieveInformationModelFind]) as association:
        for status, identifier in association.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = _status(node, status, f"C-FIND of {what}")
            if code in PENDING and identifier is not None:
                matches.append(identifier)
            elif code not in SUCCESS | PENDING:
                raise CrossdiffError(f"PACS {node} refused the C-FIND of {what} (status 0x{code:04X})")
    return matches


def choose_mr_series(node: PacsNode, study_uid: str, found: Sequence[FoundSeries], series_uid: str | None) -> FoundSeries:
    """The study's one MR series, or the one named; anything else is an error that lists what there is."""
    if not found:
        raise CrossdiffError(f"PACS {node} has no study {study_uid}")
    listing = "; ".join(f"{s.uid} ({s.modality or 'no modality'}, {s.instances} instances)" for s in found)
    mr = [s for s in found if s.modality == "MR" and (series_uid is None or s.uid == series_uid)]
    if not mr:
        named = f"no MR series {series_uid}" if series_uid else "no MR series"
        raise CrossdiffError(f"study {study_uid} on PACS {node} holds {named}; it holds: {listing}")
    if len(mr) > 1:
        raise CrossdiffError(f"study {study_uid} on PACS {node} holds several MR series; pick one with --series UID: {listing}")
    return mr[0]


def pull_mr_series(node: PacsNode, study_uid: str, folder: Path, series_uid: str | None = None) -> tuple[SourceSeries, Volume]:
    """Retrieve the study's MR series into `folder` and read it, with the checks of a local series (one
    grid, evenly spaced: a missing slice is refused) plus: every instance the PACS listed arrived."""
    series = choose_mr_series(node, study_uid, find_series(node, study_uid), series_uid)
    received = retrieve_series(node, study_uid, series.uid, folder)
    what = f"MR series {series.uid} of study {study_uid} from PACS {node}"
    if series.instances is not None and received != series.instances:
        raise CrossdiffError(f"{what}: {received} of its {series.instances} instances arrived")
    try:
        return read_source_series(folder, series.uid), read_volume(folder, modality="MR", series_uid=series.uid)
    except InputError as error:
        raise CrossdiffError(f"{what}: {error.problem}") from None


def retrieve_series(node: PacsNode, study_uid: str, series_uid: str, folder: Path) -> int:
    """C-GET one series into `folder` (one file per instance); returns how many instances arrived."""
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    received: list[Path] = []

    def keep(event: evt.Event) -> int:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        path = folder / f"{len(received) + 1:05d}.dcm"
        with quiet_pydicom():
            dataset.save_as(path, enforce_file_format=True)
        received.append(path)
        return 0x0000

    roles = [build_role(storage, scp_role=True) for storage in MR_STORAGE]
    contexts = [StudyRootQueryRetrieveInformationModelGet, *MR_STORAGE]
    with _association(node, contexts, roles, [(evt.EVT_C_STORE, keep)]) as association:
        for status, _ in association.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
            code = _status(node, status, f"C-GET of series {series_uid}")
            if code not in PENDING | SUCCESS | {0xB000}:
                raise CrossdiffError(f"PACS {node} failed the C-GET of series {series_uid} (status 0x{code:04X}) after "
                                     f"{len(received)} instances")
    return len(received)


def store_outputs(node: PacsNode, output: DicomOutput) -> dict[str, int]:
    """C-STORE the sCT series, then the uncertainty series; returns instances stored per series UID.

    Both SOP classes must be accepted before anything is sent. The push stops at the first refused
    instance; then, and after every push, a C-FIND asks the PACS which instances it holds (a PACS may
    acknowledge an instance it discards), and any shortfall is an error naming exactly those held."""
    batches = [_Batch("sCT", output.sct_series_uid, output.sct_files)]
    if output.uncertainty_series_uid is not None:
        batches.append(_Batch("uncertainty", output.uncertainty_series_uid, output.uncertainty_files))
    with _association(node, list(PUSHED_STORAGE)) as association:
        accepted = {context.abstract_syntax for context in association.accepted_contexts}
        refused = [name for uid, name in PUSHED_STORAGE.items() if uid not in accepted]
        if refused:
            raise CrossdiffError(f"PACS {node} does not accept {' or '.join(refused)}: nothing was stored")
        failure = _send(node, association, batches)
    held = {batch.series_uid: set(_held(node, output.study_uid, batch.series_uid)) for batch in batches}
    if failure is None and all(held[batch.series_uid] >= set(batch.sop_uids) for batch in batches):
        return {batch.series_uid: len(batch.files) for batch in batches}
    failure = failure or f"PACS {node} acknowledged every instance but does not hold them all"
    raise CrossdiffError(f"{failure}; the PACS now holds {_held_summary(held, batches)}")


@dataclass(frozen=True)
class _Batch:
    """One series to push: its files in order, and the SOP Instance UID of each."""

    label: str
    series_uid: str
    files: list[Path]

    @property
    def sop_uids(self) -> list[str]:
        with quiet_pydicom():
            return [str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in self.files]


def _send(node: PacsNode, association: Association, batches: list[_Batch]) -> str | None:
    """Send every file in order; the first refusal ends the push and is described, else None."""
    for batch in batches:
        label, series_uid, files = batch.label, batch.series_uid, batch.files
        for number, path in enumerate(files, start=1):
            with quiet_pydicom():
                status = association.send_c_store(path)
            code = int(status.Status) if "Status" in status else None
            if code not in STORED:
                answer = "no answer: it closed the connection" if code is None else f"status 0x{code:04X}"
                return f"PACS {node} refused instance {number} of {len(files)} of the {label} series {series_uid} ({answer})"
    return None


def _held(node: PacsNode, study_uid: str, series_uid: str) -> list[str]:
    """SOP Instance UIDs the PACS holds of a series (C-FIND at IMAGE level)."""
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    query.SOPInstanceUID = ""
    return [str(identifier.SOPInstanceUID) for identifier in _find(node, query, f"series {series_uid}")]


def _held_summary(held: dict[str, set[str]], batches: list[_Batch]) -> str:
    """'instances 1-2 of 47 of the sCT series UID, nothing of ...', numbered as the files were sent."""
    parts = []
    for batch in batches:
        numbers = [number for number, uid in enumerate(batch.sop_uids, start=1) if uid in held[batch.series_uid]]
        stored = f"instances {_ranges(numbers)} of {len(batch.files)}" if numbers else "nothing"
        parts.append(f"{stored} of the {batch.label} series {batch.series_uid}")
    return ", ".join(parts)


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    runs: list[list[int]] = []
    for number in numbers:
        if runs and number == runs[-1][1] + 1:
            runs[-1][1] = number
        else:
            runs.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _status(node: PacsNode, status: pydicom.Dataset, what: str) -> int:
    """The status code of a DIMSE response; an empty one means the association broke or timed out."""
    if "Status" not in status:
        raise CrossdiffError(f"PACS {node} gave no answer to the {what} (connection lost or timed out)")
    return int(status.Status)


@contextlib.contextmanager
def _association(
    node: PacsNode, contexts: Sequence[str], roles: list | None = None, handlers: list | None = None
) -> Iterator[Association]:
    """An established association, released at the end; an unreachable or refusing PACS is one clear error."""
    ae = AE(ae_title=node.calling_aet)
    ae.connection_timeout = CONNECT_TIMEOUT_S
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ANSWER_TIMEOUT_S
    for context in contexts:
        ae.add_requested_context(context)
    association = ae.associate(node.host, node.port, ae_title=node.called_aet, ext_neg=roles, evt_handlers=handlers)
    if not association.is_established:
        reason = ("it rejected the association (check the AE titles and that it knows this caller)" if association.is_rejected
                  else "no DICOM association (is the PACS running at that address?)")
        raise CrossdiffError(f"cannot reach PACS {node}: {reason}")
    try:
        yield association
    finally:
        if association.is_established:
            association.release()
