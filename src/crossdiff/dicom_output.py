"""Hospital-ready output: a synthetic CT as a DICOM CT series in its source MR's frame of reference, and the
uncertainty map beside it as a Parametric Map, a kind of object no planning system imports as a CT to plan on.

pydicom writes the CT Image Storage instances, one file per slice, because highdicom has no general
derived-CT writer (its issue 457); highdicom writes the Parametric Map. The series joins the source
MR's patient, study and frame of reference and references the MR instance of every slice. UIDs are
derived from the content (pixels, geometry, source series, patient, description), so the same
translation gives the same UIDs and a retried push to a PACS replaces instances instead of adding a
second copy of the series; any change to what an instance holds gives it new UIDs.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import uuid
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import highdicom
import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.sr.coding import Code
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pydicom.valuerep import validate_value

from crossdiff import __version__
from crossdiff.atomic import atomic_directory
from crossdiff.dicom import contains_dicom, read_series_headers
from crossdiff.errors import CrossdiffError, InputError
from crossdiff.volumes import Geometry, Volume

if TYPE_CHECKING:
    from crossdiff.inference import LoadedModel

SCT_FOLDER, UNCERTAINTY_FOLDER = "sct", "uncertainty"
SCT_SERIES_NUMBER, UNCERTAINTY_SERIES_NUMBER = 9901, 9902
SCT_IMAGE_TYPE = ["DERIVED", "SECONDARY", "AXIAL"]
HOUNSFIELD = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
PLANE_TOLERANCE_MM = 0.01  # how far an sCT slice may lie from its source MR slice's plane
INT16 = np.iinfo(np.int16)
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "crossdiff/dicom-output")

# The Patient module: copied from the source, or replaced as a whole by configured values (--patient).
PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDsSequence",
    "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
)
CONFIGURABLE_PATIENT = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientComments")
# General Study and Patient Study modules, and the series attributes that describe the same patient set-up.
STUDY_KEYWORDS = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "StudyDescription", "PatientAge", "PatientSize", "PatientWeight", "PatientPosition", "BodyPartExamined", "Laterality",
    "PositionReferenceIndicator",
)
# Type 2 attributes (and Laterality, Type 2C, which dciodvfy wants present): in every instance, empty when unknown.
TYPE2 = frozenset({
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "ReferringPhysicianName",
    "StudyID", "AccessionNumber", "PatientPosition", "PositionReferenceIndicator", "Laterality",
})


@dataclass(frozen=True)
class SourceSeries:
    """The series an sCT is made from: it gives the patient, study and frame of reference, and each
    sCT slice references the source instance in its plane."""

    folder: Path
    series_uid: str
    headers: tuple[pydicom.Dataset, ...]  # in slice order

    @property
    def first(self) -> pydicom.Dataset:
        return self.headers[0]


def read_source_series(folder: str | Path, series_uid: str | None = None) -> SourceSeries:
    """The source series of `folder`; it must have a frame of reference for the sCT to share."""
    folder = Path(folder)
    with quiet_pydicom():
        info, headers = read_series_headers(folder, series_uid)
    if not headers[0].get("FrameOfReferenceUID"):
        raise InputError(folder, f"series {info.uid} has no Frame of Reference UID, so no sCT can share its coordinates")
    return SourceSeries(folder, info.uid, tuple(headers))


@dataclass(frozen=True)
class Derivation:
    """What made the series, written into SeriesDescription and DerivationDescription."""

    method: str
    model: str  # the model's folder name and a digest of its weights
    settings: str  # sampler, steps, draws, seed

    def describe(self, source_uid: str | None) -> str:
        source = f"MR series {source_uid}" if source_uid else "an MR volume without DICOM source"
        return (f"Synthetic CT computed from {source} by crossdiff {__version__}, method {self.method}, model "
                f"{self.model} ({self.settings}); not an acquired CT")


@dataclass(frozen=True)
class DicomRequest:
    """Where to write and what the series join, settled (and checked) before any translating is done."""

    folder: Path
    source: SourceSeries | None
    patient: dict[str, str] | None = None  # replaces the source's Patient module when given

    def check(self, geometry: Geometry, target_modality: str | None) -> None:
        """Refuse, before translating, a model that does not make CT and a source series that is not the one
        the input on `geometry` was made from."""
        check_ct_target(target_modality)
        _slice_references(geometry, self.source)


def check_ct_target(modality: str | None) -> None:
    if modality != "CT":
        raise CrossdiffError(f"DICOM output is a CT series; this model makes {modality or 'an unknown modality'}, not CT")


@dataclass(frozen=True)
class DicomOutput:
    """What `write_dicom_outputs` wrote; `warnings` are for the user (they never hold patient values)."""

    folder: Path
    sct_files: list[Path]
    uncertainty_files: list[Path]
    study_uid: str
    frame_of_reference_uid: str
    sct_series_uid: str
    uncertainty_series_uid: str | None
    warnings: list[str] = field(default_factory=list)


def dicom_request(folder: Path, input_path: Path, reference: Path | None, patient: Sequence[str]) -> DicomRequest:
    """The request of `translate --output-dicom`: the source series is `reference`, else the input when it is
    a DICOM folder, else none (the series then join no study)."""
    check_destination(folder)
    source = None
    if reference is not None:
        source = read_source_series(reference)
    elif input_path.is_dir() and contains_dicom(input_path):
        source = read_source_series(input_path)
    return DicomRequest(folder, source, patient_values(patient) if patient else None)


def derivation_of(model: LoadedModel, options: dict[str, Any], samples: int, seed: int) -> Derivation:
    """The method, the model (folder name and a digest of its weights) and the sampling settings."""
    from crossdiff.checkpoints import MODEL_FILE  # torch comes with it: only a translation needs it

    config = model.method.config
    sampler, steps = options.get("sampler", config.get("sampler")), options.get("steps", config.get("steps"))
    weights = hashlib.sha256((model.folder / MODEL_FILE).read_bytes()).hexdigest()[:12]
    sampling = f"sampler {sampler}, {steps} steps, " if sampler else ""
    return Derivation(model.method.name, f"'{model.folder.name}' (weights sha256 {weights})",
                      f"{sampling}{samples} draw(s), seed {seed}")


def write_dicom_outputs(sct: Volume, uncertainty: Volume | None, request: DicomRequest, derivation: Derivation) -> DicomOutput:
    """Write `folder`/sct (one CT file per slice) and `folder`/uncertainty (one Parametric Map), atomically.

    With a source the series join its patient (or the request's patient, which replaces the Patient
    module), study and frame of reference; without one they get a new study and frame of reference
    and a warning says so.
    """
    folder, source, patient = request.folder, request.source, request.patient
    check_destination(folder)
    notes: list[str] = []
    with quiet_pydicom():
        identity = _identity(sct, source, patient, notes)
        references = _slice_references(sct.geometry, source)
        described = derivation.describe(None if source is None else source.series_uid)
        sct_series = _uid("series", identity.StudyInstanceUID, repr(sorted((patient or {}).items())), _digest(sct), described)
        slices = _ct_instances(sct, identity, references, sct_series, derivation, source)
        pmap = _parametric_map(uncertainty, slices, derivation, source) if uncertainty is not None else None
        with atomic_directory(folder) as tmp:
            sct_files = _save(slices, tmp / SCT_FOLDER, folder / SCT_FOLDER)
            uncertainty_files = _save([pmap], tmp / UNCERTAINTY_FOLDER, folder / UNCERTAINTY_FOLDER) if pmap else []
    if source is None:
        notes.append("no --reference-dicom: the series belong to no existing study (a new study and frame of reference, "
                     "no patient), so a planning system cannot place them with the MR")
    return DicomOutput(folder, sct_files, uncertainty_files, str(identity.StudyInstanceUID),
                       str(identity.FrameOfReferenceUID), str(sct_series),
                       None if pmap is None else str(pmap.SeriesInstanceUID), notes)


def patient_values(items: Sequence[str]) -> dict[str, str]:
    """--patient KEYWORD=VALUE pairs, each checked against its DICOM value representation.

    The messages name the keyword, never the value: values are patient-identifying."""
    values = {}
    for item in items:
        keyword, _, value = item.partition("=")
        keyword = keyword.strip()
        if keyword not in CONFIGURABLE_PATIENT or not _:
            raise CrossdiffError(f"--patient expects KEYWORD=VALUE with KEYWORD one of {', '.join(CONFIGURABLE_PATIENT)}")
        if not _valid(pydicom.datadict.dictionary_VR(keyword), value):
            vr = pydicom.datadict.dictionary_VR(keyword)
            raise CrossdiffError(f"--patient {keyword}: the value is not valid for DICOM VR {vr} (e.g. dates are YYYYMMDD)")
        values[keyword] = value
    return values


# ---------------------------------------------------------------------------------- identity


def _identity(sct: Volume, source: SourceSeries | None, patient: dict[str, str] | None,
              notes: list[str]) -> pydicom.Dataset:
    """Patient, study and frame of reference of the output: inherited from `source` or new."""
    identity = pydicom.Dataset()
    if source is not None:
        identity.SpecificCharacterSet = source.first.get("SpecificCharacterSet", "ISO_IR 192")
        copied = STUDY_KEYWORDS if patient is not None else PATIENT_KEYWORDS + STUDY_KEYWORDS
        for keyword in copied:
            _copy(source.first, identity, keyword, notes)
        identity.FrameOfReferenceUID = source.first.FrameOfReferenceUID
    else:
        identity.SpecificCharacterSet = "ISO_IR 192"
        content = _digest(sct)
        identity.StudyInstanceUID = _uid("study", content)
        identity.FrameOfReferenceUID = _uid("frame-of-reference", content)
        now = datetime.datetime.now()  # the study is made now
        identity.StudyDate, identity.StudyTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for keyword, value in (patient or {}).items():
        setattr(identity, keyword, value)
    for keyword in sorted(TYPE2 - set(identity.dir())):
        setattr(identity, keyword, "")
    return identity


def _copy(source: pydicom.Dataset, target: pydicom.Dataset, keyword: str, notes: list[str]) -> None:
    """Copy one attribute; a value invalid for its VR (the sarcoma MR's 20-character Study ID) is left
    out (empty if Type 2) rather than carried into a series that must validate."""
    if keyword not in source:
        return
    element = source[keyword]
    if element.VR == "SQ" or _valid(element.VR, element.value):
        target[keyword] = element
        return
    notes.append(f"the source's {keyword} is not valid for DICOM VR {element.VR}; it is left empty in the output")
    if keyword in TYPE2:
        setattr(target, keyword, "")


def _valid(vr: str, value: object) -> bool:
    """pydicom's own check of a value against its VR (numbers as the strings the file holds)."""
    items = list(value) if isinstance(value, (list, pydicom.multival.MultiValue)) else [value]
    try:
        for item in items:
            validate_value(vr, str(item) if vr in ("DS", "IS") else item, pydicom.config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def _uid(*parts: str) -> pydicom.uid.UID:
    """A UID determined by `parts`: the 2.25 form of a name-based (SHA-1) UUID, as ITU-T X.667 defines it.
    (pydicom's generate_uid ignores its entropy sources in this form and returns a random one.)"""
    return pydicom.uid.UID(f"2.25.{uuid.uuid5(UID_NAMESPACE, chr(31).join(parts)).int}")


def _digest(volume: Volume) -> str:
    """Hash of the voxels as stored (rounded) and the grid: two volumes that would be written alike hash alike."""
    digest = hashlib.sha256(_stored(volume.array).tobytes())
    digest.update(repr(volume.geometry).encode())
    return digest.hexdigest()


def _stored(array: np.ndarray) -> np.ndarray:
    """Whole HU as signed 16-bit: with slope 1 and intercept 0 the file gives HU within 0.5, unclipped."""
    low, high = float(array.min()), float(array.max())
    if low < INT16.min or high > INT16.max:
        raise CrossdiffError(f"the sCT spans {low:.0f} to {high:.0f} HU, beyond what 16-bit CT pixels hold")
    return np.rint(array).astype("<i2")


# ------------------------------------------------------------------------------------- geometry


def _axes(geometry: Geometry) -> np.ndarray:
    """Unit vectors of the index axes x, y, z in patient coordinates (the columns of the direction)."""
    return np.asarray(geometry.direction, dtype=float).reshape(3, 3).T


def _slice_positions(geometry: Geometry) -> np.ndarray:
    """Image Position (Patient) of every axial slice: its first voxel's centre."""
    origin = np.asarray(geometry.origin, dtype=float)
    return origin + np.outer(np.arange(geometry.size[2]) * geometry.spacing[2], _axes(geometry)[2])


def _slice_references(geometry: Geometry, source: SourceSeries | None) -> list[pydicom.Dataset | None]:
    """The source instance in each sCT slice's plane. A reference series whose orientation differs or
    that has no slice in some sCT plane is not the series the input was made from: refused."""
    if source is None:
        return [None] * geometry.size[2]
    x, y, _ = _axes(geometry)
    orientation = np.array(source.first.ImageOrientationPatient, dtype=float)
    if not np.allclose(orientation, np.concatenate([x, y]), atol=1e-3):
        raise InputError(source.folder, "reference series has another slice orientation than the input, so it is not the "
                         "series the input was made from")
    normal = np.cross(x, y)
    planes = np.array([float(np.dot(normal, np.array(h.ImagePositionPatient, dtype=float))) for h in source.headers])
    references = []
    for index, position in enumerate(_slice_positions(geometry)):
        nearest = int(np.argmin(np.abs(planes - np.dot(normal, position))))
        if abs(planes[nearest] - np.dot(normal, position)) > PLANE_TOLERANCE_MM:
            raise InputError(source.folder, f"reference series has no slice in the plane of input slice {index + 1}, so it "
                             "is not the series the input was made from")
        references.append(source.headers[nearest])
    return references


# ------------------------------------------------------------------------------------ instances


def _ct_instances(sct: Volume, identity: pydicom.Dataset, references: list[pydicom.Dataset | None],
                  series_uid: str, derivation: Derivation, source: SourceSeries | None) -> list[pydicom.Dataset]:
    """One CT Image Storage dataset per axial slice, in slice order."""
    now = datetime.datetime.now()
    stored = _stored(sct.array)
    x, y, _ = _axes(sct.geometry)
    series = pydicom.Dataset()
    series.update(identity)
    series.update({
        "Modality": "CT", "SeriesInstanceUID": series_uid, "SeriesNumber": SCT_SERIES_NUMBER,
        "SeriesDescription": f"crossdiff sCT ({derivation.method}, synthetic CT from MR)"[:64],
        "SeriesDate": now.strftime("%Y%m%d"), "SeriesTime": now.strftime("%H%M%S"),
        "Manufacturer": "crossdiff", "ManufacturerModelName": derivation.method, "SoftwareVersions": __version__,
        "SOPClassUID": CTImageStorage, "ImageType": SCT_IMAGE_TYPE,
        "DerivationDescription": derivation.describe(None if source is None else source.series_uid),
        "ContentDate": now.strftime("%Y%m%d"), "ContentTime": now.strftime("%H%M%S"),
        "InstanceCreationDate": now.strftime("%Y%m%d"), "InstanceCreationTime": now.strftime("%H%M%S"),
        "AcquisitionNumber": "", "KVP": "", "BurnedInAnnotation": "NO",
        "ImageOrientationPatient": [_ds(v) for v in (*x, *y)],
        "PixelSpacing": [_ds(sct.geometry.spacing[1]), _ds(sct.geometry.spacing[0])],
        "SliceThickness": _ds(sct.geometry.spacing[2]),
        "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
        "Rows": sct.geometry.size[1], "Columns": sct.geometry.size[0],
        "BitsAllocated": 16, "BitsStored": 16, "HighBit": 15, "PixelRepresentation": 1,
        "RescaleIntercept": "0", "RescaleSlope": "1", "RescaleType": "HU",
        "WindowCenter": "40", "WindowWidth": "400",
    })
    normal = np.cross(x, y)
    instances = []
    for index, (position, reference) in enumerate(zip(_slice_positions(sct.geometry), references)):
        instance = pydicom.Dataset()
        instance.update(series)
        instance.SOPInstanceUID = _uid("instance", series_uid, str(index))
        instance.InstanceNumber = index + 1
        instance.ImagePositionPatient = [_ds(v) for v in position]
        instance.SliceLocation = _ds(float(np.dot(normal, position)))
        if reference is not None:
            instance.SourceImageSequence = [_reference(reference)]
        instance.PixelData = stored[index].tobytes()
        instance["PixelData"].VR = "OW"
        instances.append(instance)
    return instances


def _parametric_map(std: Volume, slices: list[pydicom.Dataset], derivation: Derivation,
                    source: SourceSeries | None) -> pydicom.Dataset:
    """The per-voxel spread of the draws (HU) as one float Parametric Map on the sCT's planes; derived from
    the sCT instances, so highdicom gives it their patient, study and frame of reference."""
    values = np.ascontiguousarray(std.array, dtype=np.float32)
    series_uid = _uid("uncertainty", slices[0].SeriesInstanceUID, hashlib.sha256(values.tobytes()).hexdigest())
    mapping = highdicom.pm.RealWorldValueMapping(
        lut_label="std HU", lut_explanation="standard deviation of the Monte-Carlo draws", unit=HOUNSFIELD,
        value_range=(float(values.min()), float(values.max())), slope=1, intercept=0,
    )
    pmap = highdicom.pm.ParametricMap(
        source_images=slices, pixel_array=values, series_instance_uid=series_uid,
        series_number=UNCERTAINTY_SERIES_NUMBER, sop_instance_uid=_uid("instance", series_uid, "0"), instance_number=1,
        manufacturer="crossdiff", manufacturer_model_name=derivation.method, software_versions=__version__,
        device_serial_number="none", contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        content_label="UNCERTAINTY", content_description="std of the sCT draws, HU: not an image to plan on",
        voi_lut_transformations=[highdicom.VOILUTTransformation(window_center=50.0, window_width=100.0)],
        series_description="NOT FOR PLANNING: crossdiff sCT uncertainty (std, HU)",
    )
    pmap.DerivationDescription = ("Per-voxel standard deviation (HU) of the Monte-Carlo draws whose mean is the synthetic "
                                  f"CT series {slices[0].SeriesInstanceUID}; " + derivation.describe(
                                      None if source is None else source.series_uid))
    pmap.BurnedInAnnotation = "NO"
    for keyword in ("BodyPartExamined", "Laterality"):  # a paired body part needs its laterality in every series
        if keyword in slices[0]:
            pmap[keyword] = slices[0][keyword]
    return pmap


def _reference(header: pydicom.Dataset) -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.ReferencedSOPClassUID = header.SOPClassUID
    item.ReferencedSOPInstanceUID = header.SOPInstanceUID
    return item


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (DICOM DS), as precise as that allows."""
    for digits in range(10, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.1g}"


# ---------------------------------------------------------------------------------------- files


def check_destination(folder: Path) -> None:
    """Replacing a folder whole is safe only for an earlier output of this writer."""
    if folder.exists() and (not folder.is_dir() or set(p.name for p in folder.iterdir()) - {SCT_FOLDER, UNCERTAINTY_FOLDER}):
        raise InputError(folder, "exists and holds other files; give a new or empty folder for the DICOM output")


def _save(datasets: list[pydicom.Dataset], staged: Path, final: Path) -> list[Path]:
    """Write each dataset as a DICOM Part 10 file into `staged`; return where they will lie under `final`."""
    staged.mkdir()
    names = []
    for number, dataset in enumerate(datasets, start=1):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = dataset.SOPClassUID
        meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.file_meta = meta
        name = f"{number:04d}.dcm"
        dataset.save_as(staged / name, enforce_file_format=True)
        names.append(final / name)
    return names


@contextlib.contextmanager
def quiet_pydicom() -> Iterator[None]:
    """pydicom warns about odd values by quoting them; those values can identify the patient."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
