"""Make the README's screenshot of the scoring page with the real browser and server:

    .venv/bin/python tests/study_screenshot.py docs/study-scoring-page.png

builds the test study's inputs from ../shared/data (two sarcoma CTs, the demo model's and a linear
map's translations of their MRs), creates a study, serves it, signs a reader in, scores two of the three
questions with the keyboard and saves the page as a PNG with a 256-colour palette (small enough for git).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from helpers import crossdiff
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from study_support import StudyServer, build_study_inputs, chromium


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    out = parser.parse_args().out
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = build_study_inputs(root / "inputs")
        study = root / "study"
        result = crossdiff("study", "create", "--reference", inputs["reference"], "--method", f"demo={inputs['demo']}",
                           "--method", f"linear={inputs['linear']}", "--cases", 2, "--slices", 2, "--title",
                           "Synthetic CT reader study", "--out", study)
        if result.returncode != 0:
            raise SystemExit(result.stderr)
        with StudyServer(study) as server:
            driver = chromium(root / "profile")
            try:
                driver.set_window_size(1280, 760)
                driver.get(server.url)
                driver.find_element(By.ID, "reader-name").send_keys("Dr Example")
                driver.find_element(By.ID, "start").click()
                ActionChains(driver).send_keys("4").send_keys("3").perform()
                driver.save_screenshot(str(root / "page.png"))
            finally:
                driver.quit()
        page = Image.open(root / "page.png").convert("RGB")
        out.parent.mkdir(parents=True, exist_ok=True)
        page.quantize(colors=256, dither=Image.Dither.NONE).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
