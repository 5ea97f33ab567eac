"""The seeds: real files of every kind crossdiff reads, copied or converted into the campaign's folder.

Images come from ../shared/data (NIfTI, the MetaImage with its .raw, PNG slices, DICOM series) and from
pydicom's test files (DICOM in many transfer syntaxes); MetaImage and NRRD variants are the real PET
volume written by SimpleITK (inline, compressed, detached). Manifests are what `crossdiff prepare` makes
of the shared datasets; configs are the project's own; the checkpoint is the bundled demo model, and a
resumable run is trained for two steps here. FID weights are VGG16-shaped random tensors, next to
crafted files whose loading would run a command (they must never be unpickled).
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("CROSSDIFF_SHARED_DATA", REPO.parent / "shared" / "data"))
SARCOMA = SHARED / "sarcoma-ct-mr-pet"
SAMPLE_MODEL = REPO / "src" / "crossdiff" / "sample" / "model"
CONFIGS = REPO / "benchmarks" / "configs"
SENTINEL_NAME = "CODE_WAS_EXECUTED"


@dataclass(frozen=True)
class Seed:
    """One real input: `format` picks the mutators, `target` the reader that is fed its mutants."""

    format: str
    target: str
    path: Path
    label: str
    hostile: bool = False  # the seed itself must be refused (crafted payloads)


def build(work: Path) -> list[Seed]:
    """Every seed, built into `work/seeds` (the shared data are never written)."""
    import warnings

    import crossdiff.readers  # noqa: F401 - silences ITK's own warnings for the conversions below
    from crossdiff.errors import InputWarning

    warnings.filterwarnings("ignore", module="pydicom")
    warnings.filterwarnings("ignore", category=InputWarning)  # the seeds' own defaults: the mutants' warnings count
    seeds_dir = work / "seeds"
    shutil.rmtree(seeds_dir, ignore_errors=True)
    seeds_dir.mkdir(parents=True)
    return [*_images(seeds_dir), *_dicom(), *_documents(seeds_dir), *_models(seeds_dir, work / SENTINEL_NAME)]


def _images(folder: Path) -> list[Seed]:
    import SimpleITK as sitk

    seeds = [Seed("nifti", "volume", SARCOMA / f"{case}/{modality}/nifti/image/image.nii.gz", f"{case} {modality} NIfTI")
             for case, modality in (("STS_001", "PET"), ("STS_002", "PET"), ("STS_003", "PET"), ("STS_002", "MR_T1"))]
    seeds.append(Seed("nifti", "mask", SARCOMA / "STS_002/PET/nifti/mask/mask.nii.gz", "STS_002 PET mask NIfTI"))
    seeds.append(Seed("nifti", "volume", SHARED / "brain-multicontrast-mri/TCGA-DU-7294/t1.nii.gz", "TCGA-DU-7294 T1 NIfTI"))
    raw_nifti = folder / "pet.nii"
    raw_nifti.write_bytes(gzip.decompress((SARCOMA / "STS_003/PET/nifti/image/image.nii.gz").read_bytes()))
    seeds.append(Seed("nifti", "volume", raw_nifti, "STS_003 PET NIfTI, uncompressed"))
    brainweb = SHARED / "brainweb-t1-pd-slices"
    detached = folder / "brainweb"
    detached.mkdir()
    for name in ("BrainProtonDensity3Slices.mha", "BrainProtonDensity3Slices.raw"):
        shutil.copy(brainweb / name, detached / name)
    seeds.append(Seed("metaimage", "volume", detached / "BrainProtonDensity3Slices.mha", "BrainWeb PD, MetaImage + .raw"))
    pet = sitk.ReadImage(str(SARCOMA / "STS_002/PET/nifti/image/image.nii.gz"))
    for name, compress, kind in (("pet.mha", True, "metaimage"), ("pet_raw.mha", False, "metaimage"),
                                 ("pet.nrrd", True, "nrrd"), ("pet_raw.nrrd", False, "nrrd"),
                                 ("pet_detached.mhd", False, "metaimage"), ("pet_detached.nhdr", False, "nrrd")):
        own = folder / name.replace(".", "_")  # each in its own folder: mutants copy the folder (data files too)
        own.mkdir()
        sitk.WriteImage(pet, str(own / name), useCompression=compress)
        seeds.append(Seed(kind, "volume", own / name, f"STS_002 PET as {name} (SimpleITK)"))
    for name in ("BrainT1Slice.png", "BrainProtonDensitySlice.png", "BrainT1SliceBorder20.png"):
        seeds.append(Seed("png", "volume", brainweb / name, f"BrainWeb {name}"))
    png = SHARED / "paired-mri-ct-png"
    seeds.append(Seed("png", "volume", png / "CT/PNG/Patient_01/CT_PNG (5).png", "paired CT PNG (RGB grey)"))
    seeds.append(Seed("png", "volume", png / "T1-MRI/PNG/Patient_10/T1_PNG (3).png", "paired T1 PNG (RGB grey)"))
    seeds += _arrays(folder, pet)
    jpeg = folder / "brain_t1.jpg"
    sitk.WriteImage(sitk.ReadImage(str(brainweb / "BrainT1Slice.png")), str(jpeg))
    seeds.append(Seed("jpeg", "volume", jpeg, "BrainWeb T1 as JPEG (SimpleITK)"))
    return seeds


def _arrays(folder: Path, image: object) -> list[Seed]:
    """The real PET volume as the arrays crossdiff reads: .npy, .npz, MATLAB v5 (plain and compressed), v7.3."""
    import h5py
    import numpy as np
    import scipy.io
    import SimpleITK as sitk

    volume = sitk.GetArrayFromImage(image)  # (slices, rows, cols)
    paths = {"npy": folder / "pet.npy", "npz": folder / "pet.npz", "mat": folder / "pet.mat", "matz": folder / "pet_z.mat",
             "mat73": folder / "pet_v73.mat"}
    np.save(paths["npy"], volume)
    np.savez_compressed(paths["npz"], pet=volume)
    scipy.io.savemat(paths["mat"], {"pet": np.moveaxis(volume, 0, -1)})
    scipy.io.savemat(paths["matz"], {"pet": np.moveaxis(volume, 0, -1)}, do_compression=True)
    with h5py.File(paths["mat73"], "w") as handle:  # MATLAB v7.3 stores the (rows, cols, slices) array reversed
        handle["pet"] = np.transpose(volume, (0, 2, 1))
    return [Seed("array", "volume", path, f"STS_002 PET as {path.name}") for path in paths.values()]


def _dicom() -> list[Seed]:
    from pydicom.data import get_testdata_file

    from crossdiff.dicom import NON_IMAGE_MODALITIES

    seeds = []
    for name in ("STS_001/PET", "STS_002/MR_T1", "STS_003/PET", "STS_002/CT"):
        seeds.append(Seed("dicom-series", "volume", SARCOMA / name / "dicom" / "image", f"{name} DICOM series"))
        middle = sorted((SARCOMA / name / "dicom" / "image").glob("*.dcm"))[10]
        seeds.append(Seed("dicom-file", "volume", middle, f"{name} DICOM slice {middle.name}"))
    folder = Path(get_testdata_file("CT_small.dcm", download=False)).parent
    for path in sorted(folder.glob("*.dcm")):
        if _pydicom_image(path, NON_IMAGE_MODALITIES):
            seeds.append(Seed("dicom-file", "volume", path, f"pydicom {path.name}"))
    return seeds


def _pydicom_image(path: Path, non_image: frozenset[str]) -> bool:
    """pydicom's test files that are images crossdiff reads unmutated (some are deliberately broken)."""
    import pydicom

    from crossdiff.errors import CrossdiffError
    from crossdiff.readers import read_volume

    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        if "Rows" not in header or str(header.get("Modality", "")).upper() in non_image:
            return False
        read_volume(path)
    except (CrossdiffError, Exception):  # a seed must read cleanly; broken test files are not seeds
        return False
    return True


def _documents(folder: Path) -> list[Seed]:
    import yaml

    from crossdiff.data.layouts import prepare_manifest

    seeds = []
    for dataset, layout in ((SARCOMA, "modality-folders"), (SHARED / "brain-multicontrast-mri", None)):
        for suffix in (".json", ".csv"):
            path = folder / f"{dataset.name}{suffix}"
            prepare_manifest(dataset, path, layout=layout, prefer="nifti", val=0.0, test=0.34, seed=0, names={})
            seeds.append(Seed(f"manifest{suffix}", "manifest", path, f"manifest of {dataset.name} ({suffix})"))
    for config in sorted(CONFIGS.glob("*.yaml")):
        document = yaml.safe_load(config.read_text())
        if "methods" in document:
            copy = folder / f"benchmark-{config.name}"
            shutil.copy(config, copy)
            seeds.append(Seed("yaml", "benchmark-config", copy, f"benchmark config {config.name}"))
        else:
            copy = folder / f"train-{config.name}"
            shutil.copy(config, copy)
            seeds.append(Seed("yaml", "train-config", copy, f"train config {config.name}"))
    for options in ("eta=0.5", "sampler=ddim", "steps=10", "clip=false", "solver=heun", "snr=0.16", "corrector_steps=1"):
        path = folder / f"option-{options.split('=')[0]}.txt"
        path.write_text(options)
        seeds.append(Seed("option", "option", path, f"--option {options}"))
    return seeds


def _models(folder: Path, sentinel: Path) -> list[Seed]:
    model = folder / "model"
    shutil.copytree(SAMPLE_MODEL, model)
    seeds = [Seed("checkpoint", "checkpoint", model, "bundled demo model")]
    run = folder / "run"
    _tiny_run(run)
    seeds.append(Seed("run", "resume", run, "a 2-step unet run, resumed"))
    seeds += _fid_files(folder, sentinel)
    return seeds


def tiny_dataset() -> list[dict]:
    """16 seeded 16 x 16 slices: what the resume target trains on (the same for seed and mutants)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    return [{"source": torch.rand(1, 16, 16, generator=generator) * 2 - 1,
             "target": torch.rand(1, 16, 16, generator=generator) * 2 - 1,
             "mask": torch.ones(1, 16, 16)} for _ in range(16)]


TINY_UNET = {"channels": [4, 8], "strides": [2], "num_res_units": 0}
TINY_TRAINING = {"steps": 4, "batch_size": 4, "val_every": 100, "checkpoint_every": 1, "log_every": 100, "device": "cpu"}


def _tiny_run(run: Path) -> None:
    from rich.console import Console

    from crossdiff.methods import get_method
    from crossdiff.methods.base import DataSpec
    from crossdiff.training import TrainConfig, seed_everything, train

    seed_everything(0)
    method = get_method("unet")(TINY_UNET, DataSpec(1, 1, (16, 16)))
    config = TrainConfig.from_dict({**TINY_TRAINING, "steps": 2})
    train(method, tiny_dataset(), None, config, run, console=Console(file=open(os.devnull, "w")))  # noqa: SIM115


class _Payload:
    """Unpickling this runs `touch SENTINEL`: the attack a weights file must never get to make."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.sentinel}",)


def _fid_files(folder: Path, sentinel: Path) -> list[Seed]:
    import torch
    from safetensors.torch import save_file

    from crossdiff.losses import vgg16_features

    state = {f"features.{key}": value for key, value in vgg16_features(29).state_dict().items()}
    save_file(state, str(folder / "vgg16.safetensors"))
    torch.save(state, folder / "vgg16.pth")
    (folder / "payload.pth").write_bytes(pickle.dumps(_Payload(sentinel)))
    with zipfile.ZipFile(folder / "payload.pt2", "w") as archive:  # torch.export's layout, a pickle inside
        archive.writestr("payload/data.pkl", pickle.dumps(_Payload(sentinel)))
        archive.writestr("payload/version", "3\n")
    torch.save({"features.0.weight": _Payload(sentinel)}, folder / "payload_zip.pth")
    seeds = [Seed("fid", "fid", folder / name, f"FID weights {name}") for name in ("vgg16.safetensors", "vgg16.pth")]
    return seeds + [Seed("fid", "fid", folder / name, f"crafted {name} (runs a command if unpickled)", hostile=True)
                    for name in ("payload.pth", "payload.pt2", "payload_zip.pth")]
