"""Errors that the command line turns into one clear message and a non-zero exit."""

from __future__ import annotations

from pathlib import Path


class CrossdiffError(Exception):
    """An error the user can act on; the CLI prints it without a traceback."""


class InputError(CrossdiffError):
    """A file (or folder) given by the user cannot be used; the message names it."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        where = f"{self.path}: " if self.path is not None else ""
        super().__init__(f"{where}{problem}")
