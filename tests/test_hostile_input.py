"""Hostile and broken input, one test per class of the hardening (issue 16): no file runs code, no
damaged header gives silently wrong geometry or HU, ITK never crashes or hangs the process, a tiny
file cannot make crossdiff allocate gigabytes, ids never become paths outside their folder, and every
refusal is one clean line naming the file. Every input is a real file (../shared/data, pydicom's
test files, the bundled model) damaged in tmp_path; the fuzz suite (tests/fuzz, test_fuzz.py) covers
the same classes by the thousand.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from helpers import REPO, SAMPLE, SARCOMA, assert_clear_failure, crossdiff, needs_shared
from pydicom.data import get_testdata_file

from crossdiff.atomic import atomic_path, write_texts
from crossdiff.data.manifest import load_manifest
from crossdiff.errors import InputError, InputWarning
from crossdiff.evaluation.benchmark_config import load_benchmark_config
from crossdiff.evaluation.fid import fid
from crossdiff.inference import load_model
from crossdiff.readers import read_volume

pytestmark = needs_shared
MODEL = SAMPLE.parent / "model"


def series_copy(tmp_path: Path, name: str = "STS_001/PET") -> tuple[Path, list[Path]]:
    """A real series (STS_001's PET: 59 slices) copied into tmp_path, its files in name order."""
    folder = Path(shutil.copytree(SARCOMA / name / "dicom" / "image", tmp_path / "series"))
    return folder, sorted(folder.glob("*.dcm"))


def rewrite(path: Path, change) -> None:
    header = pydicom.dcmread(path)
    change(header)
    header.save_as(path)


def set_raw(header: pydicom.Dataset, keyword: str, text: str) -> None:
    """Store `text` as the tag's bytes, as a damaged file would (pydicom refuses to build such values)."""
    raw = text.encode() + b" " * (len(text) % 2)
    tag = pydicom.datadict.tag_for_keyword(keyword)
    header[tag] = pydicom.dataelem.RawDataElement(tag, pydicom.datadict.dictionary_VR(keyword), len(raw), raw, 0,
                                                  header.is_implicit_VR, header.is_little_endian)


# --- 1. no file crossdiff reads may run code -------------------------------------------------------


class _Touch:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return os.system, (f"touch {self.target}",)


def test_no_weights_file_config_or_option_runs_code(tmp_path: Path) -> None:
    import torch

    sentinel = tmp_path / "code-ran"
    with zipfile.ZipFile(tmp_path / "features.pt2", "w") as archive:  # torch.export's layout, a pickle inside
        archive.writestr("features/data.pkl", pickle.dumps(_Touch(sentinel)))
    (tmp_path / "features.pth").write_bytes(pickle.dumps(_Touch(sentinel)))
    torch.save({"features.0.weight": _Touch(sentinel)}, tmp_path / "zipped.pth")
    slices = np.random.default_rng(0).random((4, 16, 16))
    for name, problem in (("features.pt2", "refused"), ("features.pth", "cannot read"), ("zipped.pth", "cannot read")):
        with pytest.raises(InputError, match=problem) as caught:
            fid(slices, slices, tmp_path / name)
        assert name in str(caught.value)
    config = tmp_path / "train.yaml"
    config.write_text(f'method: !!python/object/apply:os.system ["touch {sentinel}"]\n')
    refused = crossdiff("train", "--method", "unet", "--manifest", tmp_path / "m.json", "--out", tmp_path / "run",
                        "--config", config)
    assert_clear_failure(refused, str(config), "not valid YAML")
    option = crossdiff("translate", "--model", MODEL, "--input", SAMPLE / "mr.nii.gz", "--output", tmp_path / "o.nii.gz",
                       "--option", f'eta=!!python/object/apply:os.system ["touch {sentinel}"]')
    assert_clear_failure(option, "--option eta")
    assert not sentinel.exists()


# --- 2. no silently wrong geometry or intensities ----------------------------------------------------


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"])
def test_a_slice_without_its_image_plane_is_named(tmp_path: Path, keyword: str) -> None:
    """One slice of the real 59-slice PET series without its position (the spacing would become 15.24 mm
    instead of 3.27), orientation (1.69 mm) or pixel spacing (1 mm)."""
    folder, files = series_copy(tmp_path)
    rewrite(files[30], lambda header: delattr(header, keyword))
    with pytest.raises(InputError, match=f"has no {keyword}") as caught:
        read_volume(folder)
    assert caught.value.path == files[30]


@pytest.mark.parametrize("value", ["0\\0", "nan\\nan", "-1\\-1", "abc\\def", "1e30\\1e30", "2.5"])
def test_damaged_pixel_spacing_is_refused_not_one_millimetre(tmp_path: Path, value: str) -> None:
    folder, files = series_copy(tmp_path)
    for file in files:  # every slice alike: the series is consistent, only the value is wrong
        rewrite(file, lambda header: set_raw(header, "PixelSpacing", value))
    with pytest.raises(InputError, match="PixelSpacing") as caught:
        read_volume(folder)
    assert caught.value.path == files[0]


def test_one_ct_slice_without_rescale_intercept_is_named(tmp_path: Path) -> None:
    """Without its intercept GDCM reads that slice 1024 HU brighter than its neighbours."""
    folder, files = series_copy(tmp_path, "STS_001/CT")
    rewrite(files[20], lambda header: delattr(header, "RescaleIntercept"))
    with pytest.raises(InputError, match="has no RescaleIntercept") as caught:
        read_volume(folder)
    assert caught.value.path == files[20]


def test_rows_larger_than_the_pixel_data_is_refused_not_padded(tmp_path: Path) -> None:
    path = Path(shutil.copy(SARCOMA / "STS_001/CT/dicom/image/000010.dcm", tmp_path / "slice.dcm"))
    rewrite(path, lambda header: setattr(header, "Rows", header.Rows + 40))
    with pytest.raises(InputError, match="pixel data hold .* declare"):
        read_volume(path)


@pytest.mark.parametrize("value", [0.0, -1.0, 1e30, float("nan")])
def test_nifti_voxel_size_must_be_a_size(tmp_path: Path, value: float) -> None:
    data = bytearray(gzip.decompress((SARCOMA / "STS_001/PET/nifti/image/image.nii.gz").read_bytes()))
    struct.pack_into("<f", data, 76 + 4 * 2, value)  # pixdim[2]
    path = tmp_path / "pet.nii"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"pixdim\[2\]"):
        read_volume(path)


def test_a_missing_default_is_a_warning_that_evaluate_repeats(tmp_path: Path) -> None:
    """MetaImage defaults a missing Offset to 0 (the shared BrainWeb file has none): reading warns, and
    `evaluate` prints the warning and keeps it in summary.json."""
    with pytest.warns(InputWarning, match="has no Offset, TransformMatrix"):
        read_volume(SARCOMA.parent / "brainweb-t1-pd-slices" / "BrainProtonDensity3Slices.mha")
    image = _pet_as(tmp_path, "pet.mha")
    image.write_bytes(b"".join(line for line in image.read_bytes().splitlines(keepends=True) if not line.startswith(b"Offset")))
    result = crossdiff("evaluate", "--pred", image, "--ref", image, "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "has no Offset: read with origin 0" in result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert any("has no Offset" in note for note in summary["input_warnings"])


# --- 3. ITK never crashes or hangs the process -------------------------------------------------------


def _pet_as(tmp_path: Path, name: str, compress: bool = False) -> Path:
    path = tmp_path / name
    sitk.WriteImage(sitk.ReadImage(str(SARCOMA / "STS_002/PET/nifti/image/image.nii.gz")), str(path), useCompression=compress)
    return path


def _edit_header(path: Path, old: bytes, new: bytes) -> Path:
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new, 1))
    return path


def test_headers_that_crash_or_block_itk_are_refused_by_the_command(tmp_path: Path) -> None:
    """In a child process (`crossdiff info`), since these crashed the process (exit 139) or blocked it."""
    ascii_nrrd = _edit_header(_pet_as(tmp_path, "ascii.nrrd"), b"encoding: raw", b"encoding: ascii")
    negative = _edit_header(_pet_as(tmp_path, "negative.mha"), b"NDims = 3", b"NDims = -1")
    device = _edit_header(_pet_as(tmp_path, "device.mhd"), b"ElementDataFile = device.raw", b"ElementDataFile = /dev/zero")
    fifo = tmp_path / "waiting.nii.gz"
    os.mkfifo(fifo)
    for path, problem in ((ascii_nrrd, "declares text encoding, but the data are not text"),
                          (negative, "NDims = '-1' must be a whole number from 1 to 4"),
                          (device, "points outside the header's folder"), (fifo, "is not a regular file (a FIFO)")):
        started = time.perf_counter()
        assert_clear_failure(crossdiff("info", path), str(path), problem)
        assert time.perf_counter() - started < 60


# --- 4. no memory blow-up from a tiny file -----------------------------------------------------------


def test_tiny_damaged_files_cannot_make_crossdiff_allocate_gigabytes(tmp_path: Path) -> None:
    """Each read in the fuzz suite's isolated worker (1.5 GB address space), peak memory measured: a 3 KB
    truncated RLE file drove GDCM to 3.8 GB, a 6.5 KB JPEG-LS file with a repeated block to 1.5 GB; a
    compressed MetaImage declaring 4.6 GB; checkpoints whose config asks for 512- and 4096-channel networks."""
    sys.path.insert(0, str(REPO / "tests"))
    from fuzz.worker import Worker

    rle = tmp_path / "cut_rle.dcm"
    rle.write_bytes(Path(get_testdata_file("MR_small_RLE.dcm", download=False)).read_bytes()[:3000])
    jpeg_ls = Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm", download=False)).read_bytes()
    repeated = tmp_path / "repeated.dcm"  # 411 bytes repeated after the preamble: GDCM reserved 1.5 GB for it
    repeated.write_bytes(jpeg_ls[:71] + jpeg_ls[71:482] + jpeg_ls[71:])
    huge = _edit_header(_pet_as(tmp_path, "huge.mha", compress=True), b"DimSize = 30 27 48", b"DimSize = 1200 1100 900")
    models = []
    for channels in (512, 4096):
        model = Path(shutil.copytree(MODEL, tmp_path / f"model-{channels}"))
        config = yaml.safe_load((model / "config.yaml").read_text())
        config["method"]["config"]["channels"] = [channels] * 4
        (model / "config.yaml").write_text(yaml.safe_dump(config))
        models.append(model)
    worker = Worker(1536 << 20, timeout=120)
    try:
        for target, path, problem in (("volume", rle, "truncated or corrupt"), ("volume", huge, "more than the limit"),
                                      ("volume", repeated, "which no stored image has"),
                                      ("checkpoint", models[0], "weights do not fit"),
                                      ("checkpoint", models[1], "more than 2,000,000,000")):
            result = worker.run({"target": target, "path": str(path)})
            assert result["outcome"] == "clean-error", result
            assert problem in result["message"] and result["peak_rss_mb"] < 1000
    finally:
        worker.close()


def test_the_voxel_limit_is_configurable(tmp_path: Path) -> None:
    image = SARCOMA / "STS_002/PET/nifti/image/image.nii.gz"
    refused = subprocess.run([sys.executable, "-m", "crossdiff", "info", str(image)], capture_output=True, text=True,
                             env={**os.environ, "CROSSDIFF_MAX_VOXELS": "1000"}, timeout=300)
    assert_clear_failure(refused, str(image), "more than the limit of 1,000 (CROSSDIFF_MAX_VOXELS)")


# --- 5. ids that become paths stay inside their folder -----------------------------------------------


def test_case_ids_and_method_names_cannot_leave_their_folder(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    image = str(SARCOMA / "STS_001/CT/nifti/image/image.nii.gz")
    for case in ("../../..", "a/b", ".hidden"):
        manifest.write_text(json.dumps({"cases": {case: {"split": "train", "images": {"ct": image}}}}))
        with pytest.raises(InputError, match="the case id must not start with '.' or hold '/'"):
            load_manifest(manifest)
    config = yaml.safe_load((REPO / "benchmarks/configs/quick.yaml").read_text())
    config["methods"][0]["name"] = "../../outside"
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(InputError, match="method name '../../outside' must not start with"):
        load_benchmark_config(path)


# --- 6. one clean line for every bad input ------------------------------------------------------------


def test_config_and_manifest_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    manifest = tmp_path / "deep.json"
    manifest.write_text("[" * 100_000 + "]" * 100_000)
    config = tmp_path / "bad.yaml"
    config.write_text("slices: {min_mask_fraction: abc}\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"training: {steps: 10}\n\xff\xfe\n")
    long_name = tmp_path / ("x" * 300 + ".nii.gz")
    assert_clear_failure(crossdiff("check", manifest), str(manifest), "nested too deeply")
    for path, problem in ((config, "slices.min_mask_fraction: input should be a valid number (got 'abc')"),
                          (binary, "is not UTF-8 text")):
        result = crossdiff("train", "--method", "unet", "--manifest", manifest, "--out", tmp_path / "run", "--config", path)
        assert_clear_failure(result, str(path), problem)
    assert_clear_failure(crossdiff("info", long_name), "x" * 300, "File name too long")


def test_library_chatter_stays_off_the_console(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """libjpeg prints 'Corrupt JPEG data' on stdout, MetaIO its parse errors on stderr."""
    jpeg = tmp_path / "slice.jpg"
    sitk.WriteImage(sitk.ReadImage(str(SARCOMA.parent / "brainweb-t1-pd-slices" / "BrainT1Slice.png")), str(jpeg))
    data = bytearray(jpeg.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 40] = bytes(40)  # damaged entropy-coded data
    jpeg.write_bytes(bytes(data))
    capfd.readouterr()
    read_volume(jpeg)
    with pytest.raises(InputError):
        read_volume(_edit_header(_pet_as(tmp_path, "broken.mha"), b"ElementType = MET_FLOAT", b"ElementType = MET_NOTHING"))
    output = capfd.readouterr()
    assert output.out == "" and output.err == ""


# --- 7. outputs as a set; what a killed run leaves is cleaned up ---------------------------------------


def _ignore_file_size_signal() -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write beyond the limit then fails with EFBIG, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (3000, 3000))  # room for metrics.csv, not for slices.csv


def test_evaluate_on_a_full_disk_replaces_none_of_its_earlier_files(tmp_path: Path) -> None:
    ct = SARCOMA / "STS_003/CT/nifti/image/image.nii.gz"
    out = tmp_path / "out"
    assert crossdiff("evaluate", "--pred", ct, "--ref", ct, "--out", out).returncode == 0
    earlier = {file.name: file.read_bytes() for file in out.iterdir()}
    noisy = tmp_path / "noisy.nii.gz"  # another result, so every file would change
    image = sitk.ReadImage(str(ct))
    sitk.WriteImage(image + sitk.AdditiveGaussianNoise(image, 30.0), str(noisy))
    full = subprocess.run([sys.executable, "-m", "crossdiff", "evaluate", "--pred", str(noisy), "--ref", str(ct), "--out",
                           str(out)], capture_output=True, text=True, preexec_fn=_ignore_file_size_signal, timeout=300)
    assert_clear_failure(full, "could not be written")
    assert {file.name: file.read_bytes() for file in out.iterdir()} == earlier  # nothing new, nothing left behind


def test_a_killed_writer_leaves_temporaries_that_the_next_write_removes(tmp_path: Path) -> None:
    target = tmp_path / "result.txt"
    writer = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from crossdiff.atomic import atomic_path\n"
        f"with atomic_path({str(target)!r}) as tmp:\n    tmp.write_text('half'); print('writing', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".result_txt.")]
    assert len(left) == 1 and not target.exists()
    write_texts(tmp_path, {"result.txt": "complete"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"] and target.read_text() == "complete"
    with atomic_path(tmp_path / "other.txt") as tmp:  # a live writer's temporary is left alone
        tmp.write_text("x")
        write_texts(tmp_path, {"result.txt": "again"})
        assert tmp.exists()


def test_unwritable_outputs_fail_before_any_work(tmp_path: Path) -> None:
    """/proc takes no new files, whoever asks (these tests may run as root)."""
    for command in (["demo", "--out", "/proc/crossdiff-demo"], ["export", "--model", MODEL, "--out", "/proc/crossdiff-model"]):
        started = time.perf_counter()
        assert_clear_failure(crossdiff(*command), "/proc/crossdiff-", "cannot be written")
        assert time.perf_counter() - started < 30  # the demo alone computes for a minute before writing


def test_exported_models_get_ordinary_permissions(tmp_path: Path) -> None:
    assert crossdiff("export", "--model", MODEL, "--out", tmp_path / "shipped").returncode == 0
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "shipped").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "shipped" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


# --- 8. a crafted training state -----------------------------------------------------------------------


def test_a_crafted_training_state_is_refused_on_resume(tmp_path: Path) -> None:
    from rich.console import Console

    from crossdiff.methods import get_method
    from crossdiff.methods.base import DataSpec
    from crossdiff.training import TrainConfig, train

    sys.path.insert(0, str(REPO / "tests"))
    from fuzz.corpus import TINY_TRAINING, TINY_UNET, tiny_dataset

    def unet():
        return get_method("unet")(TINY_UNET, DataSpec(1, 1, (16, 16)))

    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    train(unet(), tiny_dataset(), None, TrainConfig.from_dict({**TINY_TRAINING, "steps": 2}), tmp_path, console=quiet)
    state_file = tmp_path / "checkpoints" / "step-0000002" / "state.json"
    original = json.loads(state_file.read_text())
    for step, problem in ((1e12, "input should be a valid integer"), (10**12, "step 1000000000000"), (-3, "step -3")):
        state_file.write_text(json.dumps({**original, "step": step}))
        with pytest.raises(InputError, match=problem) as caught:
            train(unet(), tiny_dataset(), None, TrainConfig.from_dict(TINY_TRAINING), tmp_path, resume=True, console=quiet)
        assert caught.value.path == state_file
    state_file.write_text(json.dumps({**original, "rng": {"python": [3, [1, 2], None], "numpy": ["x"]}}))
    with pytest.raises(InputError, match="training state does not fit this run"):
        train(unet(), tiny_dataset(), None, TrainConfig.from_dict(TINY_TRAINING), tmp_path, resume=True, console=quiet)
    (tmp_path / "checkpoints" / "latest").unlink()
    (tmp_path / "checkpoints" / "latest").symlink_to("/etc")
    with pytest.raises(InputError, match="does not point to a checkpoint folder of this run"):
        train(unet(), tiny_dataset(), None, TrainConfig.from_dict(TINY_TRAINING), tmp_path, resume=True, console=quiet)


def test_a_crafted_checkpoint_config_is_named_before_anything_is_built(tmp_path: Path) -> None:
    model = Path(shutil.copytree(MODEL, tmp_path / "model"))
    config = yaml.safe_load((model / "config.yaml").read_text())
    for change, problem in ((lambda c: c["data"].update(size=[100000, 100000]), "data.size"),
                            (lambda c: c["method"]["config"].update(steps=10**9), "method.steps"),
                            (lambda c: c["method"]["config"].update(lr="abc"), "method.lr: expected a finite number"),
                            (lambda c: c["model"]["scalings"]["target"].update(high=float("inf")), "scaling.high")):
        changed = json.loads(json.dumps(config))
        change(changed)
        (model / "config.yaml").write_text(yaml.safe_dump(changed))
        with pytest.raises(InputError, match=problem) as caught:
            load_model(model, "cpu")
        assert caught.value.path == model / "config.yaml"
