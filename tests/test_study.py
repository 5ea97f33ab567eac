"""The reader study end to end: `crossdiff study create` on real CT and two methods' real outputs, the real
server driven by two readers in headless Chromium (killed mid-way and restarted), `crossdiff study
analyse` on what they entered, and the server's refusals (tokens, path traversal, hosts, bad answers)."""

from __future__ import annotations

import csv
import http.client
import json
import re
import sqlite3
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import assert_clear_failure, crossdiff
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait
from study_support import CASES, StudyServer, build_study_inputs, chromium, copy_study, require_chromium

from crossdiff.study.agreement import krippendorff_alpha

QUESTIONS = ("realism", "artefacts", "diagnostic-usability")
METHODS = ("demo", "linear")
WINDOWS = {"soft-tissue": (-160.0, 240.0), "bone": (-500.0, 1300.0)}  # W 400 / L 40 and W 1800 / L 400 HU
TYPICAL = {"real": 4, "demo": 3, "linear": 2}  # the simulated readers' typical score of each source


@pytest.fixture(scope="module")
def inputs(shared_data, tmp_path_factory) -> dict[str, Path]:
    return build_study_inputs(tmp_path_factory.mktemp("study-inputs"))


def _create(inputs: dict[str, Path], out: Path, *extra: object) -> subprocess.CompletedProcess[str]:
    methods = [arg for name in METHODS for arg in ("--method", f"{name}={inputs[name]}")]
    return crossdiff("study", "create", "--reference", inputs["reference"], *methods, "--out", out, *extra)


@pytest.fixture(scope="module")
def study(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("studies") / "study"
    result = _create(inputs, out, "--cases", 2, "--slices", 2, "--seed", 3)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def _key(folder: Path) -> dict[str, dict]:
    return json.loads((folder / "key.json").read_text())["items"]


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


# ------------------------------------------------------------------------------------------- agreement


def test_krippendorff_alpha_reproduces_the_published_example():
    """Krippendorff (2011), 'Computing Krippendorff's Alpha-Reliability', the worked example with missing
    values: 4 observers, 12 units; published alpha 0.743 nominal, 0.815 ordinal, 0.849 interval."""
    n = np.nan
    scores = np.array([[1, 2, 3, 3, 2, 1, 4, 1, 2, n, n, n],
                       [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, n, 3],
                       [n, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, n],
                       [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, n]])
    assert round(krippendorff_alpha(scores, "nominal"), 3) == 0.743
    assert round(krippendorff_alpha(scores, "ordinal"), 3) == 0.815
    assert round(krippendorff_alpha(scores, "interval"), 3) == 0.849
    assert krippendorff_alpha(np.array([[1, 2, 3, 4], [1, 2, 3, 4]])) == 1.0
    assert np.isnan(krippendorff_alpha(np.array([[3, 3, 3], [3, 3, 3]])))  # no variation: undefined


# ---------------------------------------------------------------------------------------------- create


def test_create_writes_a_blinded_study_from_folders(study, inputs, tmp_path):
    description = json.loads((study / "study.json").read_text())
    key = _key(study)
    items = description["items"]
    assert len(items) == len(set(items)) == 2 * 2 * 3 and set(items) == set(key)
    text = (study / "study.json").read_text()
    for secret in (*CASES, *METHODS, "reference", str(inputs["reference"])):
        assert secret not in text  # readers' side of the study names no case, method or file
    slices = {(e["case"], e["slice"]) for e in key.values()}
    assert {case for case, _ in slices} == set(CASES) and len(slices) == 4
    for case, z in slices:
        assert sorted(e["source"] for e in key.values() if (e["case"], e["slice"]) == (case, z)) == ["demo", "linear", "real"]
    grouped = sorted(key, key=lambda i: (key[i]["case"], key[i]["slice"], key[i]["source"]))
    assert items != grouped  # shuffled
    import SimpleITK as sitk

    for item, entry in key.items():
        folder = inputs["reference" if entry["source"] == "real" else entry["source"]]
        hu = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{entry['case']}.nii.gz")))[entry["slice"]]
        for window, (low, high) in WINDOWS.items():
            shown = np.asarray(Image.open(study / "images" / f"{item}.{window}.png"), dtype=np.int16)
            expected = np.round(np.clip((hu - low) / (high - low), 0, 1) * 255)
            assert shown.shape == hu.shape and np.abs(shown - expected).max() <= 1, (item, window)
    token = study / "access-token"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text().strip()) >= 24

    again = tmp_path / "again"
    assert _create(inputs, again, "--cases", 2, "--slices", 2, "--seed", 3).returncode == 0
    repeat = [(e["case"], e["slice"], e["source"]) for e in (_key(again)[i] for i in json.loads(
        (again / "study.json").read_text())["items"])]
    assert repeat == [(key[i]["case"], key[i]["slice"], key[i]["source"]) for i in items]  # same seed, same study
    assert not set(_key(again)) & set(key)  # ids are random, not derived from what they show

    before = (study / "study.json").read_bytes()
    assert_clear_failure(_create(inputs, study, "--cases", 2, "--slices", 2), str(study), "already exists")
    assert (study / "study.json").read_bytes() == before


def test_create_from_a_benchmark_run_uses_its_masks(inputs, tmp_path):
    from crossdiff.readers import read_volume
    from crossdiff.volumes import write_volume

    run = tmp_path / "run"
    body_slices = (1, 3)
    for case in CASES:
        reference = read_volume(inputs["reference"] / f"{case}.nii.gz")
        mask = np.zeros(reference.shape, np.uint8)
        mask[list(body_slices)] = 1
        write_volume(reference.with_array(mask, modality=None, units=None), run / "cases" / "mask" / f"{case}.nii.gz")
        for sub, folder in (("cases/reference", inputs["reference"]), *((f"translations/{m}", inputs[m]) for m in METHODS)):
            (run / sub).mkdir(parents=True, exist_ok=True)
            (run / sub / f"{case}.nii.gz").symlink_to(folder / f"{case}.nii.gz")
    out = tmp_path / "study"
    result = crossdiff("study", "create", "--from", run, "--out", out, "--cases", 2, "--slices", 2)
    assert result.returncode == 0, result.stderr
    key = json.loads((out / "key.json").read_text())
    assert key["methods"] == list(METHODS)
    assert {e["slice"] for e in key["items"].values()} == set(body_slices)  # only slices inside the run's masks

    assert_clear_failure(crossdiff("study", "create", "--from", run, "--out", tmp_path / "s3", "--cases", 2, "--slices", 3),
                         "has 2 slice(s)", "asked for 3")
    (tmp_path / "two" / "ct").mkdir(parents=True)
    (run / "cases").rename(tmp_path / "two" / "ct" / "cases")
    assert_clear_failure(crossdiff("study", "create", "--from", tmp_path / "two", "--out", tmp_path / "s2"),
                         "not a benchmark results folder", str(tmp_path / "two" / "ct"))


def test_create_refuses_bad_inputs(inputs, tmp_path):
    from crossdiff.readers import read_volume
    from crossdiff.volumes import Volume, write_volume

    out = tmp_path / "study"
    assert_clear_failure(_create(inputs, out, "--cases", 3), "asked for 3 case(s)", "2 case(s)")
    shifted = tmp_path / "shifted"
    for case in CASES:
        volume = read_volume(inputs["demo"] / f"{case}.nii.gz")
        write_volume(Volume.from_sitk(volume.to_sitk()[:, :, 1:], "CT", "HU"), shifted / f"{case}.nii.gz")
    result = crossdiff("study", "create", "--reference", inputs["reference"], "--method", f"demo={shifted}",
                       "--cases", 1, "--out", out)
    assert_clear_failure(result, str(shifted), "not on the grid")
    assert_clear_failure(crossdiff("study", "create", "--reference", inputs["reference"], "--method",
                                   f"real={inputs['demo']}", "--out", out), "'real' names the real images")
    assert_clear_failure(crossdiff("study", "create", "--out", out), "give either --from")
    assert not out.exists()


# ------------------------------------------------------------------------------------- the browser test


def _plan(key: dict[str, dict], readers: tuple[str, ...]) -> dict[tuple[str, str, str], int]:
    """What each simulated reader answers: the source's typical score, moved by -1, 0 or +1 at random."""
    rng = np.random.default_rng(11)
    return {(reader, item, q): int(np.clip(TYPICAL[key[item]["source"]] + rng.integers(-1, 2), 1, 5))
            for reader in readers for item in sorted(key) for q in QUESTIONS}


class Reader:
    """One reader at one browser, scoring by keyboard or by mouse as planned."""

    def __init__(self, name: str, profile: Path, plan: dict, keyboard: bool) -> None:
        self.name, self.plan, self.keyboard = name, plan, keyboard
        self.driver = chromium(profile)
        self.seen: list[str] = []

    def sign_in(self, url: str) -> None:
        self.driver.get(url)
        self.driver.find_element(By.ID, "reader-name").send_keys(self.name)
        self.driver.find_element(By.ID, "start").click()
        self.wait_for_image()

    def wait_for_image(self) -> None:
        """Until the item page has loaded (a click only starts the navigation; under load it takes a while)."""
        WebDriverWait(self.driver, 15).until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".viewer img")))

    def text(self, element_id: str) -> str:
        return self.driver.find_element(By.ID, element_id).text

    def item(self) -> str:
        self.wait_for_image()
        source = self.driver.find_element(By.CSS_SELECTOR, ".viewer img").get_attribute("src")
        return re.search(r"/image/([0-9a-f]+)/soft-tissue\.png$", source).group(1)

    def score(self, comment: str = "") -> str:
        """Answer the page shown, save, wait for the next page; returns the item scored."""
        item = self.item()
        scores = [self.plan[(self.name, item, q)] for q in QUESTIONS]
        page = self.driver.find_element(By.ID, "progress")
        if self.keyboard:
            keys = ActionChains(self.driver)
            for value in scores:
                keys.send_keys(str(value))
            if comment:
                keys.send_keys("c").send_keys(comment).send_keys(Keys.ESCAPE)
            keys.send_keys("n").perform()
        else:
            for question, value in zip(QUESTIONS, scores):
                self.driver.find_element(By.XPATH, f"//input[@name='q-{question}'][@value='{value}']/../span").click()
            if comment:
                self.driver.find_element(By.ID, "comment").send_keys(comment)
            self.driver.find_element(By.ID, "save").click()
        WebDriverWait(self.driver, 15).until(expected_conditions.staleness_of(page))
        self.seen.append(item)
        return item

    def finish(self) -> None:
        while "/item/" in self.driver.current_url:
            self.score()


def _expected_counts(plan, key, readers):
    counts: dict[tuple[str, str], Counter] = {}
    for (reader, item, question), value in plan.items():
        if reader in readers:
            counts.setdefault((question, key[item]["source"]), Counter())[value] += 1
    return counts


def test_two_readers_score_in_a_browser_through_a_killed_server(study, tmp_path):
    require_chromium()
    folder = copy_study(study, tmp_path / "study")
    key = _key(folder)
    names = ("Dr Keys", "Dr Mouse")
    plan = _plan(key, names)
    server = StudyServer(folder).start()
    first, second = (Reader(name, tmp_path / f"profile-{i}", plan, keyboard=i == 0) for i, name in enumerate(names))
    try:
        first.sign_in(server.url)
        assert first.text("progress") == "1 of 12"
        page = first.driver.page_source
        for secret in (*CASES, *METHODS, "reference", "key.json"):
            assert secret not in page  # the page names nothing that tells which image it is
        soft, bone = first.driver.find_elements(By.CSS_SELECTOR, ".viewer img")
        assert soft.is_displayed() and not bone.is_displayed()
        ActionChains(first.driver).send_keys("w").perform()  # the keyboard switches the window
        assert bone.is_displayed() and not soft.is_displayed()
        first.score()
        commented = first.score(comment="edges look smeared")
        for _ in range(3):
            first.score()
        second.sign_in(server.url)
        for _ in range(3):
            second.score()
        second.driver.find_element(By.ID, "previous").click()  # back to an answered image: no score is shown
        WebDriverWait(second.driver, 15).until(
            expected_conditions.text_to_be_present_in_element((By.ID, "progress"), "3 of 12"))
        assert second.text("progress") == "3 of 12" and second.driver.find_element(By.ID, "already").is_displayed()
        assert not any(radio.is_selected() for radio in second.driver.find_elements(By.CSS_SELECTOR, "input[type=radio]"))

        server.kill()  # mid-study, without any shutdown
        with sqlite3.connect(folder / "scores.sqlite") as db:
            saved = {(r, i, q): s for r, i, q, s in db.execute("SELECT reader, item, question, score FROM scores")}
        assert saved == {k: v for k, v in plan.items() if (k[0], k[1]) in
                         {(first.name, i) for i in first.seen} | {(second.name, i) for i in second.seen}}
        assert len(saved) == (5 + 3) * len(QUESTIONS)

        restarted = StudyServer(folder, port=server.port).start()
        try:
            assert restarted.url == server.url  # the readers' address still works
            for reader, done in ((first, 5), (second, 3)):
                reader.driver.get(restarted.url)  # the cookie remembers the reader: no name asked again
                assert reader.text("progress") == f"{done + 1} of 12" and reader.text("scored") == f"{done} scored"
                reader.finish()
                assert reader.driver.current_url.endswith("/done") and "all 12 images" in reader.text("finished")
        finally:
            restarted.kill()
    finally:
        server.kill()
        for reader in (first, second):
            reader.driver.quit()
    for reader in (first, second):
        assert sorted(reader.seen) == sorted(key)  # each image once
    assert first.seen != second.seen  # each reader has an order of their own

    result = crossdiff("study", "analyse", folder)
    assert result.returncode == 0, result.stderr
    analysis = folder / "analysis"
    counts = _expected_counts(plan, key, names)
    summary = _rows(analysis / "summary.csv")
    assert len(summary) == len(QUESTIONS) * 3
    for row in summary:
        expected = counts[(row["question"], row["source"])]
        assert int(row["n"]) == 2 * 4 == sum(expected.values())
        assert [int(row[f"n_{v}"]) for v in range(1, 6)] == [expected[v] for v in range(1, 6)]
        assert float(row["mean"]) == pytest.approx(sum(v * c for v, c in expected.items()) / 8)
    by_slice = {(e["case"], e["slice"], e["source"]): item for item, e in key.items()}
    for row in _rows(analysis / "discrimination.csv"):
        question = row["question"]
        pairs = [(plan[(r, by_slice[(c, z, "real")], question)], plan[(r, by_slice[(c, z, row["method"])], question)])
                 for r in names for c, z, s in by_slice if s == "real"]
        assert int(row["pairs"]) == len(pairs) == 8
        assert int(row["real_higher"]) == sum(a > b for a, b in pairs)
        assert int(row["same"]) == sum(a == b for a, b in pairs)
    items = sorted(key)
    for row in _rows(analysis / "agreement.csv"):
        matrix = np.array([[plan[(r, i, row["question"])] for i in items] for r in names], float)
        assert float(row["krippendorff_alpha_ordinal"]) == pytest.approx(krippendorff_alpha(matrix, "ordinal"))
    tests = _rows(analysis / "tests.csv")
    assert tests and all(row["n"] == "4" and row["unit"] == "slices" for row in tests)
    for row in tests:  # higher scores are better: the side with the higher median is named
        difference = np.median([np.mean([plan[(r, by_slice[(c, z, row["a"])], row["metric"])] for r in names])
                                - np.mean([plan[(r, by_slice[(c, z, row["b"])], row["metric"])] for r in names])
                                for c, z, s in by_slice if s == "real"])
        assert row["better"] == (row["a"] if difference > 0 else row["b"] if difference < 0 else "neither")
    assert any(row["better"] == "real" for row in tests)
    assert [(r["reader"], r["images_scored"], r["complete"]) for r in _rows(analysis / "readers.csv")] == [
        (name, "12", "True") for name in sorted(names)]
    (comment,) = _rows(analysis / "comments.csv")
    assert (comment["reader"], comment["source"], comment["comment"]) == (first.name, key[commented]["source"],
                                                                          "edges look smeared")
    report = (analysis / "report.html").read_text()
    assert "Krippendorff" in report and report.count("data:image/png;base64,") == 3


# --------------------------------------------------------------------------------------------- refusals


def _get(port: int, path: str, host: str = "127.0.0.1", method: str = "GET", body: str = "",
         cookie: str = "") -> tuple[int, bytes]:
    """A raw request: http.client sends the path exactly as given (no normalising of '..' or '%2f')."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Host": f"{host}:{port}", **({"Cookie": cookie} if cookie else {}),
               **({"Content-Type": "application/x-www-form-urlencoded"} if body else {})}
    connection.request(method, path, body=body or None, headers=headers)
    response = connection.getresponse()
    status, data = response.status, response.read()
    connection.close()
    return status, data


def test_server_refuses_wrong_tokens_path_traversal_and_bad_answers(study, tmp_path):
    folder = copy_study(study, tmp_path / "study")
    token = (folder / "access-token").read_text().strip()
    item = json.loads((folder / "study.json").read_text())["items"][0]
    secrets = [b"crossdiff-study-key", b'"source"', token.encode(), b"SQLite format"]
    with StudyServer(folder) as server:
        port = server.port
        status, data = _get(port, f"/s/{token}/image/{item}/soft-tissue.png")
        assert status == 200 and data.startswith(b"\x89PNG")  # the same request with the right token works
        altered = token[:-1] + ("y" if token[-1] != "y" else "z")  # one character off (never the token itself)
        for path in ("/", f"/s/{altered}/", f"/s/{token[:-1]}/", f"/s/{token}x/",
                     f"/s//image/{item}/soft-tissue.png", f"/s/wrong/image/{item}/soft-tissue.png"):
            status, data = _get(port, path)
            assert status in (403, 404), path
            assert not data.startswith(b"\x89PNG") and token.encode() not in data, path
        traversal = [
            f"/s/{token}/image/../key.json", f"/s/{token}/image/..%2f..%2fkey.json/soft-tissue.png",
            f"/s/{token}/image/%2e%2e/key.json.png", f"/s/{token}/image/{item}/..%2f..%2f..%2fkey.json",
            f"/s/{token}/image/{item}/%2e%2e%2f%2e%2e%2fkey.json.png", f"/s/{token}/static/..%2fkey.json",
            f"/s/{token}/static/%2e%2e%2f%2e%2e%2fkey.json", f"/s/{token}/static/..%2f..%2fstudy%2fserver.py",
            f"/s/{token}/image/{item}/..%2f..%2fscores.sqlite%00.png", f"/s/{token}/key.json", f"/s/{token}/scores.sqlite",
            f"/s/{token}/../../key.json", f"/s/{token}/static/%2fetc%2fpasswd", f"/s/{token}/image/{item}/%2fetc%2fpasswd.png",
        ]
        for path in traversal:
            status, data = _get(port, path)
            assert status in (400, 404), path
            assert not any(secret in data for secret in secrets) and b"root:" not in data and b"import" not in data, path
        status, _ = _get(port, f"/s/{token}/", host="attacker.example")  # DNS rebinding: foreign Host header
        assert status == 400

        cookie = "crossdiff_reader=Dr%20Probe"
        answers = "q-realism=6&q-artefacts=2&q-diagnostic-usability=2"  # 6 is off the scale
        assert _get(port, f"/s/{token}/item/1", method="POST", body=answers, cookie=cookie)[0] == 400
        assert _get(port, f"/s/{token}/item/1", method="POST", body="q-realism=3", cookie=cookie)[0] == 400
        assert _get(port, f"/s/{token}/item/99", cookie=cookie)[0] == 404
        valid = "q-realism=3&q-artefacts=2&q-diagnostic-usability=2"
        assert _get(port, f"/s/{token}/item/1", method="POST", body=valid)[0] == 303  # no reader: back to the start
        assert _get(port, "/s/wrong/item/1", method="POST", body=valid, cookie=cookie)[0] == 403
        with sqlite3.connect(folder / "scores.sqlite") as db:
            assert db.execute("SELECT COUNT(*) FROM scores").fetchone() == (0,)
        assert _get(port, f"/s/{token}/item/1", method="POST", body=valid, cookie=cookie)[0] == 303
        with sqlite3.connect(folder / "scores.sqlite") as db:
            assert db.execute("SELECT reader, score FROM scores ORDER BY question").fetchall() == [
                ("Dr Probe", 2), ("Dr Probe", 2), ("Dr Probe", 3)]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "example.org"])
def test_serve_refuses_to_listen_beyond_loopback(study, host):
    result = subprocess.run([sys.executable, "-m", "crossdiff", "study", "serve", str(study), "--host", host,
                             "--port", "0"], capture_output=True, text=True, timeout=60)
    assert_clear_failure(result, f"refusing to listen on '{host}'", "loopback")


def test_serve_and_analyse_name_what_is_missing(study, tmp_path):
    folder = copy_study(study, tmp_path / "study")
    assert_clear_failure(crossdiff("study", "analyse", folder), str(folder / "scores.sqlite"), "no reader has scored")
    assert not (folder / "analysis").exists()
    result = subprocess.run([sys.executable, "-m", "crossdiff", "study", "serve", str(tmp_path), "--port", "0"],
                            capture_output=True, text=True, timeout=60)
    assert_clear_failure(result, str(tmp_path / "study.json"), "does not exist")
