"""Manifest files: round trips, relative paths, validation messages, and splitting by case.

Every manifest here points at real images from ../shared/data (linked into tmp_path where a test
needs the dataset inside the manifest's folder).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from crossdiff.data.manifest import (
    CaseEntry,
    Manifest,
    assign_splits,
    load_manifest,
    save_manifest,
    validation_cases,
)
from crossdiff.errors import CrossdiffError, InputError
from crossdiff.readers import read_volume


def _nifti(sarcoma: Path, case: str, folder: str, kind: str = "image") -> Path:
    return sarcoma / case / folder / "nifti" / kind / f"{kind}.nii.gz"


@pytest.fixture
def sarcoma(shared_data: Path) -> Path:
    return shared_data / "sarcoma-ct-mr-pet"


@pytest.fixture
def manifest(sarcoma: Path) -> Manifest:
    """Two sarcoma cases as a user would list them by hand; the second has a DICOM CT and a body mask."""
    return Manifest(
        {
            "STS_001": CaseEntry(
                images={"ct": _nifti(sarcoma, "STS_001", "CT"), "mr": _nifti(sarcoma, "STS_001", "MR_T1")},
                labels={"ct": _nifti(sarcoma, "STS_001", "CT", "mask")},
                split="train",
            ),
            "STS_002": CaseEntry(
                images={"ct": sarcoma / "STS_002" / "CT" / "dicom" / "image"},
                mask=_nifti(sarcoma, "STS_002", "CT", "mask"),
                split="test",
            ),
        }
    )


def _link_dataset(sarcoma: Path, root: Path) -> dict[str, Path]:
    """A small dataset folder made of links to the real PET and CT of STS_002."""
    files = {"pet": root / "STS_002" / "pet.nii.gz", "ct": root / "STS_002" / "ct.nii.gz"}
    files["pet"].parent.mkdir(parents=True)
    files["pet"].symlink_to(_nifti(sarcoma, "STS_002", "PET"))
    files["ct"].symlink_to(_nifti(sarcoma, "STS_002", "CT"))
    return files


@pytest.mark.parametrize("name", ["manifest.json", "manifest.csv"])
def test_round_trip_keeps_every_field(manifest: Manifest, tmp_path: Path, name: str) -> None:
    save_manifest(manifest, tmp_path / name)
    assert load_manifest(tmp_path / name) == manifest


def test_csv_has_one_column_per_modality_and_label(manifest: Manifest, tmp_path: Path, sarcoma: Path) -> None:
    save_manifest(manifest, tmp_path / "m.csv")
    lines = (tmp_path / "m.csv").read_text().splitlines()
    assert lines[0] == "case,split,mask,ct,mr,label:ct"
    assert lines[2].split(",")[:2] == ["STS_002", "test"]
    assert lines[2].split(",")[2] == str(_nifti(sarcoma, "STS_002", "CT", "mask"))


def test_paths_are_relative_below_the_manifest_and_absolute_elsewhere(sarcoma: Path, tmp_path: Path) -> None:
    files = _link_dataset(sarcoma, tmp_path / "data")
    outside = _nifti(sarcoma, "STS_002", "MR_T1")
    entry = CaseEntry({**files, "mr": outside}, split="train")
    save_manifest(Manifest({"STS_002": entry}), tmp_path / "data" / "manifest.json")
    stored = json.loads((tmp_path / "data" / "manifest.json").read_text())["cases"]["STS_002"]["images"]
    assert stored == {"pet": "STS_002/pet.nii.gz", "ct": "STS_002/ct.nii.gz", "mr": str(outside)}


def test_moved_dataset_and_manifest_stay_valid(sarcoma: Path, tmp_path: Path) -> None:
    files = _link_dataset(sarcoma, tmp_path / "data")
    save_manifest(Manifest({"STS_002": CaseEntry(files, split="test")}), tmp_path / "data" / "manifest.csv")
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(tmp_path / "data", moved)
    case = load_manifest(moved / "manifest.csv").cases["STS_002"]
    assert case.images == {"pet": moved / "STS_002" / "pet.nii.gz", "ct": moved / "STS_002" / "ct.nii.gz"}
    assert read_volume(case.images["pet"]).modality == "PET"


def test_missing_files_are_all_named_in_one_error(sarcoma: Path, tmp_path: Path) -> None:
    document = {
        "cases": {
            "STS_001": {
                "split": "train",
                "images": {"ct": str(_nifti(sarcoma, "STS_001", "CT")), "mr": "gone/mr.nii.gz"},
            },
            "STS_009": {"split": "val", "images": {"ct": "/nowhere/ct.nii.gz"}, "labels": {"ct": "gone/gtv.nii.gz"}},
        }
    }
    path = tmp_path / "m.json"
    path.write_text(json.dumps(document))
    with pytest.raises(InputError) as caught:
        load_manifest(path)
    message = str(caught.value)
    assert str(path) in message and "3 file(s)" in message
    for missing in (tmp_path / "gone" / "mr.nii.gz", "/nowhere/ct.nii.gz", tmp_path / "gone" / "gtv.nii.gz"):
        assert str(missing) in message
    assert "STS_009" in message and "labels.ct" in message
    assert load_manifest(path, check_files=False).cases["STS_009"].split == "val"


CT = "/work/ct.nii.gz"


def _one_case(**fields: object) -> str:
    return json.dumps({"cases": {"p1": fields}})


MALFORMED_JSON = [
    ("{not json", ["not valid JSON"]),
    (json.dumps({"cases": []}), ['"cases"']),
    (json.dumps({"cases": {}}), ["no cases"]),
    (json.dumps({"format": "nnunet", "cases": {}}), ["not a crossdiff manifest"]),
    (_one_case(split="train"), ["'p1'", "missing 'images'"]),
    (_one_case(images={"ct": CT}), ["'p1'", "missing 'split'"]),
    (_one_case(split="training", images={"ct": CT}), ["'p1'", "'training'", "train, val, test"]),
    (_one_case(split="train", image={"ct": CT}), ["'p1'", "unknown field", "image"]),
    (_one_case(split="train", images={}), ["'p1'", "'images' is empty"]),
    (_one_case(split="train", images={"CT": CT}), ["'p1'", "'CT'", "lowercase"]),
    (_one_case(split="train", images={"ct": 3}), ["'p1'", "images.ct", "file path"]),
    (_one_case(split="train", images={"ct": CT}, mask=1), ["'p1'", "'mask'"]),
    (_one_case(split="train", images=CT), ["'p1'", "mapping"]),
    ('{"cases": {"p1": {"split": "train", "images": {}}, "p1": {}}}', ["'p1'", "more than once"]),
]
MALFORMED_CSV = [
    (f"case,mask,ct\np1,,{CT}\n", ["'split' column"]),
    ("case,split,ct\np1,train,a\np1,test,b\n", ["line 3", "repeats case 'p1'"]),
    (f"case,split,ct\np1,holdout,{CT}\n", ["'p1'", "'holdout'"]),
    (f"case,split,ct\n,train,{CT}\n", ["line 2", "no case id"]),
    (f"case,split,Notes\np1,train,{CT}\n", ["'p1'", "'Notes'"]),
]


@pytest.mark.parametrize(
    ("name", "text", "fragments"),
    [("m.json", text, fragments) for text, fragments in MALFORMED_JSON]
    + [("m.csv", text, fragments) for text, fragments in MALFORMED_CSV],
)
def test_malformed_manifest_names_file_case_and_field(
    tmp_path: Path, name: str, text: str, fragments: list[str]
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(InputError) as caught:
        load_manifest(path, check_files=False)
    assert str(caught.value).startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_save_refuses_what_load_would_refuse(manifest: Manifest, tmp_path: Path) -> None:
    manifest.cases["STS_001"].split = "holdout"
    with pytest.raises(InputError, match="case 'STS_001': split 'holdout' is unknown"):
        save_manifest(manifest, tmp_path / "m.json")
    with pytest.raises(InputError, match="no cases"):
        save_manifest(Manifest(), tmp_path / "m.csv")
    assert list(tmp_path.iterdir()) == []


def test_missing_manifest_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="manifest not found"):
        load_manifest(tmp_path / "none.json")


def test_queries_on_cases_modalities_and_splits(manifest: Manifest) -> None:
    assert manifest.modalities() == ["ct", "mr"]
    assert manifest.cases_with("ct") == ["STS_001", "STS_002"]
    assert manifest.cases_with("mr", "ct") == ["STS_001"]
    assert manifest.cases_with("mr", "t1") == []
    assert manifest.split_cases("test") == ["STS_002"]
    assert manifest.split_cases("val") == []
    assert not manifest.is_paired("mr", "ct")
    assert not manifest.is_paired("t1", "t2")
    manifest.cases.pop("STS_002")
    assert manifest.is_paired("mr", "ct")
    with pytest.raises(CrossdiffError, match="train, val, test"):
        manifest.split_cases("validation")


# ------------------------------------------------------------------------------------ splits

IDS = [f"case{i:03d}" for i in range(40)]


def test_splits_are_deterministic_and_independent_of_input_order() -> None:
    first = assign_splits(IDS, val=0.1, test=0.2, seed=7)
    assert assign_splits(list(reversed(IDS)), val=0.1, test=0.2, seed=7) == first
    assert sorted(first) == IDS
    counts = {split: list(first.values()).count(split) for split in ("train", "val", "test")}
    assert counts == {"train": 28, "val": 4, "test": 8}


def test_splits_depend_on_the_seed() -> None:
    test_sets = {
        frozenset(c for c, s in assign_splits(IDS, 0.0, 0.25, seed).items() if s == "test") for seed in range(5)
    }
    assert len(test_sets) == 5


def test_adding_a_case_moves_no_other_case() -> None:
    before = assign_splits(IDS[:20], val=0.0, test=0.25, seed=1)
    after = assign_splits(IDS[:21], val=0.0, test=0.25, seed=1)
    moved = [cid for cid in before if after[cid] != before[cid]]
    assert len(moved) <= 1


@pytest.mark.parametrize(
    ("n", "val", "test", "expected"),
    [
        (3, 0.0, 0.2, {"train": 2, "val": 0, "test": 1}),
        (1, 0.1, 0.2, {"train": 1, "val": 0, "test": 0}),
        (2, 0.1, 0.2, {"train": 1, "val": 0, "test": 1}),
        (3, 0.1, 0.2, {"train": 1, "val": 1, "test": 1}),
        (2, 0.0, 0.9, {"train": 1, "val": 0, "test": 1}),
        (10, 0.0, 0.0, {"train": 10, "val": 0, "test": 0}),
        (10, 0.15, 0.25, {"train": 5, "val": 2, "test": 3}),
    ],
)
def test_small_datasets_round_sensibly_and_keep_a_training_case(
    n: int, val: float, test: float, expected: dict[str, int]
) -> None:
    splits = list(assign_splits(IDS[:n], val=val, test=test, seed=0).values())
    assert {split: splits.count(split) for split in expected} == expected


def test_fixed_cases_keep_their_split_and_count_towards_the_fractions() -> None:
    fixed = {"case000": "test", "case001": "test", "case002": "val"}
    splits = assign_splits(IDS[:10], val=0.1, test=0.3, seed=3, fixed=fixed)
    assert all(splits[cid] == split for cid, split in fixed.items())
    assert list(splits.values()).count("test") == 3 and list(splits.values()).count("val") == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"case_ids": [], "val": 0.0, "test": 0.2}, "no cases"),
        ({"case_ids": ["a", "a"], "val": 0.0, "test": 0.2}, "unique"),
        ({"case_ids": ["a", "b"], "val": 0.5, "test": 0.5}, "val \\+ test < 1"),
        ({"case_ids": ["a", "b"], "val": 0.0, "test": -0.1}, "fractions"),
        ({"case_ids": ["a"], "val": 0.0, "test": 0.2, "fixed": {"b": "test"}}, "unknown case"),
        ({"case_ids": ["a"], "val": 0.0, "test": 0.2, "fixed": {"a": "holdout"}}, "unknown split"),
        ({"case_ids": ["a"], "val": 0.0, "test": 0.0, "fixed": {"a": "test"}}, "no case for training"),
    ],
)
def test_impossible_split_requests_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(CrossdiffError, match=message):
        assign_splits(seed=0, **kwargs)


def test_validation_is_one_carved_training_case_from_four_on_and_the_training_cases_below():
    cases = ["P1", "P2", "P3", "P4", "P5"]
    kept, carved, note = validation_cases(cases, [], seed=0)
    assert len(carved) == 1 and sorted(kept + carved) == cases and carved[0] not in kept
    assert validation_cases(list(reversed(cases)), [], seed=0)[1] == carved  # by seed and ids, not by order
    assert "carved" in note
    assert validation_cases(cases[:3], [], seed=0)[:2] == (cases[:3], cases[:3])  # too few to spare one
    assert validation_cases(cases, ["V1"], seed=0)[:2] == (cases, ["V1"])  # the manifest's own val split first
