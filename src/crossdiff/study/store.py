"""The readers' answers in SQLite: every answer is one transaction, committed before the reader sees the
next page, so a server killed at any moment loses nothing a reader was told was saved.

Each call opens its own connection (SQLite's own locking orders concurrent readers); `analyse` opens the
file read-only, so analysing a running study never writes to it.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from crossdiff.errors import InputError

SCHEMA = """
CREATE TABLE IF NOT EXISTS readers (name TEXT PRIMARY KEY, first_seen TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS scores (
    reader TEXT NOT NULL, item TEXT NOT NULL, question TEXT NOT NULL,
    score INTEGER NOT NULL CHECK (score BETWEEN 1 AND 5), answered TEXT NOT NULL,
    PRIMARY KEY (reader, item, question));
CREATE TABLE IF NOT EXISTS comments (
    reader TEXT NOT NULL, item TEXT NOT NULL, comment TEXT NOT NULL, answered TEXT NOT NULL,
    PRIMARY KEY (reader, item));
"""


@dataclass(frozen=True)
class Score:
    reader: str
    item: str
    question: str
    score: int


@dataclass(frozen=True)
class Comment:
    reader: str
    item: str
    comment: str


class ScoreStore:
    def __init__(self, path: Path, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        if read_only and not self.path.is_file():
            raise InputError(self.path, "does not exist: no reader has scored this study yet (crossdiff study serve)")
        if not read_only:
            with self._connection() as db:
                db.executescript(SCHEMA)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        """A connection whose `with` block is one transaction: committed on success, rolled back on error."""
        uri = f"{self.path.resolve().as_uri()}{'?mode=ro' if self.read_only else ''}"
        try:
            db = sqlite3.connect(uri, uri=True, timeout=30)
        except sqlite3.Error as error:
            raise InputError(self.path, f"cannot open the scores database ({error})") from None
        try:
            with db:
                yield db
        except sqlite3.DatabaseError as error:
            raise InputError(self.path, f"scores database error ({error})") from None
        finally:
            db.close()

    def add_reader(self, name: str) -> None:
        with self._connection() as db:
            db.execute("INSERT OR IGNORE INTO readers VALUES (?, ?)", (name, _now()))

    def save(self, reader: str, item: str, scores: Mapping[str, int], comment: str) -> None:
        """One item's answers (replacing the reader's earlier answer to it), committed before returning."""
        now = _now()
        with self._connection() as db:
            db.execute("INSERT OR IGNORE INTO readers VALUES (?, ?)", (reader, now))
            db.executemany(
                "INSERT INTO scores VALUES (?, ?, ?, ?, ?) ON CONFLICT (reader, item, question) "
                "DO UPDATE SET score = excluded.score, answered = excluded.answered",
                [(reader, item, question, int(score), now) for question, score in scores.items()],
            )
            db.execute("DELETE FROM comments WHERE reader = ? AND item = ?", (reader, item))
            if comment:
                db.execute("INSERT INTO comments VALUES (?, ?, ?, ?)", (reader, item, comment, now))

    def answered(self, reader: str, questions: int) -> set[str]:
        """The items this reader has answered every one of the `questions` questions of."""
        with self._connection() as db:
            rows = db.execute("SELECT item FROM scores WHERE reader = ? GROUP BY item HAVING COUNT(*) >= ?",
                              (reader, questions)).fetchall()
        return {item for (item,) in rows}

    def scores(self) -> list[Score]:
        with self._connection() as db:
            rows = db.execute("SELECT reader, item, question, score FROM scores ORDER BY reader, item, question")
            return [Score(*row) for row in rows.fetchall()]

    def comments(self) -> list[Comment]:
        with self._connection() as db:
            rows = db.execute("SELECT reader, item, comment FROM comments ORDER BY reader, item").fetchall()
        return [Comment(*row) for row in rows]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
