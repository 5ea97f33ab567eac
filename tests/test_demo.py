"""The built-in default: the real pipeline on the bundled patient, with outputs a person can check."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import crossdiff
from PIL import Image

from crossdiff import read_volume
from crossdiff.demo import run_demo
from crossdiff.errors import InputError


def test_demo_command_writes_aligned_normalised_images_and_a_preview(tmp_path, sample_dir):
    out = tmp_path / "demo"
    result = crossdiff("demo", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "demo output written to" in result.stdout
    ct = read_volume(sample_dir / "ct.nii.gz")
    for key in ("ct", "mr", "pet"):
        image = read_volume(out / f"{key}_normalised.nii.gz")
        assert image.geometry.matches(ct.geometry)
        assert image.array.min() >= -1 and image.array.max() <= 1
    mask = read_volume(out / "body_mask.nii.gz", modality="mask")
    assert 0.05 < mask.array.mean() < 0.95
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nmi_mr_ct_after"] > summary["nmi_mr_ct_before"]
    assert (out / "config.yaml").is_file()
    with Image.open(out / "preview.png") as preview:
        assert preview.width > 800 and preview.height > 200


def test_damaged_sample_is_refused_and_earlier_output_survives(tmp_path, sample_dir):
    copy = tmp_path / "sample"
    shutil.copytree(sample_dir.parent, copy, ignore=shutil.ignore_patterns("*.py"))
    out = tmp_path / "demo"
    out.mkdir()
    (out / "earlier.txt").write_text("keep me")
    damaged = copy / "STS_003" / "mr.nii.gz"
    data = bytearray(damaged.read_bytes())
    data[5000] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(InputError, match="mr.nii.gz.*damaged"):
        run_demo(out, sample_dir=copy)
    damaged.unlink()
    with pytest.raises(InputError, match="mr.nii.gz.*missing"):
        run_demo(out, sample_dir=copy)
    assert (out / "earlier.txt").read_text() == "keep me"
    assert not any(p.name.startswith(".demo") for p in tmp_path.iterdir())
