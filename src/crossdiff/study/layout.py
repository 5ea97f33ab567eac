"""The study folder, what each file in it holds, and reading it back with checks.

    study.json          what readers may see: title, questions, display windows, item ids (no case,
                        slice or method)
    key.json            which item is which (case, slice, real or which method); `analyse` reads it,
                        the server never serves it
    access-token        the secret in the study's URL (file mode 0600)
    images/ID.WINDOW.png
    scores.sqlite       the readers' answers, written by `serve`
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from crossdiff.errors import InputError

STUDY_FILE = "study.json"
KEY_FILE = "key.json"
TOKEN_FILE = "access-token"
IMAGES = "images"
SCORES_FILE = "scores.sqlite"
FORMAT = "crossdiff-study"
REAL = "real"  # the label of the real target image among the methods
SCALE = (1, 5)
NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")  # question and window ids go into URLs and form fields


@dataclass(frozen=True)
class Question:
    """One 1-5 Likert question; `low` and `high` say what 1 and 5 mean."""

    id: str
    text: str
    low: str
    high: str


DEFAULT_QUESTIONS = (
    Question("realism", "How realistic does this image look?", "clearly synthetic", "indistinguishable from a real scan"),
    Question("artefacts", "How free of artefacts is this image?", "severe artefacts", "no artefacts"),
    Question("diagnostic-usability", "Could you use this image for diagnosis or treatment planning?",
             "not usable", "fully usable"),
)


@dataclass(frozen=True)
class Window:
    """A display window every image is written in (CT: soft tissue, bone; MR: a percentile window)."""

    name: str
    label: str


@dataclass(frozen=True)
class KeyEntry:
    case: str
    slice: int
    source: str  # REAL or a method name


@dataclass(frozen=True)
class Study:
    folder: Path
    title: str
    seed: int
    modality: str
    questions: tuple[Question, ...]
    windows: tuple[Window, ...]
    items: tuple[str, ...]

    def image(self, item: str, window: str) -> Path | None:
        """The PNG of a known item in a known window, else None: request paths only choose among these."""
        if item not in self.items or window not in {w.name for w in self.windows}:
            return None
        return self.folder / IMAGES / f"{item}.{window}.png"

    def order_for(self, reader: str) -> list[str]:
        """The items in this reader's own order, fixed by the study seed and the reader's name, so that
        position effects (fatigue, anchoring on the first images) do not fall on the same items for every
        reader, and a resumed session finds the same order."""
        rng = np.random.default_rng([self.seed, zlib.crc32(reader.encode("utf-8"))])
        return [self.items[i] for i in rng.permutation(len(self.items))]

    def description(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": 1, "title": self.title, "seed": self.seed, "modality": self.modality,
                "questions": [asdict(q) for q in self.questions], "windows": [asdict(w) for w in self.windows],
                "items": list(self.items)}


def load_study(folder: Path) -> Study:
    """The study a folder holds; InputError naming the file when it is missing or not a study."""
    path = Path(folder) / STUDY_FILE
    data = _read_json(path)
    try:
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
        questions = tuple(check_questions([Question(**q) for q in data["questions"]], path))
        windows = tuple(Window(**w) for w in data["windows"])
        study = Study(Path(folder), str(data["title"]), int(data["seed"]), str(data["modality"]), questions, windows,
                      tuple(str(i) for i in data["items"]))
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(path, f"not a crossdiff study description ({error})") from None
    if not study.items or not windows or any(not NAME.match(w.name) for w in windows):
        raise InputError(path, "lists no item, no window, or a window name that is not a short lower-case id")
    return study


def load_key(folder: Path) -> dict[str, KeyEntry]:
    """{item id: what it shows}; InputError when the key is missing or does not cover the study's items."""
    path = Path(folder) / KEY_FILE
    data = _read_json(path)
    try:
        key = {item: KeyEntry(str(e["case"]), int(e["slice"]), str(e["source"])) for item, e in data["items"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise InputError(path, f"not a crossdiff study key ({error!r})") from None
    missing = set(load_study(folder).items) - set(key)
    if missing:
        raise InputError(path, f"does not say what {len(missing)} of the study's items show (e.g. {sorted(missing)[0]})")
    return key


def read_token(folder: Path) -> str:
    path = Path(folder) / TOKEN_FILE
    try:
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot read the study's access token ({error.__class__.__name__})") from None
    if len(token) < 16:
        raise InputError(path, "the access token is shorter than 16 characters; create the study again")
    return token


def check_questions(questions: list[Question], where: Path) -> list[Question]:
    ids = [q.id for q in questions]
    if not questions or len(set(ids)) != len(ids) or any(not NAME.match(i) for i in ids):
        raise InputError(where, "needs at least one question, each with its own short lower-case id "
                                f"(letters, digits, '-'); got {ids}")
    return questions


def read_questions(path: Path) -> list[Question]:
    """Questions from a YAML list of {id, text, low, high}."""
    try:
        loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        questions = [Question(str(q["id"]), str(q["text"]), str(q["low"]), str(q["high"])) for q in loaded]
    except OSError as error:
        raise InputError(path, f"cannot read the questions ({error.strerror or error})") from None
    except (yaml.YAMLError, KeyError, TypeError) as error:
        raise InputError(path, f"must be a YAML list of questions with id, text, low and high ({error!r})") from None
    return check_questions(questions, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "does not exist: is this a study folder made by `crossdiff study create`?") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(path, f"cannot be read as JSON ({error})") from None
    if not isinstance(data, dict):
        raise InputError(path, "does not hold a JSON object")
    return data
